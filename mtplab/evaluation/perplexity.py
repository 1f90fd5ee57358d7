"""Perplexity of text under head 0, with a sliding window (every token scored once, each with up to
`window - stride` tokens of context beyond its own chunk), reported per token and per byte."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models.transformer import Transformer


@torch.no_grad()
def perplexity(model: Transformer, ids: list[int], n_bytes: int, window: int | None = None,
               stride: int | None = None) -> dict:
    """nats/token, perplexity and bits per byte of `ids` (the encoding of `n_bytes` UTF-8 bytes).
    Each forward sees `window` tokens and scores only the last `stride` of them (the first window
    scores all), so every token after the first is predicted exactly once."""
    window = window or model.config.max_seq_len
    stride = stride or max(1, window // 2)
    if len(ids) < 2:
        raise ValueError("need at least two tokens to score")
    total, count, end = 0.0, 0, 1  # tokens [0, end) have been scored (token 0 has no prediction)
    while end < len(ids):
        stop = min(len(ids), end + stride)
        start = max(0, stop - window - 1)
        chunk = torch.tensor([ids[start:stop]], device=model.device)
        logits = model(chunk[:, :-1], n_heads=1)[0][0]  # predicts chunk[1:]
        targets = chunk[0, 1:]
        first = end - start - 1  # position in `targets` of the first token not yet scored
        total += float(F.cross_entropy(logits[first:].float(), targets[first:], reduction="sum"))
        count += len(targets) - first
        end = stop
    nats = total / count
    return {"tokens": count, "nats_per_token": nats, "perplexity": math.exp(nats),
            "bits_per_byte": total / math.log(2) / max(n_bytes, 1)}
