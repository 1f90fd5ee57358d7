"""Monostep's training samples: (running prefix, next block of SLOTS answer tokens).

Each answer (its eos included) is cut into blocks of SLOTS tokens, the last one filled with
`<empty>`; sample j of an example is (prompt + answer[:j*SLOTS], answer[j*SLOTS:(j+1)*SLOTS]) with
the prefix cut to its last max_len tokens. An example of n answer tokens thus gives ceil(n/SLOTS)
samples, and a sample is only (example, start): the token ids are stored once.

Batches are sorted by length within pools of 64 batches and then shuffled, so padding stays small
while the order is still random; an epoch's order depends only on (seed, epoch), so the state
{epoch, batch} continues a run exactly.
"""

from __future__ import annotations

import numpy as np
import torch

POOL = 64  # batches sorted together by length


class BlockBatches:
    def __init__(self, pairs: list[tuple[list[int], list[int]]], slots: int, batch_size: int,
                 pad_id: int, empty_id: int, max_len: int, seed: int = 0):
        """pairs: (prompt ids, answer ids ending in eos)."""
        self.slots, self.batch_size, self.pad_id, self.empty_id = slots, batch_size, pad_id, empty_id
        self.max_len, self.seed = max_len, seed
        pairs = [(p, a) for p, a in pairs if a]
        self.tokens = [np.asarray(p + a, dtype=np.int64) for p, a in pairs]
        starts = [(i, len(p) + j) for i, (p, a) in enumerate(pairs) for j in range(0, len(a), slots)]
        if not starts:
            raise ValueError("no answer tokens to make blocks of")
        self.samples = np.asarray(starts, dtype=np.int64)  # [N, 2]: example, position of the block
        self.lengths = np.minimum(self.samples[:, 1], max_len)  # prefix lengths
        self.epoch, self.batch = 0, 0
        self._order = self._epoch_order()

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-len(self.samples) // self.batch_size)

    def _epoch_order(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.samples))
        batches = []
        size = POOL * self.batch_size  # a multiple of the batch: only the epoch's last batch is short
        for start in range(0, len(order), size):
            pool = order[start:start + size]
            pool = pool[np.argsort(self.lengths[pool], kind="stable")]
            batches += [pool[i:i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def collate(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids [B, T] right-padded, mask [B, T] (True on real tokens), targets [B, SLOTS]."""
        width = int(self.lengths[indices].max())
        ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.bool)
        targets = torch.full((len(indices), self.slots), self.empty_id, dtype=torch.long)
        for r, i in enumerate(indices):
            example, start = self.samples[i]
            tokens = self.tokens[example]
            prefix = tokens[max(0, start - self.max_len):start]
            block = tokens[start:start + self.slots]
            ids[r, :len(prefix)] = torch.from_numpy(prefix)
            mask[r, :len(prefix)] = True
            targets[r, :len(block)] = torch.from_numpy(block)
        return ids, mask, targets

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.batch >= len(self._order):
            self.epoch, self.batch = self.epoch + 1, 0
            self._order = self._epoch_order()
        indices = self._order[self.batch]
        self.batch += 1
        return self.collate(indices)

    def in_order(self, limit: int | None = None):
        """The samples in batches of similar length (for evaluation): all, or the first `limit`
        batches' worth."""
        n = len(self.samples) if limit is None else min(len(self.samples), limit * self.batch_size)
        order = np.argsort(self.lengths[:n], kind="stable")
        for i in range(0, n, self.batch_size):
            yield self.collate(order[i:i + self.batch_size])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._order = self._epoch_order()
