"""The causal decoder: token embedding, positions, a trunk of pre-norm blocks, MTP heads, and the
shared final norm + unembedding. Every architecture choice is a `ModelConfig` flag."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .heads import MedusaHeads, ParallelHeads, SequentialHeads
from .kv_cache import KVCache
from .layers import AttentionMask, Block, Rotary, init_weights, make_norm

HEAD_FAMILIES = {"parallel": ParallelHeads, "sequential": SequentialHeads, "medusa": MedusaHeads}


class Transformer(nn.Module):
    stack_heads = True  # batch one-block heads at inference (off while FSDP shards the weights)

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError("model.vocab_size must be set before building the model")
        self.config = config
        d = config.d_model
        self.wte = nn.Embedding(config.vocab_size, d)
        self.wpe = nn.Embedding(config.max_seq_len, d) if config.pos == "learned" else None
        self.rotary = (Rotary(config.head_dim, config.max_seq_len, config.rope_base)
                       if config.pos == "rope" else None)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.heads = HEAD_FAMILIES[config.mtp](config, first_layer=config.n_layers)
        self.norm_f = make_norm(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        init_weights(self, config.init_std, config.n_layers + config.head_layers)
        if hasattr(self.heads, "reset_parameters"):
            self.heads.reset_parameters(self.unembedding)

    @property
    def n_future(self) -> int:
        return self.config.n_future

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- pieces, used one at a time by the memory-saving training step -------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wte(ids)

    def trunk(self, ids: torch.Tensor | None, mask: AttentionMask, cache: KVCache | None = None,
              embeds: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] ids -> [B, T, D] hidden states before the heads. `embeds` ([B, T, D]) replaces the
        token embedding, for inputs that are not single tokens (TST's averaged bags)."""
        x = self.wte(ids) if embeds is None else embeds
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(mask.start, mask.start + x.size(1), device=x.device))
        if self.config.dropout and self.training:
            x = F.dropout(x, self.config.dropout, True)
        for block in self.blocks:
            x = block(x, mask, self.rotary, cache)
        return x

    def head_hidden(self, k: int, h_in: torch.Tensor, ids: torch.Tensor, mask: AttentionMask,
                    cache: KVCache | None = None) -> torch.Tensor:
        """Head k's hidden state. h_in: the trunk output (parallel) or depth k-1 (sequential)."""
        return self.heads.hidden(k, h_in, ids, self.embed, self.rotary, mask, cache)

    @property
    def unembedding(self) -> torch.Tensor:
        return self.lm_head.weight if self.lm_head is not None else self.wte.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The shared final norm and unembedding (head 0's, and every head's that shares it)."""
        return F.linear(self.norm_f(h), self.unembedding)

    def head_logits(self, k: int, h: torch.Tensor) -> torch.Tensor:
        if k == 0 or self.heads.shared_unembedding:
            return self.logits(h)
        return self.heads.logits(k, self.norm_f(h))

    # -- whole forward -------------------------------------------------------------------------
    def new_cache(self, batch: int = 1, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        return KVCache(c.n_layers + self.heads.n_layers, batch, c.kv_heads, max_len or c.max_seq_len,
                       c.head_dim, device=self.device, dtype=dtype or self.wte.weight.dtype)

    def hidden_states(self, ids: torch.Tensor, cache: KVCache | None = None,
                      n_heads: int | None = None) -> list[torch.Tensor]:
        """Hidden states of the first `n_heads` heads, before the final norm: head k gives
        [B, T_k, D] (T_k = T, or T - k for sequential depths). With a cache, the new positions
        continue the cached ones and the cache advances by T."""
        n_heads = self.n_future if n_heads is None else n_heads
        start = cache.length if cache is not None else 0
        mask = AttentionMask(start, ids.size(1), ids.device)
        h = self.trunk(ids, mask, cache)
        if (self.stack_heads and hasattr(self.heads, "hidden_all") and n_heads > 1
                and not torch.is_grad_enabled()):
            out = self.heads.hidden_all(n_heads, h, self.rotary, mask, cache)
        else:
            out, prev = [], h
            for k in range(n_heads):
                prev = self.head_hidden(k, h if not self.heads.chained else prev, ids, mask, cache)
                out.append(prev)
        if cache is not None:
            cache.advance(ids.size(1))
        return out

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, n_heads: int | None = None,
                last_only: bool = False) -> list[torch.Tensor]:
        """Logits [B, T_k, V] of the first `n_heads` heads (see `hidden_states`)."""
        return [self.head_logits(k, h[:, -1:] if last_only else h)
                for k, h in enumerate(self.hidden_states(ids, cache, n_heads))]
