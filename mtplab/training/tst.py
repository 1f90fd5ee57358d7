"""Token Superposition Training (TST, arXiv 2605.06546; seed 002's variant for MTP heads).

Phase 1 (the first `tst_fraction` of the steps): s*T raw tokens are cut into T non-overlapping bags of
s tokens; each bag's token embeddings are *averaged* into one input position, so the trunk runs at
length T while reading s times more text. Position i has seen bags 0..i, i.e. raw tokens up to
(i+1)s-1, and the main head predicts the whole next bag, raw tokens [(i+1)s, (i+2)s), with the
multi-hot cross-entropy: the mean of the s cross-entropies of one set of logits.

MTP head d predicts that bag shifted d raw tokens forward, [(i+1)s+d, (i+2)s+d) (seed 002's rule, so
that every head gets a distinct target). A sequential (DeepSeek-style) depth d also reads the bag
shifted d raw tokens, [is+d, (i+1)s+d): the analogue of reading token t+d to predict t+d+1.

Phase 2 is ordinary next-token training at length T. The phase is a function of the step, so
`--resume` needs nothing new beyond the phase-1 data position.

A raw window therefore holds (T+1)s + n_heads - 1 tokens: T bags of input, one more bag of target,
and the last head's shift.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from ..config import Config
from ..errors import MtplabError
from ..models.layers import AttentionMask
from ..models.transformer import Transformer


def phase1_steps(config: Config) -> int:
    """Number of leading steps trained in superposition (0 when TST is off)."""
    t = config.train
    return round(t.tst_fraction * t.steps) if t.tst_bag else 0


def window_length(seq_len: int, bag: int, n_heads: int) -> int:
    """Raw tokens a phase-1 row needs for T = seq_len compressed positions."""
    return (seq_len + 1) * bag + n_heads - 1


def check_config(config: Config) -> None:
    if config.train.tst_bag and config.data.format != "lm":
        raise MtplabError("train.tst_bag needs packed text (data.format = \"lm\"): bags of tokens "
                          "are cut from a continuous token stream")
    if config.train.tst_bag and (config.model.smear or config.model.value_embeds):
        raise MtplabError("train.tst_bag does not combine with model.smear or model.value_embeds: "
                          "both read single token ids, and a TST position is a bag of them")


def bags(raw: torch.Tensor, bag: int, length: int, offset: int = 0) -> torch.Tensor:
    """[B, L] raw tokens -> [B, length, bag]: bag i is raw[offset + i*bag : offset + (i+1)*bag]."""
    return raw[:, offset:offset + bag * length].reshape(raw.size(0), length, bag)


def tst_targets(raw: torch.Tensor, bag: int, length: int, n_heads: int) -> list[torch.Tensor]:
    """Head d's [B, length, bag] targets: at position i, raw tokens [(i+1)bag + d, (i+2)bag + d)."""
    return [bags(raw, bag, length, bag + d) for d in range(n_heads)]


def bag_embeddings(model: Transformer, bag_ids: torch.Tensor) -> torch.Tensor:
    """[B, T, s] token ids -> [B, T, D]: the mean of each bag's token embeddings."""
    return model.embed(bag_ids).mean(dim=-2)


def multi_hot_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed over positions: the mean over the s targets of CE(logits, target). logits [B, T, V],
    targets [B, T, s]. One log-softmax serves all s targets."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets).mean(dim=-1).sum()


def backward_tst(model: Transformer, raw: torch.Tensor, bag: int, weights: list[float],
                 scale: float = 1.0, autocast=contextlib.nullcontext,
                 counts: list[int] | None = None) -> list[float]:
    """Phase 1's training step on [B, window_length(T, bag, heads)] raw tokens: accumulate gradients
    of sum_d weights[d] * MCE_d (times `scale`) and return each MCE_d. Same structure as
    losses.backward_heads: one trunk pass, one head's logits alive at a time. counts[d] divides head
    d's summed loss (default: B*T; data-parallel ranks pass the global count)."""
    n = model.n_future
    length = (raw.size(1) - (n - 1)) // bag - 1
    if length < 1:
        raise ValueError(f"a TST row of {raw.size(1)} tokens holds no bag to predict")
    embed = functools.partial(bag_embeddings, model)
    mask = AttentionMask(0, length, raw.device)
    with autocast():
        h = model.trunk(None, mask, embeds=embed(bags(raw, bag, length)))
    trunk_out = h.detach().requires_grad_()

    def future(d: int) -> torch.Tensor:  # what sequential depth d reads: the bags d raw tokens on
        return embed(bags(raw, bag, length, d))

    outputs, detached, prev = [], [], trunk_out
    for d in range(n):
        with autocast():
            out = model.heads.hidden(d, trunk_out, prev, future, model.rotary, mask)
        leaf = out.detach().requires_grad_()
        outputs.append(out)
        detached.append(leaf)
        prev = leaf
    targets = tst_targets(raw, bag, length, n)
    losses = [0.0] * n
    for d in reversed(range(n)):  # deepest first: its gradient feeds depth d-1
        with autocast():
            logits = model.head_logits(d, detached[d])
        total = multi_hot_loss(logits, targets[d])
        mean = total / max(targets[d].size(0) * length if counts is None else counts[d], 1)
        losses[d] = mean.item()
        (mean * weights[d] * scale).backward()
        del logits, total, mean
        if outputs[d] is not detached[d] and detached[d].grad is not None:
            outputs[d].backward(detached[d].grad)
    if trunk_out.grad is not None and h.requires_grad:
        h.backward(trunk_out.grad)
    return losses
