"""`MonostepConfig`: a Monostep model's [model] settings, under config.json's usual keys.

Monostep reads vocab_size, vocab_real, d_model, n_layers, n_heads, max_seq_len, n_future (its
slots), dropout and empty_token; it keeps the causal decoder's other fields at their defaults, so
that config.json holds the same keys as every checkpoint's (`arch` = "monostep" first, empty_token
last) and the shared stages (serving limits, summaries) read one shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import ModelConfig


@dataclass
class MonostepConfig(ModelConfig):
    arch: ClassVar[str] = "monostep"
    vocab_multiple: ClassVar[int] = 1  # sized to the tokenizer exactly (GPT-2 + five specials: 50262)
    empty_token: int = -1  # id of <empty>, the slot-padding label (never scored or emitted)
