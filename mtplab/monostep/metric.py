"""Monostep's metric: cross-entropy of the next block's SLOTS tokens, predicted from each block start.

For a Monostep model that is its training loss on the (prefix, block) samples. A causal model with
SLOTS heads is scored on exactly the same predictions: at the last position of each prefix, head k
predicts the block's token k. `<empty>` fill is never scored. Both return the mean over every scored
token (all slots pooled) and the mean of each slot. `evaluate` is `mtplab eval` on a Monostep model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.pipeline import chat_pairs
from ..errors import MtplabError
from .data import BlockBatches
from .model import Monostep


def _summary(totals: torch.Tensor, counts: torch.Tensor) -> dict:
    return {"loss": float(totals.sum() / counts.sum().clamp_min(1)),
            "slot_losses": (totals / counts.clamp_min(1)).tolist(), "tokens": int(counts.sum())}


def slot_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, empty_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, S, V], targets [B, S] -> summed CE per slot [S] and scored tokens per slot [S]."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=empty_id, reduction="none")  # [B, S]
    scored = targets != empty_id
    return (ce * scored).sum(0), scored.sum(0)


@torch.no_grad()
def monostep_block_loss(model, batches: BlockBatches, limit: int | None = None) -> dict:
    totals = counts = 0
    for ids, mask, targets in batches.in_order(limit):
        ids, mask, targets = ids.to(model.device), mask.to(model.device), targets.to(model.device)
        total, count = slot_cross_entropy(model(ids, mask), targets, batches.empty_id)
        totals, counts = totals + total.cpu(), counts + count.cpu()
    return _summary(totals, counts)


@torch.no_grad()
def causal_block_loss(model, pairs: list[tuple[list[int], list[int]]], slots: int,
                      limit: int | None = None) -> dict:
    """pairs: (prompt ids, answer ids ending in eos); one forward per example scores all its blocks.
    Head k stands for slot k (the model needs SLOTS heads). An example longer than the context
    scores each block from the context's worth of tokens before it (one forward per block), as
    Monostep's metric keeps the last max_len tokens of each prefix."""
    if model.n_future < slots:
        raise ValueError(f"the model has {model.n_future} heads; the block loss needs {slots}")
    totals, counts = torch.zeros(slots), torch.zeros(slots)
    window = model.config.max_seq_len
    for prompt, answer in pairs[:limit]:
        ids = prompt + answer
        if len(ids) - 1 > window:
            ahead = slots - 1 if model.heads.reads_ahead else 0  # the block's tokens a head reads
            for start in range(len(prompt), len(ids), slots):
                # the block's prefix (and the block's tokens its heads read), `window` tokens in all
                begin = max(0, start + ahead - window)
                x = torch.tensor([ids[begin:min(len(ids) - 1, start + ahead)]], device=model.device)
                end = start - 1 - begin  # the prefix's last position
                logits = model(x, n_heads=slots)
                for k in range(min(slots, len(ids) - start)):
                    if end < logits[k].size(1):  # sequential depth k covers T - k positions
                        target = torch.tensor([ids[start + k]], device=model.device)
                        totals[k] += float(F.cross_entropy(logits[k][0, end:end + 1].float(), target))
                        counts[k] += 1
            continue
        x = torch.tensor([ids[:-1]], device=model.device)
        logits = model(x, n_heads=slots)  # head k: [1, T - (k if sequential), V]
        targets = torch.tensor(ids, device=model.device)
        starts = torch.arange(len(prompt), len(ids), slots, device=model.device)  # blocks' first tokens
        for k in range(slots):
            where = starts[starts + k < len(ids)]  # blocks that have a token k
            where = where[where - 1 < logits[k].size(1)]  # sequential depth k covers T - k positions
            head = logits[k][0, where - 1]  # [n, V]: the prefix's last position predicts the block
            totals[k] += float(F.cross_entropy(head.float(), targets[where + k], reduction="sum"))
            counts[k] += len(where)
    return _summary(totals, counts)


def evaluate(model: Monostep, tokenizer, task: str, data, limit: int | None) -> tuple[dict, str]:
    """`mtplab eval`'s loss and ppl (evaluation/tasks.py checks the arguments and answers gsm8k
    itself). A Monostep model scores blocks: `loss` is its block loss per slot over (prefix, next block)
    samples (of the answers in a jsonl, or of every block of a text's max_len windows); `ppl` is
    slot 0's next-token loss at every position (one forward per token: use --limit on long texts)."""
    window, slots = model.config.max_seq_len, model.n_future
    if isinstance(data, list):
        pairs = chat_pairs(data, tokenizer)
    else:
        ids = tokenizer.encode(data)[: None if limit is None else limit * window]
        if len(ids) < 2:
            raise MtplabError("need at least two tokens to score")
        pairs = [(ids[i:i + 1], ids[i + 1:i + window]) for i in range(0, len(ids) - 1, window - 1)]
    size = 1 if task == "ppl" else slots  # ppl: every position is a one-token block for slot 0
    batches = BlockBatches(pairs, size, 16, tokenizer.pad_id, model.config.empty_token, window)
    if task == "ppl":
        one_slot = FirstSlot(model)
        result = monostep_block_loss(one_slot, batches)
        nats = result["loss"]
        n_bytes = len(tokenizer.decode([t for p, a in pairs for t in p + a]).encode("utf-8"))
        out = {"task": "ppl", "tokens": result["tokens"], "nats_per_token": nats, "perplexity": math.exp(nats),
               "bits_per_byte": nats * result["tokens"] / math.log(2) / max(n_bytes, 1)}
        return out, (f"{out['tokens']:,} tokens (slot 0): {nats:.4f} nats/token, perplexity "
                     f"{out['perplexity']:.2f}, {out['bits_per_byte']:.4f} bits/byte")
    result = monostep_block_loss(model, batches)
    summary = (f"block cross-entropy (nats/token): {result['loss']:.4f}; per slot: " +
               ", ".join(f"slot {k} {l:.4f}" for k, l in enumerate(result["slot_losses"])))
    return {"task": "loss", "loss": result["loss"], "head_losses": result["slot_losses"]}, summary


class FirstSlot:
    """A Monostep model seen through slot 0 alone: [B, 1, V] logits of the next token."""

    def __init__(self, model: Monostep):
        self.model, self.device = model, model.device

    def __call__(self, ids, mask):
        return self.model(ids, mask)[:, :1]
