"""The model class a `ModelConfig` describes: the causal decoder, or seed 000's Monostep."""

from __future__ import annotations

import torch.nn as nn

from ..config import ModelConfig


def build_model(config: ModelConfig) -> nn.Module:
    if config.arch == "monostep":
        from .monostep import Monostep

        return Monostep(config)
    from .transformer import Transformer

    return Transformer(config)
