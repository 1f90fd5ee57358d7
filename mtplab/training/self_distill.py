"""Self-distillation of the draft heads (Medusa-2's): heads k >= 1 learn what head 0 will say,
not what the training text said.

Speculative decoding keeps a draft when it is head 0's own choice (greedy) or in proportion to
head 0's probability of it (sampling), so the best drafter predicts head 0, mistakes included.
The training text is the wrong target wherever the model disagrees with it; the model's own
greedy continuations are exactly the text its drafts are checked against. So:

1. the model answers a set of prompts greedily, many rows at a time;
2. with the trunk and head 0 frozen (they are the teacher, and every answer the model gives
   stays bit for bit what it was), head k at position t is trained towards head 0's
   distribution at position t + k on that text: KL(p0(. | x<=t+k) || q_k(. | x<=t)), at the
   positions a decoder drafts from (the prompt's last one and every generated one).

Soft targets also carry what sampling needs: a head whose distribution is head 0's has every
draft accepted at any temperature.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..errors import MtplabError
from ..inference.decode import decode_batch
from ..inference.engine import fit_prompt
from ..models.transformer import Transformer
from .schedules import lr_multiplier


@dataclass
class Answer:
    ids: list[int]  # prompt + the model's greedy answer (+ eos when it ended there)
    start: int  # where the answer begins


@dataclass
class DistillReport:
    prompts: int  # prompts answered
    answers: int  # answers with something to learn from (two tokens or more)
    answer_tokens: int
    steps: int
    first_loss: float  # summed over the draft heads: KL in nats per scored position
    last_loss: float
    generate_seconds: float
    train_seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def own_answers(model: Transformer, prompts: list[list[int]], eos_id: int, max_new_tokens: int = 96,
                batch_size: int = 64, progress: bool = False) -> list[Answer]:
    """The model's greedy answer to each prompt, as the sequences the heads train on."""
    answers = []
    # plain decoding: at this many rows a step is bound by arithmetic, where drafts cost more than they save
    for done in decode_batch(model, prompts, max_new_tokens, eos_id=eos_id, batch_size=batch_size,
                             speculative=False, progress=progress, desc="own answers"):
        prompt, limit = fit_prompt(model, done.prompt_ids, max_new_tokens)
        ended = len(done.ids) < limit  # stopped at eos, which the heads should draft too
        answers.append(Answer(prompt + done.ids + ([eos_id] if ended else []), len(prompt)))
    return answers


def distill_loss(model: Transformer, ids: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Sum over heads k >= 1 of the mean KL(head 0 at t + k || head k at t), for ids [B, T]
    (right-padded), over positions start - 1 <= t with t + k + 1 < end (the drafted token is
    one the model produced)."""
    vocab = model.config.real_vocab_size  # the padded ids are -inf for both: no mass, no KL
    mask = model.attention_mask(ids)
    with torch.no_grad():
        trunk = model.trunk(ids, mask)
        head0 = model.heads_hidden(trunk, 1, ids, mask)[0]  # [B, T, D]
    total, prev = ids.new_zeros((), dtype=torch.float32), trunk
    for k in range(1, model.n_future):
        prev = model.head_hidden(k, trunk, prev, ids, mask)  # [B, T_k, D]
        t = torch.arange(min(prev.size(1), ids.size(1) - k), device=ids.device)
        scored = (t[None] >= starts[:, None] - 1) & (t[None] + k + 1 < ends[:, None])  # [B, T']
        if not scored.any():
            continue
        student = model.head_logits(k, prev[:, :t.numel()][scored])[:, :vocab].float()  # [N, V]
        with torch.no_grad():
            teacher = model.head_logits(0, head0[:, k:k + t.numel()][scored])[:, :vocab].float()
        total = total + F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                                 reduction="batchmean")
    return total


def _batch(answers: list[Answer], pad_id: int, device: torch.device):
    longest = max(len(a.ids) for a in answers)
    ids = torch.full((len(answers), longest), pad_id, dtype=torch.long)
    for i, a in enumerate(answers):
        ids[i, :len(a.ids)] = torch.tensor(a.ids)
    starts = torch.tensor([a.start for a in answers])
    ends = torch.tensor([len(a.ids) for a in answers])
    return ids.to(device), starts.to(device), ends.to(device)


def distill_heads(model: Transformer, prompts: list[list[int]], eos_id: int, steps: int = 100,
                  batch_size: int = 16, lr: float = 3e-3, max_new_tokens: int = 96, seed: int = 0,
                  progress: bool = False) -> DistillReport:
    """Train `model`'s draft heads in place on its own greedy answers to `prompts` (AdamW, the
    WSD schedule: warm-up, flat, a linear decay over the last 20%); head 0 and the trunk are
    untouched."""
    if model.n_future < 2:
        raise MtplabError("the model has one head: there are no draft heads to distill")
    for name, value in (("steps", steps), ("batch size", batch_size)):
        if value < 1:
            raise MtplabError(f"{name} must be >= 1, got {value}")
    if not lr > 0:
        raise MtplabError(f"the learning rate must be > 0, got {lr}")
    if not prompts:
        raise MtplabError("no prompts to answer")
    t0 = time.perf_counter()
    answers = [a for a in own_answers(model, prompts, eos_id, max_new_tokens, progress=progress)
               if len(a.ids) - a.start >= 2]  # a draft needs a token after the first
    if not answers:
        raise MtplabError("the model's answers to these prompts are all shorter than two tokens: "
                          "nothing to draft, nothing to learn")
    generate_seconds = time.perf_counter() - t0

    draft = model.heads.draft_parameters()
    was_training, flags = model.training, [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in draft:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(draft, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # warm-up, flat, then a linear decay over the last 20%
        optimizer, lambda s: lr_multiplier(s, steps, warmup, "wsd", decay_fraction=0.2))
    order = torch.Generator().manual_seed(seed)
    from tqdm.auto import tqdm

    losses, t1 = [], time.perf_counter()
    model.eval()  # no dropout: the teacher must be the decoder's head 0
    try:
        with torch.enable_grad(), tqdm(total=steps, desc="distilling heads", unit="step",
                                       disable=not progress, dynamic_ncols=True) as bar:
            perm, at = torch.randperm(len(answers), generator=order), 0
            for _ in range(steps):
                if at + batch_size > len(answers):
                    perm, at = torch.randperm(len(answers), generator=order), 0
                chosen = [answers[int(i)] for i in perm[at:at + batch_size]]
                at += batch_size
                loss = distill_loss(model, *_batch(chosen, eos_id, model.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(float(loss.detach()))
                bar.set_postfix(kl=f"{losses[-1]:.3f}")
                bar.update()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    tokens = sum(len(a.ids) - a.start for a in answers)
    return DistillReport(len(prompts), len(answers), tokens, steps, losses[0], losses[-1],
                         round(generate_seconds, 2), round(time.perf_counter() - t1, 2))
