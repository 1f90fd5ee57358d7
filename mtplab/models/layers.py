"""Building blocks of the causal trunk: norms, rotary positions, attention with a KV cache, MLPs.

Shapes: B batch, T new positions, S = cache length + T, D d_model, H query heads, Hkv key/value
heads, hd head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .kv_cache import KVCache
from .layout import ff_dim


def make_norm(config: ModelConfig) -> nn.Module:
    affine = config.norm_affine  # nanochat's norms have no gain at all
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps, elementwise_affine=affine)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, elementwise_affine=affine,
                        bias=config.bias and affine)


class LowRankLinear(nn.Module):
    """A factored projection W = up @ down of rank r (the Nano Reasoning Model's LoRA-style
    layers): r*(in+out) parameters instead of in*out."""

    def __init__(self, d_in: int, d_out: int, rank: int, bias: bool):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def make_linear(d_in: int, d_out: int, config: ModelConfig) -> nn.Module:
    if config.low_rank:
        return LowRankLinear(d_in, d_out, config.low_rank, config.bias)
    return nn.Linear(d_in, d_out, bias=config.bias)


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

    def forward(self, x: torch.Tensor, mask: "AttentionMask") -> torch.Tensor:
        # x: [B, H, T, hd], or [n*B, H, T, hd] for n stacked heads over the same rows
        if mask.positions is None:
            cos, sin = self._tables(mask.start, x.size(2), x.dtype)
        else:  # a position per row: [B, 1, T, hd] tables, gathered once per mask and dtype
            if mask._rotary[0] != x.dtype:
                positions = mask.positions.clamp(0, self.cos.size(0) - 1)  # pads' slots lie outside
                mask._rotary = (x.dtype, self.cos[positions].unsqueeze(1).to(x.dtype),
                                self.sin[positions].unsqueeze(1).to(x.dtype))
            cos, sin = mask._rotary[1:]
            if x.size(0) != cos.size(0):
                cos, sin = (t.repeat(x.size(0) // t.size(0), 1, 1, 1) for t in (cos, sin))
        return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


class AttentionMask:
    """How new positions may attend: causal among themselves, everything already in the cache;
    a sliding-window layer additionally sees only keys fewer than `window` positions back.

    The plain mask has one start for every row (`start`, positions start..start+T-1). A ragged
    mask (`ragged`) has a cache length per row and optionally a key mask (padding) and explicit
    positions: then `mask` is [B, 1, T, S] and `positions` [B, T]."""

    def __init__(self, start: int, length: int, device: torch.device):
        self.start, self.length, self.device = start, length, device
        self.positions = None  # [B, T] when rows differ
        self.parents = None  # [B, T] a tree's: the new position each one follows (-1: the cache's end)
        self.is_causal = start == 0 and length > 1
        self.mask = None
        if start > 0 and length > 1:
            keys = torch.arange(start + length, device=device)
            queries = torch.arange(start, start + length, device=device)
            self.mask = keys[None, :] <= queries[:, None]  # [T, S]
        self._windowed: dict[int, torch.Tensor] = {}  # every layer with one window shares a mask
        self._query_cache_index = None  # ragged: [B, T] the cache slot each query's own key goes to
        self._rotary: tuple = (None,)  # (dtype, cos, sin) for per-row positions, shared by every layer

    @classmethod
    def ragged(cls, starts: list[int], length: int, device: torch.device,
               key_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
               parents: torch.Tensor | None = None) -> "AttentionMask":
        """Row b's new positions sit at cache slots starts[b]..starts[b]+T-1. key_mask [B, >=S]:
        slots a row may attend to (False: padding). positions [B, T]: position ids, by default
        the slots minus the padding before them. parents [B, T] (a tree of drafts): new position
        t follows parents[b, t] (-1: the row's cached end) and sees only its ancestors among the
        new positions; its position id is the cache's end plus its depth."""
        self = cls.__new__(cls)
        self.start, self.length, self.device, self.is_causal = None, length, device, False
        self._windowed, self._rotary, self.parents = {}, (None,), parents
        s = max(starts) + length
        query_index = torch.tensor(starts, device=device)[:, None] + torch.arange(length, device=device)
        self._query_cache_index = query_index
        keys = torch.arange(s, device=device)
        allowed = keys[None, None, :] <= query_index[:, :, None]  # [B, T, S] causal per row
        if parents is not None:
            within = tree_ancestors(parents)  # [B, T, T]
            allowed.scatter_(2, query_index[:, None, :].expand(-1, length, -1), within)
            positions = query_index[:, :1] + within.sum(-1) - 1  # the end plus the depth
        if key_mask is not None:
            key_mask = key_mask[:, :s].bool()
            # a padding query still sees itself: a row with no key at all would be NaN, and NaN
            # values poison the real queries that give them weight 0
            allowed &= key_mask[:, None, :] | (keys[None, None, :] == query_index[:, :, None])
            if positions is None:
                before = key_mask.long().cumsum(-1) - 1  # real slots before each one, minus one
                positions = before.gather(1, query_index).clamp_min(0)
        self.positions = positions if positions is not None else query_index
        self.mask = allowed.unsqueeze(1)
        return self

    def at(self, keep: torch.Tensor) -> "AttentionMask":
        """The mask of one query per row: new position keep[b] of row b ([B] indices into the T)."""
        out = AttentionMask.__new__(AttentionMask)
        out.start, out.length, out.device, out.is_causal = None, 1, self.device, False
        out._windowed, out._rotary = {}, (None,)
        if self._query_cache_index is None:  # plain: every row starts at `start`
            query_index = self.start + keep[:, None]  # [B, 1]
            keys = torch.arange(self.start + self.length, device=self.device)
            out.mask = (keys[None, None, :] <= query_index[:, :, None]).unsqueeze(1)  # [B, 1, 1, S]
            out._query_cache_index = out.positions = query_index
        else:
            out._query_cache_index = self._query_cache_index.gather(1, keep[:, None])
            out.mask = self.mask.gather(2, keep[:, None, None, None].expand(-1, 1, 1, self.mask.size(-1)))
            out.positions = self.positions.gather(1, keep[:, None])
        return out

    def for_window(self, window: int) -> tuple[torch.Tensor | None, bool]:
        """(attn_mask, is_causal) for a layer with this window (0: full)."""
        if self._query_cache_index is not None:
            if not window or self.mask.size(-1) <= window:
                return self.mask, False
            if window not in self._windowed:
                keys = torch.arange(self.mask.size(-1), device=self.device)
                # slots back (= positions back); a tree node's own position is its depth's
                query = self._query_cache_index if self.parents is None else self.positions
                back = query[:, None, :, None] - keys  # [B, 1, T, S]
                self._windowed[window] = self.mask & (back < window)
            return self._windowed[window], False
        if not window or self.start + self.length <= window:  # every key is within reach
            return self.mask, self.is_causal
        if window not in self._windowed:
            keys = torch.arange(self.start + self.length, device=self.device)
            queries = torch.arange(self.start, self.start + self.length, device=self.device)
            back = queries[:, None] - keys[None, :]  # [T, S] how far back each key lies
            self._windowed[window] = (back >= 0) & (back < window)
        return self._windowed[window], False


def tree_ancestors(parents: torch.Tensor) -> torch.Tensor:
    """parents [B, T] (each position's parent among them, -1 for a root) -> [B, T, T] bool:
    [b, t, u] when u is t or one of its ancestors."""
    b, t = parents.shape
    eye = torch.eye(t, device=parents.device)
    step = torch.zeros(b, t, t + 1, device=parents.device).scatter_(2, parents[..., None] % (t + 1), 1.0)
    reach = eye + step[..., :t]  # itself and its parent (a root's -1 lands in the dropped column)
    for _ in range(max(t - 1, 1).bit_length()):  # doubling: paths of up to 2^i steps
        reach = (reach @ reach).clamp_max_(1.0)
    return reach.bool()


class Attention(nn.Module):
    """GQA attention. Optional: QK-norm after RoPE, a sliding window, and a value embedding
    (ResFormer) added to v through a per-kv-head gate 3*sigmoid(W x[..., :channels])."""

    def __init__(self, config: ModelConfig, layer_idx: int, window: int = 0, value_embed: bool = False):
        super().__init__()
        self.layer_idx = layer_idx  # cache layer, unless the caller names another (loops)
        self.n_heads, self.n_kv, self.hd = config.n_heads, config.kv_heads, config.head_dim
        d = config.d_model
        self.q_proj = make_linear(d, self.n_heads * self.hd, config)
        self.k_proj = make_linear(d, self.n_kv * self.hd, config)
        self.v_proj = make_linear(d, self.n_kv * self.hd, config)
        self.o_proj = make_linear(self.n_heads * self.hd, d, config)
        self.dropout = config.dropout
        self.window = window
        self.qk_scale = config.qk_scale if config.qk_norm else None
        self.eps = config.norm_eps
        self.ve_gate = nn.Linear(config.ve_gate_channels, self.n_kv, bias=False) if value_embed else None

    def forward(self, x: torch.Tensor, mask: AttentionMask, rotary: Rotary | None,
                cache: KVCache | None, layer: int | None = None,
                ve: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, D] -> [B, T, D]; with `keep` ([B] positions) every position's key and value but
        only position keep[b]'s output: [B, 1, D] (a prefill whose other outputs nobody reads)."""
        b, t, _ = x.shape
        if keep is not None:
            return self._forward_at(x, mask, rotary, cache, layer, ve, keep)
        q = self.q_proj(x).view(b, t, self.n_heads, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.v_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        if self.ve_gate is not None and ve is not None:  # ve: [B, T, Hkv*hd], this token's row
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))  # [B, T, Hkv]
            v = v + gate.transpose(1, 2).unsqueeze(-1) * ve.view(b, t, self.n_kv, self.hd).transpose(1, 2)
        if rotary is not None:  # q and k in one rotation
            q, k = rotary(torch.cat([q, k], dim=1), mask).split([self.n_heads, self.n_kv], dim=1)
        if self.qk_scale is not None:  # after RoPE: the norm is rotation-invariant either way
            q = F.rms_norm(q, (self.hd,), eps=self.eps) * self.qk_scale
            k = F.rms_norm(k, (self.hd,), eps=self.eps) * self.qk_scale
        if cache is not None:
            k, v = cache.update(self.layer_idx if layer is None else layer, k, v)  # [B, Hkv, S, hd]
        attn_mask, is_causal = mask.for_window(self.window)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.hd))

    def _forward_at(self, x, mask, rotary, cache, layer, ve, keep):
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.v_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        if self.ve_gate is not None and ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))
            v = v + gate.transpose(1, 2).unsqueeze(-1) * ve.view(b, t, self.n_kv, self.hd).transpose(1, 2)
        at = mask.at(keep)
        q = self.q_proj(x[torch.arange(b, device=x.device), keep]).view(b, 1, self.n_heads, self.hd).transpose(1, 2)
        if rotary is not None:
            q, k = rotary(q, at), rotary(k, mask)
        if self.qk_scale is not None:
            q = F.rms_norm(q, (self.hd,), eps=self.eps) * self.qk_scale
            k = F.rms_norm(k, (self.hd,), eps=self.eps) * self.qk_scale
        if cache is not None:
            k, v = cache.update(self.layer_idx if layer is None else layer, k, v)
        attn_mask, _ = at.for_window(self.window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, 1, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, f = config.d_model, ff_dim(config)
        self.kind = config.mlp
        if self.kind == "swiglu":
            self.gate_proj = make_linear(d, f, config)
        self.up_proj = make_linear(d, f, config)
        self.down_proj = make_linear(f, d, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        elif self.kind == "relu2":
            h = F.relu(self.up_proj(x)).square()
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")
        return self.down_proj(h)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    With `grad_checkpointing` on, a training forward keeps only the block's input and recomputes
    its inside during backward (torch.utils.checkpoint, non-reentrant; dropout masks replay)."""

    grad_checkpointing = False

    def __init__(self, config: ModelConfig, layer_idx: int, window: int = 0, value_embed: bool = False):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_idx, window, value_embed)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = config.dropout

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        # no module call when there is no dropout: decoding pays per call, not per flop
        return F.dropout(x, self.dropout, True) if self.dropout and self.training else x

    def forward(self, x: torch.Tensor, mask: AttentionMask, rotary: Rotary | None = None,
                cache: KVCache | None = None, layer: int | None = None,
                ve: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, D] -> [B, T, D], or [B, 1, D] at positions `keep` (see Attention.forward)."""
        if keep is not None:
            a = self.attn(self.attn_norm(x), mask, rotary, cache, layer, ve, keep)
            x = x[torch.arange(x.size(0), device=x.device), keep].unsqueeze(1) + a
            return x + self.mlp(self.mlp_norm(x))
        if self.grad_checkpointing and self.training and cache is None and torch.is_grad_enabled():
            return checkpoint(self._forward, x, mask, rotary, cache, layer, ve, use_reentrant=False)
        return self._forward(x, mask, rotary, cache, layer, ve)

    def _forward(self, x: torch.Tensor, mask: AttentionMask, rotary: Rotary | None,
                 cache: KVCache | None, layer: int | None, ve: torch.Tensor | None) -> torch.Tensor:
        x = x + self._drop(self.attn(self.attn_norm(x), mask, rotary, cache, layer, ve))
        return x + self._drop(self.mlp(self.mlp_norm(x)))


def init_weights(module: nn.Module, std: float, n_layers: int) -> None:
    """Normal(0, std) for matrices, GPT-2's 1/sqrt(2*layers) for projections into the residual.
    A rank-r factor pair gets std sqrt(s/sqrt(r)) each, so that their product has std s."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            if name.endswith("bias"):
                nn.init.zeros_(p)
            continue
        into_residual = name.endswith(("o_proj.weight", "down_proj.weight", "o_proj.up.weight",
                                       "o_proj.down.weight", "down_proj.up.weight", "down_proj.down.weight"))
        s = std * (1.0 / math.sqrt(2 * n_layers) if into_residual else 1.0)
        if name.endswith((".up.weight", ".down.weight")):  # a LowRankLinear factor
            rank = min(p.shape)
            s = math.sqrt(s / math.sqrt(rank))
        nn.init.normal_(p, mean=0.0, std=s)
