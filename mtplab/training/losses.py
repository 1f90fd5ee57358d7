"""Multi-token prediction losses, and the training step that never holds every head's logits.

Head k at position t is scored against labels[:, t + k] (labels are already the next tokens), so
labels that are IGNORE (prompt, padding) are skipped for every head alike; one head's cross-entropy
is `evaluation.head_loss.head_loss`, shared with the evaluations.

`backward_heads` follows Gloeckle et al.: the trunk runs once; each head runs against a detached copy
of its input, its [B, T, V] logits are scored and back-propagated at once and freed, and the
gradients gathered on the detached inputs are finally pushed through the trunk in one backward.
Peak memory is then one head's logits, whatever the number of heads. `backward_by_head` is that
skeleton for any per-head objective: next-token cross-entropy here, TST's multi-hot loss (tst.py).

Logits carry -inf at the padded vocabulary ids (see transformer.py); the losses cut those columns
off first, so that label smoothing spreads its mass over the real tokens only (over a -inf logit
it would make the loss infinite). Labels are always real ids.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..data.batches import IGNORE
from ..evaluation.head_loss import head_loss
from ..models.layers import AttentionMask
from ..models.transformer import Transformer


def head_weights(config: ModelConfig) -> list[float]:
    """The weight of each head's loss in the training objective: model.loss_weights; else, with
    model.mtp_lambda > 0, DeepSeek-V3's 1 for the next-token head and lambda shared by the others;
    else the mean over the heads."""
    if config.loss_weights:
        return [float(w) for w in config.loss_weights]
    if config.mtp_lambda > 0 and config.n_future > 1:
        extra = config.n_future - 1
        return [1.0] + [config.mtp_lambda / extra] * extra
    return [1.0 / config.n_future] * config.n_future


def scored_head_loss(model: Transformer, k: int, h: torch.Tensor, labels: torch.Tensor,
                     autocast=contextlib.nullcontext, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """`head_loss` of head k's hidden states h [B, T_k, D], unembedding only the positions that have
    a label: the prompt and padding of chat batches (often half the rows) cost no [V]-wide logits."""
    targets = labels[:, k:k + h.size(1)]
    scored = targets != IGNORE  # [B, T_k]
    with autocast():
        logits = model.head_logits(k, h[:, :targets.size(1)][scored])  # [N, V]
    logits = logits[:, :model.config.real_vocab_size]
    total = F.cross_entropy(logits.float(), targets[scored], reduction="sum", label_smoothing=label_smoothing)
    return total, int(scored.sum())


def label_counts(labels: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[n_heads] number of tokens each head is scored on (head k skips the first k labels)."""
    return torch.stack([(labels[:, k:] != IGNORE).sum() for k in range(n_heads)])


def backward_heads(model: Transformer, ids: torch.Tensor, labels: torch.Tensor, weights: list[float],
                   scale: float = 1.0, autocast=contextlib.nullcontext,
                   counts: list[int] | None = None, label_smoothing: float = 0.0) -> list[float]:
    """Accumulate gradients of sum_k weights[k] * CE_k (times `scale`); return each CE_k.
    CE_k is head k's summed cross-entropy divided by counts[k] (default: this batch's own token
    count, i.e. the mean); data-parallel ranks pass the global batch's count. Pads are already
    IGNORE in `labels` (see `mask_pad`), so counts and losses agree."""
    mask = AttentionMask(0, ids.size(1), ids.device)
    with autocast():
        h = model.trunk(ids, mask)  # [B, T, D]

    def hidden(k: int, trunk: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        return model.head_hidden(k, trunk, prev, ids, mask)

    def loss(k: int, h_k: torch.Tensor) -> torch.Tensor:
        total, count = scored_head_loss(model, k, h_k, labels, autocast, label_smoothing)
        return total / max(count if counts is None else counts[k], 1)

    return backward_by_head(model.n_future, h, hidden, loss, weights, scale, autocast)


def backward_by_head(n_heads: int, h: torch.Tensor, hidden, loss, weights: list[float], scale: float = 1.0,
                     autocast=contextlib.nullcontext) -> list[float]:
    """The head-at-a-time backward (see the top of this file), for any objective: from the trunk
    output h [B, T, D], `hidden(k, trunk, prev)` gives head k's hidden state and `loss(k, h_k)`
    its mean loss. Accumulates the gradients of sum_k weights[k] * loss_k (times `scale`) and
    returns each loss_k. Next-token training (`backward_heads`) and TST's phase 1 use it."""
    trunk_out = h.detach().requires_grad_()
    # Head hidden states stay alive (each [B, T, D]); their logits ([B, T, V]) never do together.
    outputs, detached = [], []
    prev = trunk_out
    for k in range(n_heads):
        with autocast():
            out = hidden(k, trunk_out, prev)
        leaf = out.detach().requires_grad_()
        outputs.append(out)
        detached.append(leaf)
        prev = leaf
    losses = [0.0] * n_heads
    for k in reversed(range(n_heads)):  # deepest first: its gradient feeds depth k-1
        mean = loss(k, detached[k])  # the logits it made are freed once its backward ran
        losses[k] = mean.item()
        (mean * weights[k] * scale).backward()
        del mean
        if outputs[k] is not detached[k] and detached[k].grad is not None:
            outputs[k].backward(detached[k].grad)  # into the head's weights and its input
    if trunk_out.grad is not None and h.requires_grad:  # a frozen trunk needs no backward
        h.backward(trunk_out.grad)
    return losses


def backward_all_heads(model: Transformer, ids: torch.Tensor, labels: torch.Tensor, weights: list[float],
                       scale: float = 1.0, autocast=contextlib.nullcontext,
                       counts: list[int] | None = None, label_smoothing: float = 0.0) -> list[float]:
    """The same gradients and return value as `backward_heads`, from one forward through the model
    and one backward: every head's logits are alive at once. FSDP needs this form (its hooks run
    on the model's own forward)."""
    with autocast():
        all_logits = model(ids)
    total_loss, losses = 0.0, []
    for k, logits in enumerate(all_logits):
        total, count = head_loss(logits, labels, k, label_smoothing, vocab=model.config.real_vocab_size)
        mean = total / max(count if counts is None else counts[k], 1)
        losses.append(mean.item())
        total_loss = total_loss + mean * weights[k]
    (total_loss * scale).backward()
    return losses


def weighted_loss(losses: list[float], weights: list[float]) -> float:
    """The training objective from each head's loss: sum_k weights[k] * loss_k."""
    return float(sum(l * w for l, w in zip(losses, weights)))
