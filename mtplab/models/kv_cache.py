"""A preallocated key/value cache for every attention layer of a model.

Writing is a slice copy into fixed buffers and rolling back is moving one integer, which is what
speculative decoding needs after a rejected draft.

Besides keys and values the cache keeps every token id it has seen ([B, max_len]), because smear
mixes in the previous token's embedding: after a rollback the previous token is simply
ids[:, length - 1] again, with nothing else to undo. `n_loops` records the think-loop count the
cache was laid out for (a looped trunk needs one cache layer per pass of each shared block).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 n_loops: int = 1):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.ids = torch.zeros((batch, max_len), device=device, dtype=torch.long)
        self.n_loops = n_loops
        self.max_len = max_len
        self.length = 0  # positions filled; the next forward writes from here

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hkv, T, hd] at the current position; return all keys/values so far."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def store_ids(self, ids: torch.Tensor) -> None:
        """Remember the token ids [B, T] at the current position (for smear)."""
        end = self.length + ids.size(1)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        self.ids[:, self.length:end] = ids

    def advance(self, n: int) -> None:
        self.length += n

    def rollback(self, length: int) -> None:
        """Forget everything after `length` positions (rejected draft tokens)."""
        self.length = min(self.length, length)

    def update_layers(self, first: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`update` for n consecutive layers at once: k, v [n, B, Hkv, T, hd] -> [n, B, Hkv, S, hd]."""
        n, end = k.size(0), self.length + k.size(3)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        self.k[first:first + n, :, :, self.length:end] = k
        self.v[first:first + n, :, :, self.length:end] = v
        return self.k[first:first + n, :, :, :end], self.v[first:first + n, :, :, :end]
