"""Seed 000's loss: cross-entropy of the next block's SLOTS tokens, predicted from each block start.

For a Monostep model that is its training loss on the (prefix, block) samples. A causal model with
SLOTS heads is scored on exactly the same predictions: at the last position of each prefix, head k
predicts the block's token k. `<empty>` fill is never scored. Both return the mean over every scored
token (all slots pooled) and the mean of each slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.blocks import BlockBatches


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
