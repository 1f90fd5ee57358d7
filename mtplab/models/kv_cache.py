"""A preallocated key/value cache for every attention layer of a model, with a length per row.

Writing is a slice copy into fixed buffers and rolling back is moving one integer per row, which
is what speculative decoding needs after a rejected draft. Rows may hold different lengths (a
batch of requests that joined at different steps, or accepted different numbers of drafts): a
forward then writes each row's new positions at that row's own length, and the attention mask
(layers.AttentionMask.ragged) hides every key past a row's own query positions.

Besides keys and values the cache keeps every token id it has seen ([B, max_len]), because smear
mixes in the previous token's embedding: after a rollback the previous token is simply
ids[b, lengths[b] - 1] again, with nothing else to undo. `n_loops` records the think-loop count the
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
        self.lengths = [0] * batch  # positions filled per row; the next forward writes from here
        self._where: tuple = (None, None)  # the last ragged write's (lengths, t) and its indices

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def uniform(self) -> bool:
        return all(n == self.lengths[0] for n in self.lengths)

    @property
    def length(self) -> int:
        """The one length every row has (a ragged cache has none: read `lengths`)."""
        if not self.uniform:
            raise ValueError(f"the cache's rows hold different lengths {self.lengths}")
        return self.lengths[0]

    def view(self, start: int, stop: int) -> "KVCache":
        """Rows [start, stop) as a cache of their own: the same storage, lengths copied (write the
        view's lengths back when it is done with)."""
        view = object.__new__(KVCache)
        view.k, view.v, view.ids = self.k[:, start:stop], self.v[:, start:stop], self.ids[start:stop]
        view.n_loops, view.max_len, view.lengths = self.n_loops, self.max_len, self.lengths[start:stop]
        view._where = (None, None)
        return view

    def copy_row(self, src: int, dst: int, n: int | None = None) -> None:
        """Row `src`'s first `n` positions (default: all it holds) into row `dst`: keeping a batch's
        active rows contiguous, or starting a row from another's prompt prefix."""
        n = self.lengths[src] if n is None else n
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.ids[dst, :n] = self.ids[src, :n]
        self.lengths[dst] = n

    def keep_path(self, row: int, start: int, path: list[int]) -> None:
        """After a tree of drafts at slots start.. of `row`: the new positions `path` (offsets
        from start, ascending: an accepted branch) move to start, start+1, ...; the rest is
        dropped (the row's length ends after the path)."""
        n = len(path)
        if path != list(range(n)):
            src = torch.tensor(path, device=self.ids.device) + start
            self.k[:, row, :, start:start + n] = self.k[:, row, :, src]
            self.v[:, row, :, start:start + n] = self.v[:, row, :, src]
            self.ids[row, start:start + n] = self.ids[row, src]
        self.lengths[row] = start + n

    def _write_indices(self, t: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Row and slot indices [B, T] of a ragged write of t positions (None: one slice does)."""
        end = max(self.lengths) + t
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        if self.uniform:
            return None
        key = (tuple(self.lengths), t)  # every layer of one forward writes at the same slots
        if self._where[0] != key:
            device = self.ids.device
            slots = torch.tensor(self.lengths, device=device)[:, None] + torch.arange(t, device=device)
            rows = torch.arange(self.batch, device=device)[:, None].expand_as(slots)
            self._where = (key, (rows, slots))
        return self._where[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hkv, T, hd] at each row's length; return every row's keys/values up to
        the longest row's end ([B, Hkv, S, hd]; the mask hides what a row does not own)."""
        t = k.size(2)
        where = self._write_indices(t)
        end = max(self.lengths) + t
        if where is None:
            start = self.lengths[0]
            self.k[layer, :, :, start:end] = k
            self.v[layer, :, :, start:end] = v
        else:
            rows, slots = where
            self.k[layer][rows, :, slots] = k.transpose(1, 2)  # [B, T, Hkv, hd] at (row, slot)
            self.v[layer][rows, :, slots] = v.transpose(1, 2)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def update_layers(self, first: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`update` for n consecutive layers at once: k, v [n, B, Hkv, T, hd] -> [n, B, Hkv, S, hd]."""
        n, t = k.size(0), k.size(3)
        where = self._write_indices(t)
        end = max(self.lengths) + t
        layers = slice(first, first + n)
        if where is None:
            start = self.lengths[0]
            self.k[layers, :, :, start:end] = k
            self.v[layers, :, :, start:end] = v
        else:
            rows, slots = where
            # split advanced indices put their dimensions first: the target is [B, T, n, Hkv, hd]
            self.k[layers][:, rows, :, slots] = k.permute(1, 3, 0, 2, 4)
            self.v[layers][:, rows, :, slots] = v.permute(1, 3, 0, 2, 4)
        return self.k[layers, :, :, :end], self.v[layers, :, :, :end]

    def store_ids(self, ids: torch.Tensor) -> None:
        """Remember the token ids [B, T] at each row's length (for smear)."""
        where = self._write_indices(ids.size(1))
        if where is None:
            start = self.lengths[0]
            self.ids[:, start:start + ids.size(1)] = ids
        else:
            self.ids[where] = ids

    def previous_ids(self) -> torch.Tensor:
        """[B, 1] the token before each row's next position (anything for an empty row)."""
        if self.uniform:
            start = max(self.lengths[0] - 1, 0)
            return self.ids[:, start:start + 1]
        last = torch.tensor([max(n - 1, 0) for n in self.lengths], device=self.ids.device)
        return self.ids.gather(1, last[:, None])

    def advance(self, n: int) -> None:
        self.lengths = [length + n for length in self.lengths]

    def rollback(self, length: int) -> None:
        """Forget everything after `length` positions in every row (rejected draft tokens)."""
        self.lengths = [min(n, length) for n in self.lengths]
