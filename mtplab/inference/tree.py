"""Tree speculation: each step verifies a tree of drafts in one forward instead of one chain.

A chain tries only each head's top-1 guess and one miss ends it. A static tree (Medusa's) also
tries head k's next-ranked tokens: a node is a path of ranks from the root, (0,) head 1's best
token, (1,) its second, (0, 2) head 2's third after head 1's best, and so on. Every node reads the
trunk's state at the row's last accepted position, so the tree's tokens are known before the
forward; they go through the model together, each seeing the cache and its own ancestors
(AttentionMask.ragged's `parents`), at position "cache end + depth".

    inputs    c   a   b   a'  a''        c = last accepted token; a, b = head 1's top-2;
    parent    -   c   c   a   a          a', a'' = head 2's top-2, both after a
    head 0    v0  va  vb  va' va''       v_x verifies x's children

Verification walks from the root. Greedy: follow the child whose token is head 0's argmax, then
emit that argmax at the last node reached: token for token plain greedy decoding. Sampling: the
children are fixed given the parent (ranks, not draws), so the rule for a deterministic proposal
applies (EAGLE's, a special case of SpecInfer's): accept child x with probability p(x); on
rejection set p(x) = 0, renormalise and try the next sibling; when every child is rejected draw
from what is left. The emitted token therefore has exactly head 0's distribution p (after
temperature, top-k, top-p) at every node. The accepted branch's keys and values then move into
place in the cache (KVCache.keep_path) and the rest is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MtplabError


@dataclass(frozen=True)
class DraftTree:
    """Nodes as rank paths, parents before children (sorted by depth, then ranks)."""

    paths: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        paths = tuple(sorted({tuple(p) for p in self.paths}, key=lambda p: (len(p), p)))
        if not paths:
            raise MtplabError("a draft tree needs at least one node")
        for p in paths:
            if not p or min(p) < 0:
                raise MtplabError(f"tree node {p}: ranks are integers >= 0, at least one")
            if len(p) > 1 and p[:-1] not in paths:
                raise MtplabError(f"tree node {p} has no parent {p[:-1]}")
        object.__setattr__(self, "paths", paths)

    @classmethod
    def chain(cls, depth: int) -> "DraftTree":
        return cls(tuple((0,) * d for d in range(1, depth + 1)))

    @classmethod
    def default(cls, depth: int) -> "DraftTree":
        """A small tree for heads that draft as the demo's do (top-1 right 60-80% of the time):
        the chain, three tries at depth 1, two after each of the best two, one more at depth 3."""
        paths = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0)]
        deep = [(0,) * d for d in range(4, depth + 1)]
        return cls(tuple(p for p in paths + deep if len(p) <= depth))

    @classmethod
    def parse(cls, text: str) -> "DraftTree":
        """'0 1 0.0 0.1' -> nodes (0,), (1,), (0, 0), (0, 1)."""
        try:
            return cls(tuple(tuple(int(r) for r in node.split(".")) for node in text.split()))
        except ValueError:
            raise MtplabError(f"bad draft tree {text!r}: nodes are rank paths like '0 1 0.0 0.1'") from None

    @classmethod
    def named(cls, text: str, depth: int) -> "DraftTree":
        """A command line's tree: 'default', 'chain' (both `depth` deep) or rank paths."""
        if text == "default":
            return cls.default(depth)
        if text == "chain":
            return cls.chain(depth)
        return cls.parse(text)

    def __str__(self) -> str:
        return " ".join(".".join(map(str, p)) for p in self.paths)

    @property
    def size(self) -> int:
        return len(self.paths)

    @property
    def depth(self) -> int:
        return len(self.paths[-1])

    def ranks_per_depth(self) -> list[int]:
        """How many of head k's best tokens the tree reads, for k = 1..depth."""
        return [1 + max(p[-1] for p in self.paths if len(p) == d) for d in range(1, self.depth + 1)]

    def pruned(self, depth: int) -> "DraftTree | None":
        """The nodes at most `depth` deep (None when that leaves none)."""
        kept = tuple(p for p in self.paths if len(p) <= depth)
        return DraftTree(kept) if kept else None

    def parents(self) -> list[int]:
        """Per input position (0: the pending token, node i at i + 1): its parent's, -1 for 0."""
        where = {p: i + 1 for i, p in enumerate(self.paths)}
        return [-1] + [where.get(p[:-1], 0) for p in self.paths]

    def children(self) -> list[list[int]]:
        """Per input position: its children's positions, best rank first."""
        out: list[list[int]] = [[] for _ in range(self.size + 1)]
        for position, parent in enumerate(self.parents()[1:], start=1):
            out[parent].append(position)  # paths are sorted, so siblings come in rank order
        return out

    def tokens(self, logits: torch.Tensor) -> list[int]:
        """The node tokens from heads 1..depth's logits [>= depth, V] at the last accepted position."""
        ranks = self.ranks_per_depth()
        top = torch.topk(logits[:self.depth].float(), max(ranks), dim=-1).indices.tolist()
        return [top[len(p) - 1][p[-1]] for p in self.paths]


def verify_tree(row, tree: DraftTree, head0: torch.Tensor, greedy: list[int],
                probs: torch.Tensor | None) -> tuple[list[int], list[bool], list[int]]:
    """Walk row's tree (its node tokens in row.drafts) from the root: head0 [1 + N, V] and its
    argmax per input position; `probs` [1 + N, V] a sampling row's head-0 distributions after its
    sampling parameters (None: greedy). The new tokens, per token whether it was an accepted
    draft, and the accepted nodes' input positions in order (the branch to keep in the cache)."""
    children, drafts = tree.children(), row.drafts
    new, flags, path, at = [], [], [], 0
    while True:
        kids = children[at]
        depth = len(path)
        if kids:
            row.stats.proposed[depth] += 1
        if row.params.greedy:
            token = greedy[at]
            nxt = next((c for c in kids if drafts[c - 1] == token), None)
        else:
            p, nxt = probs[at], None
            for c in kids:
                x = drafts[c - 1]
                if row.chance.accept(float(p[x]) / float(p.sum())):
                    nxt = c
                    break
                p = p.clone()
                p[x] = 0.0
            token = drafts[nxt - 1] if nxt is not None else row.chance.draw(p / p.sum())
        new.append(token)
        if nxt is None:
            flags.append(False)
            row.stats.decoded += len(new)
            return new, flags, path
        flags.append(True)
        row.stats.accepted[depth] += 1
        path.append(nxt)
        at = nxt
