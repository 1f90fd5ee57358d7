"""Monostep (pooled-encoder block prediction): a pooled Transformer encoder and SLOTS chained slots.

The prefix is encoded bidirectionally (padding masked), mean-pooled and normed into one vector
h_shared; slot k then maps [h_shared, h_{k-1}] to h_k (residual MLP + LayerNorm, h_{-1} a learned
init_state) and h_k to the vocabulary, so one forward yields a block of SLOTS next tokens. Module
and parameter names equal the published model's `Trunk`, `Slot` and `Monostep` classes, so its
`model_state_dict` loads with strict=True; at its card's config (vocab 50262, d 64, 4 layers,
4 heads, max_len 512, 4 slots) that is 16,567,960 parameters.

There is no KV cache: every block re-encodes the whole prefix (its summary is not causal).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models.transformer import mask_padded_ids
from .config import MonostepConfig


class Trunk(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, max_len: int,
                 dropout: float = 0.1):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        # no nested tensors: they only apply to post-norm layers and warn otherwise
        self.encoder = nn.TransformerEncoder(layer, num_layers=n_layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(d_model)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids [B, T], mask [B, T] (True = real token) -> h_shared [B, D]."""
        positions = torch.arange(ids.size(1), device=ids.device)
        x = self.encoder(self.tok_emb(ids) + self.pos_emb(positions), src_key_padding_mask=~mask)  # [B, T, D]
        weight = mask.unsqueeze(-1).to(x.dtype)  # [B, T, 1]
        return self.out_norm((x * weight).sum(1) / weight.sum(1).clamp_min(1.0))


class Slot(nn.Module):
    def __init__(self, d_model: int, vocab_size: int):
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(2 * d_model, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.norm = nn.LayerNorm(d_model)
        self.to_vocab = nn.Linear(d_model, vocab_size)

    def forward(self, h_shared: torch.Tensor, h_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, D], [B, D] -> (h [B, D], logits [B, V])."""
        h = self.norm(h_prev + self.ff(torch.cat([h_shared, h_prev], dim=-1)))
        return h, self.to_vocab(h)


class Monostep(nn.Module):
    def __init__(self, config: MonostepConfig):
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError("model.vocab_size must be set before building the model")
        self.config = config
        d = config.d_model
        self.trunk = Trunk(config.vocab_size, d, config.n_layers, config.n_heads, config.max_seq_len,
                           config.dropout)
        self.init_state = nn.Parameter(torch.zeros(d))
        self.slots = nn.ModuleList(Slot(d, config.vocab_size) for _ in range(config.n_future))

    @property
    def n_future(self) -> int:
        return len(self.slots)

    @property
    def device(self) -> torch.device:
        return self.init_state.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T] (right-padded where mask is False) -> logits [B, SLOTS, V] of the next block."""
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        h_shared = self.trunk(ids, mask)
        h = self.init_state.expand(ids.size(0), -1)
        logits = []
        for slot in self.slots:
            h, out = slot(h_shared, h)
            logits.append(out)
        # rows beyond the tokenizer's ids (if any) are never emitted or scored
        return mask_padded_ids(torch.stack(logits, dim=1), self.config.real_vocab_size)
