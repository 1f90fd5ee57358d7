"""Building blocks of the causal trunk: norms, rotary positions, attention with a KV cache, MLPs.

Shapes: B batch, T new positions, S = cache length + T, D d_model, H query heads, Hkv key/value
heads, hd head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .kv_cache import KVCache


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


class Rotary(nn.Module):
    """Rotary position embedding, split-half layout (dims i and i + hd/2 form a pair)."""

    def __init__(self, head_dim: int, max_len: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # [L, hd/2]
        # Full-width tables so that rotating is x*cos + roll(x)*sin: 4 kernels, not 8.
        self.register_buffer("cos", torch.cat([angles.cos(), angles.cos()], -1), persistent=False)
        self.register_buffer("sin", torch.cat([-angles.sin(), angles.sin()], -1), persistent=False)
        self._memo: tuple = (None, None)  # every layer of one forward asks for the same positions

    def _tables(self, start: int, t: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (start, t, dtype, self.cos.device)
        if self._memo[0] != key:
            self._memo = (key, (self.cos[start:start + t].to(dtype), self.sin[start:start + t].to(dtype)))
        return self._memo[1]

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        # x: [B, H, T, hd]
        cos, sin = self._tables(start, x.size(2), x.dtype)
        return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


class AttentionMask:
    """How new positions may attend: causal among themselves, everything already in the cache."""

    def __init__(self, start: int, length: int, device: torch.device):
        self.start = start
        self.is_causal = start == 0 and length > 1
        self.mask = None
        if start > 0 and length > 1:
            keys = torch.arange(start + length, device=device)
            queries = torch.arange(start, start + length, device=device)
            self.mask = keys[None, :] <= queries[:, None]  # [T, S]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = config.n_heads, config.kv_heads, config.head_dim
        d, bias = config.d_model, config.bias
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, d, bias=bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, mask: AttentionMask, rotary: Rotary | None,
                cache: KVCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.v_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        if rotary is not None:  # q and k in one rotation
            q, k = rotary(torch.cat([q, k], dim=1), mask.start).split([self.n_heads, self.n_kv], dim=1)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, Hkv, S, hd]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.mask, is_causal=mask.is_causal,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, f, bias = config.d_model, config.ff_dim, config.bias
        self.kind = config.mlp
        if self.kind == "swiglu":
            self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        elif self.kind == "relu2":
            h = F.relu(self.up_proj(x)).square()
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")
        return self.down_proj(h)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = config.dropout

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        # no module call when there is no dropout: decoding pays per call, not per flop
        return F.dropout(x, self.dropout, True) if self.dropout and self.training else x

    def forward(self, x: torch.Tensor, mask: AttentionMask, rotary: Rotary | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self._drop(self.attn(self.attn_norm(x), mask, rotary, cache))
        return x + self._drop(self.mlp(self.mlp_norm(x)))


def init_weights(module: nn.Module, std: float, n_layers: int) -> None:
    """Normal(0, std) for matrices, GPT-2's 1/sqrt(2*layers) for projections into the residual."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            if name.endswith("bias"):
                nn.init.zeros_(p)
            continue
        scale = 1.0 / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
        nn.init.normal_(p, mean=0.0, std=std * scale)
