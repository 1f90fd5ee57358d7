"""Learning-rate multipliers as functions of the step: linear warmup, then cosine, WSD or constant."""

from __future__ import annotations

import math


def lr_multiplier(step: int, total: int, warmup: int, schedule: str, min_ratio: float = 0.0,
                  decay_fraction: float = 0.1) -> float:
    """Multiplier in [min_ratio, 1] for the update made at `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":  # warmup, stable, then linear decay over the last decay_fraction to min
        decay_steps = max(1, round(total * decay_fraction))
        decay_start = total - decay_steps
        if step < decay_start:
            return 1.0
        progress = (step - decay_start + 1) / decay_steps
        return 1.0 - (1.0 - min_ratio) * min(progress, 1.0)
    progress = min(1.0, (step - warmup + 1) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
