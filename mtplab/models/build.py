"""The model class a `ModelConfig` describes: the causal decoder, or a registered architecture's."""

from __future__ import annotations

import torch.nn as nn

from ..architectures import architecture_of
from ..config import ModelConfig
from .transformer import Transformer


def build_model(config: ModelConfig) -> nn.Module:
    other = architecture_of(config)
    return Transformer(config) if other is None else other.build(config)
