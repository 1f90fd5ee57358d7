"""Multi-token prediction head families. Head k predicts token t+1+k from position t.

All heads end in the model's shared final norm and unembedding; a head here only produces the
hidden state [B, T_k, D] that feeds them.

- parallel (Gloeckle et al. 2024, seed 001): head k is its own stack of blocks on the trunk output.
- sequential (DeepSeek-V3 §2.2, seed 002): head 0 is the trunk itself; module k >= 1 mixes the
  previous depth's hidden state with the embedding of token t+k and runs one block, so depth k can
  only be computed where token t+k is known (T - k positions).
- medusa (Cai et al. 2024): head 0 is the trunk itself; head k >= 1 is a residual SiLU block on the
  final normed hidden state and a vocabulary projection of its own (not the shared unembedding).
- slots (seed 000 on a causal trunk): slot k maps [x_t, h_{k-1}] to h_k = norm(h_{k-1} + MLP(...))
  with h_{-1} a learned init state, where x_t is the normed trunk state at position t (Monostep's
  pooled prefix summary, made causal so every block start of a sequence trains in one pass).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .kv_cache import KVCache
from .layers import AttentionMask, Block, Rotary, make_norm
from .stacked import StackedBlocks


class ParallelHeads(nn.Module):
    chained = False  # every head reads the trunk output
    shared_unembedding = True

    def __init__(self, config: ModelConfig, first_layer: int):
        super().__init__()
        per = config.head_layers
        self.heads = nn.ModuleList(
            nn.ModuleList(Block(config, first_layer + k * per + j) for j in range(per))
            for k in range(config.n_future))
        self.n_layers = config.n_future * per
        self.first_layer = first_layer
        self.stackable = config.plain_blocks  # StackedBlocks knows only the plain block's parts
        self._stacked: dict[int, list] = {}

    def set_first_layer(self, first_layer: int) -> None:
        """Move the heads' cache layers behind a trunk that uses `first_layer` of them (a looped
        trunk's count depends on its think loops)."""
        if first_layer == self.first_layer:
            return
        per = len(self.heads[0])
        for k, head in enumerate(self.heads):
            for j, block in enumerate(head):
                block.attn.layer_idx = first_layer + k * per + j
        self.first_layer = first_layer
        self._stacked = {}

    def hidden_all(self, n: int, h_in: torch.Tensor, rotary: Rotary | None, mask: AttentionMask,
                   cache: KVCache | None = None) -> list[torch.Tensor]:
        """Heads 0..n-1 at once, layer j of every head batched together (inference only)."""
        if n not in self._stacked:
            per = len(self.heads[0])
            # Head k's layer j sits at cache layer first + k*per + j: batch only when contiguous.
            self._stacked[n] = [StackedBlocks([self.heads[k][j] for k in range(n)], self.first_layer + j)
                                for j in range(per)] if per == 1 and self.stackable else None
        stacks = self._stacked[n]
        if stacks is None:
            return [self.hidden(k, h_in, None, None, rotary, mask, cache) for k in range(n)]
        x = h_in.unsqueeze(0).expand(n, *h_in.shape)
        for stack in stacks:
            x = stack(x, mask, rotary, cache)
        return list(x.unbind(0))

    def hidden(self, k: int, h_in: torch.Tensor, ids: torch.Tensor, embed: Callable,
               rotary: Rotary | None, mask: AttentionMask, cache: KVCache | None = None) -> torch.Tensor:
        x = h_in  # [B, T, D]
        for block in self.heads[k]:
            x = block(x, mask, rotary, cache)
        return x


