"""Training batches whose position can be saved and restored.

Both kinds walk a shuffled order of examples, epoch after epoch; the order of an epoch depends only on
(seed, epoch), so a state of {epoch, index} is enough to continue exactly where a run stopped.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE = -100  # label that the loss skips


class EpochSampler:
    """Indices 0..n-1 in a fresh seeded permutation each epoch; yields fixed-size groups."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("nothing to sample from")
        self.n, self.seed = n, seed
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            step = min(k - len(out), self.n - self.index)
            out.extend(self._order[self.index:self.index + step].tolist())
            self.index += step
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation()


class PackedBatches:
    """Windows of seq_len+1 tokens cut from one packed token array: inputs and next-token labels."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        n_windows = (len(tokens) - 1) // seq_len
        if n_windows < 1:
            raise ValueError(f"only {len(tokens)} tokens: too few for one sequence of {seq_len}")
        self.sampler = EpochSampler(n_windows, seed)

    def _window(self, i: int) -> torch.Tensor:
        start = i * self.seq_len
        return torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))

    def next_windows(self, rows: slice = slice(None)) -> torch.Tensor:
        """The next batch's raw [B, seq_len+1] windows, or only `rows` of them."""
        return torch.stack([self._window(i) for i in self.sampler.take(self.batch_size)[rows]])

    def next(self, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch, or only `rows` of it (a data-parallel rank's share)."""
        windows = self.next_windows(rows)
        return windows[:, :-1], windows[:, 1:]  # [B, T] inputs, [B, T] labels

    def eval_batches(self, max_batches: int):
        """The first windows in order, for a fixed held-out measurement."""
        n = min(self.sampler.n, max_batches * self.batch_size)
        for start in range(0, n, self.batch_size):
            rows = torch.stack([self._window(i) for i in range(start, min(start + self.batch_size, n))])
            yield rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class ChatBatches:
    """Prompt + answer pairs, right-padded per batch; labels only on the answer (and its eos)."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], seq_len: int, batch_size: int,
                 pad_id: int, seed: int = 0):
        # An example must fit seq_len+1 tokens (inputs are all but the last, labels all but the first).
        self.examples = [(p, a) for p, a in examples if len(p) + len(a) <= seq_len + 1 and a]
        self.dropped = len(examples) - len(self.examples)
        if not self.examples:
            raise ValueError(f"no example fits in seq_len={seq_len}")
        self.seq_len, self.batch_size, self.pad_id = seq_len, batch_size, pad_id
        self.sampler = EpochSampler(len(self.examples), seed)

    def _collate(self, indices: list[int], width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.examples[i] for i in indices]
        width = width or max(len(p) + len(a) for p, a in rows) - 1
        inputs = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for r, (prompt, answer) in enumerate(rows):
            ids = torch.tensor(prompt + answer)
            inputs[r, :len(ids) - 1] = ids[:-1]
            labels[r, len(prompt) - 1:len(ids) - 1] = ids[len(prompt):]
        return inputs, labels

    def next(self, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch, or only `rows` of it, padded to the whole batch's width (so a
        data-parallel rank's share is exactly those rows of the single-process batch)."""
        indices = self.sampler.take(self.batch_size)
        width = max(sum(map(len, self.examples[i])) for i in indices) - 1
        return self._collate(indices[rows], width)

    def eval_batches(self, max_batches: int):
        n = min(len(self.examples), max_batches * self.batch_size)
        for start in range(0, n, self.batch_size):
            yield self._collate(list(range(start, min(start + self.batch_size, n))))

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
