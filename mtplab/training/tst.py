"""Token Superposition Training (TST, arXiv 2605.06546; AOMTS's variant for MTP heads).

Phase 1 (the first `tst_fraction` of the steps): s*T raw tokens are cut into T non-overlapping bags of
s tokens; each bag's token embeddings are *averaged* into one input position, so the trunk runs at
length T while reading s times more text. Position i has seen bags 0..i, i.e. raw tokens up to
(i+1)s-1, and the main head predicts the whole next bag, raw tokens [(i+1)s, (i+2)s), with the
multi-hot cross-entropy: the mean of the s cross-entropies of one set of logits.

MTP head d predicts that bag shifted d raw tokens forward, [(i+1)s+d, (i+2)s+d) (AOMTS's rule, so
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
from ..data.batches import PackedBatches
from ..errors import MtplabError
from ..models.layers import AttentionMask
from ..models.transformer import Transformer
from . import distributed
from .losses import backward_by_head


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
    of sum_d weights[d] * MCE_d (times `scale`) and return each MCE_d. The head-at-a-time backward
    of next-token training (losses.backward_by_head): one trunk pass, one head's logits alive at a
    time. counts[d] divides head d's summed loss (default: B*T; data-parallel ranks pass the global
    count)."""
    n = model.n_future
    length = (raw.size(1) - (n - 1)) // bag - 1
    if length < 1:
        raise ValueError(f"a TST row of {raw.size(1)} tokens holds no bag to predict")
    embed = functools.partial(bag_embeddings, model)
    mask = AttentionMask(0, length, raw.device)
    with autocast():
        h = model.trunk(None, mask, embeds=embed(bags(raw, bag, length)))
    targets = tst_targets(raw, bag, length, n)

    def future(d: int) -> torch.Tensor:  # what sequential depth d reads: the bags d raw tokens on
        return embed(bags(raw, bag, length, d))

    def hidden(d: int, trunk: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        return model.heads.hidden(d, trunk, prev, future, model.rotary, mask)

    def loss(d: int, h_d: torch.Tensor) -> torch.Tensor:
        with autocast():
            logits = model.head_logits(d, h_d)
        total = multi_hot_loss(logits, targets[d])
        return total / max(targets[d].size(0) * length if counts is None else counts[d], 1)

    return backward_by_head(n, h, hidden, loss, weights, scale, autocast)


class Superposition:
    """Phase 1 as the training loop sees it: which steps it covers, its micro-steps (a batch of raw
    windows from its own reader of the training token stream, and their backward), the optimizer
    and schedule restart of `train.tst_reset_optimizer`, and its reader's position for checkpoints.
    With TST off (or a phase 1 of no steps) it covers nothing and holds no reader."""

    def __init__(self, config: Config, dataset, n_heads: int):
        t = config.train
        self.steps, self.bag, self.seq_len = phase1_steps(config), t.tst_bag, config.data.seq_len
        self.reset = t.tst_reset_optimizer and self.steps > 0
        self.batches = None  # longer windows of the same token stream
        if self.steps:
            window = window_length(self.seq_len, self.bag, n_heads)
            try:
                self.batches = PackedBatches(dataset.train.tokens, window - 1, t.batch_size, t.seed)
            except ValueError as exc:
                raise MtplabError(f"data: TST phase 1 needs rows of {window} tokens: {exc}") from None

    def covers(self, step: int) -> bool:
        return step < self.steps

    def restarts_optimizer(self, step: int) -> bool:
        """The ablation: phase 2 starts from a fresh optimizer."""
        return self.reset and step == self.steps

    def schedule_offset(self, step: int) -> int:
        """A reset also restarts the schedule: phase 2 then warms up and decays on its own."""
        return self.steps if self.reset and step >= self.steps else 0

    def micro_step(self, model: Transformer, rows: slice, device: torch.device, ranks: distributed.Ranks,
                   weights: list[float], scale: float, autocast) -> tuple[list[float], int]:
        """One phase-1 micro-batch's backward: each head's loss, and the raw tokens it read."""
        raw = self.batches.next_windows(rows).to(device, non_blocking=True)
        positions = raw.size(0) * self.seq_len
        counts = distributed.sum_(ranks, torch.tensor([positions] * model.n_future)).tolist()
        losses = backward_tst(model, raw, self.bag, weights, scale, autocast, counts)
        return losses, (raw.size(1) - model.n_future) * raw.size(0) * ranks.world

    def state_dict(self) -> dict | None:
        return None if self.batches is None else self.batches.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if self.batches is not None and state is not None:
            self.batches.load_state_dict(state)