class SequentialModule(nn.Module):
    """DeepSeek-V3 MTP module: eh_proj([enorm(Emb(x_{t+k})); hnorm(h^{k-1}_t)]) -> block.
    The embedding comes first in the concatenation, as in the DeepSeek-V3 release."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = make_norm(config)
        self.hnorm = make_norm(config)
        self.eh_proj = nn.Linear(2 * config.d_model, config.d_model, bias=False)
        self.block = Block(config, layer_idx)


class SequentialHeads(nn.Module):
    chained = True  # depth k reads depth k-1
    shared_unembedding = True

    def __init__(self, config: ModelConfig, first_layer: int):
        super().__init__()
        # Each module keeps its own cache group, so its blocks are layer 0 of that group.
        self.modules_ = nn.ModuleList(SequentialModule(config, 0) for _ in range(config.n_future - 1))
        self.n_layers = 0  # none of these blocks live in the trunk's cache

    def hidden(self, k: int, h_in: torch.Tensor, ids: torch.Tensor, embed: Callable,
               rotary: Rotary | None, mask: AttentionMask, cache: KVCache | None = None) -> torch.Tensor:
        if k == 0:
            return h_in
        if cache is not None:
            raise ValueError("sequential depths keep caches of their own: use run_module")
        t = h_in.size(1) - 1  # depth k-1 covers one more position than depth k
        return self.run_module(k, h_in[:, :t], ids[:, k:k + t], embed, rotary)

    def run_module(self, k: int, h_prev: torch.Tensor, next_ids: torch.Tensor, embed: Callable,
                   rotary: Rotary | None, cache: KVCache | None = None) -> torch.Tensor:
        """Depth k at positions i..j: h_prev = depth k-1 there [B, n, D], next_ids = x_{i+k..j+k}.
        With a cache (this module's own, one layer), the positions continue the cached ones."""
        module = self.modules_[k - 1]
        x = module.eh_proj(torch.cat([module.enorm(embed(next_ids)), module.hnorm(h_prev)], dim=-1))
        start = cache.length if cache is not None else 0
        out = module.block(x, AttentionMask(start, x.size(1), x.device), rotary, cache)
        if cache is not None:
            cache.advance(x.size(1))
        return out


class MedusaHeads(nn.Module):
    chained = False
    shared_unembedding = False  # each head projects to the vocabulary itself

    def __init__(self, config: ModelConfig, first_layer: int):
        super().__init__()
        d, extra = config.d_model, config.n_future - 1
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(extra))
        self.lm_heads = nn.ModuleList(nn.Linear(d, config.vocab_size, bias=False) for _ in range(extra))
        self.n_layers = 0

    def reset_parameters(self, unembedding: torch.Tensor) -> None:
        """Medusa's start: the residual branch is zero and every head copies the unembedding, so
        each head begins with exactly head 0's distribution."""
        with torch.no_grad():
            for block, lm_head in zip(self.blocks, self.lm_heads):
                block.weight.zero_()
                block.bias.zero_()
                lm_head.weight.copy_(unembedding)

    def hidden(self, k: int, h_in: torch.Tensor, ids: torch.Tensor, embed: Callable,
               rotary: Rotary | None, mask: AttentionMask, cache: KVCache | None = None) -> torch.Tensor:
        return h_in  # the heads work on the normed trunk output, in `logits`

    def logits(self, k: int, normed: torch.Tensor) -> torch.Tensor:
        x = normed + F.silu(self.blocks[k - 1](normed))
        return self.lm_heads[k - 1](x)


class Slot(nn.Module):
    """One slot: a residual GELU MLP over [x_t, h_prev] and a norm (seed 000's `Slot` minus its own
    vocabulary projection: slots here share the model's unembedding)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.d_model
        self.ff = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, d))
        self.norm = make_norm(config)

    def forward(self, x: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        return self.norm(h_prev + self.ff(torch.cat([x, h_prev], dim=-1)))


class SlotHeads(nn.Module):
    chained = False  # each head is computed from the trunk output (through the slots before it)
    shared_unembedding = True

    def __init__(self, config: ModelConfig, first_layer: int):
        super().__init__()
        self.in_norm = make_norm(config)
        self.init_state = nn.Parameter(torch.zeros(config.d_model))
        self.slots = nn.ModuleList(Slot(config) for _ in range(config.n_future))
        self.n_layers = 0  # no attention: nothing in the cache

    def hidden_all(self, n: int, h_in: torch.Tensor, rotary: Rotary | None = None,
                   mask: AttentionMask | None = None, cache: KVCache | None = None) -> list[torch.Tensor]:
        """Slots 0..n-1 along one chain: [B, T, D] each."""
        x = self.in_norm(h_in)
        h, out = self.init_state.expand_as(x), []
        for slot in self.slots[:n]:
            h = slot(x, h)
            out.append(h)
        return out

    def hidden(self, k: int, h_in: torch.Tensor, ids: torch.Tensor, embed: Callable,
               rotary: Rotary | None, mask: AttentionMask, cache: KVCache | None = None) -> torch.Tensor:
        # Recomputing slots < k costs a few small MLPs and lets each head's loss back-propagate on
        # its own (losses.backward_heads), gradients reaching the earlier slots it depends on.
        return self.hidden_all(k + 1, h_in)[k]
