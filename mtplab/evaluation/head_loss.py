"""The cross-entropy of one head against its labels: what training minimises and `mtplab eval
--task loss` and training's evaluations report, in one place so the two can never disagree.

Head k at position t is scored against labels[:, t + k]; IGNORE labels (prompt, padding) are skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.batches import IGNORE
from ..models.transformer import Transformer


def mask_pad(labels: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Labels with every pad token turned into IGNORE (the Nano Reasoning Model's pad-ignoring
    loss), so that a padded label is neither scored nor counted."""
    return labels if pad_id is None else labels.masked_fill(labels == pad_id, IGNORE)


def head_loss(logits: torch.Tensor, labels: torch.Tensor, k: int, label_smoothing: float = 0.0,
              pad_id: int | None = None, vocab: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of head k ([B, T_k, V] logits) and the number of scored tokens.
    label_smoothing: the target puts that much mass uniformly over the vocabulary (the NRM: 0.05);
    pad_id: labels equal to it are skipped like IGNORE; vocab: the real vocabulary size (the
    columns beyond it are padding, cut off)."""
    targets = mask_pad(labels, pad_id)[:, k:k + logits.size(1)]
    logits = logits[:, :targets.size(1), :vocab]
    total = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                            ignore_index=IGNORE, reduction="sum", label_smoothing=label_smoothing)
    return total, int((targets != IGNORE).sum())


@torch.no_grad()
def evaluate_heads(model: Transformer, batches) -> list[float]:
    """Mean cross-entropy (nats/token) of every head over an iterable of (inputs, labels)."""
    n = model.n_future
    totals, counts = [0.0] * n, [0] * n
    for ids, labels in batches:
        ids, labels = ids.to(model.device), labels.to(model.device)
        for k, logits in enumerate(model(ids)):
            total, count = head_loss(logits, labels, k, vocab=model.config.real_vocab_size)
            totals[k] += float(total)
            counts[k] += count
    return [t / max(c, 1) for t, c in zip(totals, counts)]
