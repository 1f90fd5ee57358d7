"""Multi-token prediction head families behind one interface. Head k predicts token t+1+k from position t.

Every head ends in the model's final norm and an unembedding (the shared one, or Medusa's own for
k >= 1); a family produces the hidden states [B, T_k, D] that feed them.

- parallel (Gloeckle et al. 2024, the MTP GPT-2's): head k is its own stack of blocks on the trunk
  output.
- sequential (DeepSeek-V3 §2.2, AOMTS's): head 0 is the trunk itself; module k >= 1 mixes the
  previous depth's hidden state with the embedding of token t+k and runs one block, so depth k can
  only be computed where token t+k is known (T - k positions).
- medusa (Cai et al. 2024): head 0 is the trunk itself; head k >= 1 is a residual SiLU block on the
  final normed hidden state and a vocabulary projection of its own (not the shared unembedding).
- slots (Monostep's, on a causal trunk): slot k maps [x_t, h_{k-1}] to h_k = norm(h_{k-1} + MLP(...))
  with h_{-1} a learned init state, where x_t is the normed trunk state at position t (Monostep's
  pooled prefix summary, made causal so every block start of a sequence trains in one pass).

`Heads` is everything the rest of mtplab asks of a family: the losses, TST, the decoding engine,
`info`, and the HF exports call these methods and never ask which family they hold.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .kv_cache import KVCache
from .layers import AttentionMask, Block, Rotary, make_norm
from .stacked import StackedBlocks, plain_blocks

# future(k): the embeddings of the inputs k steps ahead of each position, [B, T', D] (T' = T - k for
# tokens; TST's bags of raw tokens shifted by k cover every position).
Future = Callable[[int], torch.Tensor]


class DraftingModel(Protocol):
    """What a drafter reads of the model that owns the heads (the Transformer; named by what it
    offers, since transformer.py builds on this module)."""

    config: ModelConfig
    device: torch.device
    wte: nn.Embedding
    heads: "Heads"
    rotary: Rotary | None

    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...

    def head_logits(self, k: int, hidden: torch.Tensor) -> torch.Tensor: ...


class Heads(nn.Module):
    """The interface. Subclasses set `cache_layers` and implement `hidden` and `flops_per_token`."""

    cache_layers = 0  # KV-cache layers the heads' blocks use, after the trunk's
    reads_ahead = False  # head k at position t reads the inputs up to t + k (its state covers T - k)

    def follow_trunk(self, first_layer: int) -> None:
        """Place the heads' cache layers behind a trunk that uses `first_layer` of them (a looped
        trunk's count depends on its think loops)."""

    def reset_parameters(self, unembedding: torch.Tensor) -> None:
        """The family's own start, after the model-wide initialisation (default: none)."""

    def check(self, n_heads: int, cached: bool, padded: bool) -> None:
        """Refuse, before any work, a forward that cannot give heads 0..n_heads-1 (ValueError)."""

    def hidden(self, k: int, trunk: torch.Tensor, prev: torch.Tensor, future: Future | None,
               rotary: Rotary | None, mask: AttentionMask, cache: KVCache | None = None) -> torch.Tensor:
        """Head k's hidden state [B, T_k, D] from the trunk output [B, T, D] and head k-1's state
        `prev` (the trunk output for k = 0). The head-at-a-time backward passes a detached copy of
        each, so a family reads only the one its head depends on."""
        raise NotImplementedError

    def hidden_all(self, n: int, trunk: torch.Tensor, future: Future | None, rotary: Rotary | None,
                   mask: AttentionMask | None, cache: KVCache | None = None, batched: bool = False,
                   outputs_at: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Heads 0..n-1's hidden states. `batched` (inference): the family may evaluate its heads
        together. `outputs_at` ([B] positions): the states only there, [B, 1, D] each; the heads'
        blocks still put every position into the cache."""
        if outputs_at is not None:  # heads without attention: the trunk's state there is enough
            trunk = _pick(trunk, outputs_at)
        out, prev = [], trunk
        for k in range(n):
            prev = self.hidden(k, trunk, prev, future, rotary, mask, cache)
            out.append(prev)
        return out

    def unembed(self, k: int, normed: torch.Tensor, unembedding: torch.Tensor) -> torch.Tensor:
        """Head k's logits (before any softcap) from its final-normed state [..., D]."""
        return F.linear(normed, unembedding)

    def unembed_stacked(self, first: int, normed: torch.Tensor, unembedding: torch.Tensor) -> torch.Tensor:
        """Heads first..first+H-1 together: normed [..., H, D] -> [..., H, V]. With the shared
        unembedding this is one matmul, so a decoding step reads the [V, D] matrix once."""
        return F.linear(normed, unembedding)

    def flops_per_token(self, attention: int, unembed: int) -> tuple[int, int]:
        """Forward FLOPs per token the heads cost beyond the trunk: on the next-token path (head 0)
        and for all heads. `attention`: one attention call's FLOPs; `unembed`: one unembedding's."""
        raise NotImplementedError

    def draft_parameters(self) -> list[nn.Parameter]:
        """The parameters only heads k >= 1 read: what self-distillation trains, leaving head 0
        (the teacher, and every answer the model gives) exactly as it was."""
        raise NotImplementedError

    def matmul_parameters(self, prefix: str = "") -> int:
        return sum(p.numel() for name, p in self.named_parameters() if name.startswith(prefix) and p.dim() == 2)

    def drafter(self, model: DraftingModel, n_draft: int, max_len: int) -> "SequentialDrafter | None":
        """A per-row drafter, for a family whose drafts cannot come from the batched forward
        (None: draft from the heads' states at the last accepted position)."""
        return None

    # -- the standard (native) HF export ----------------------------------------------------------
    native_misfit: str | None = None  # why head 0 has no place in a standard model, if it has none

    @staticmethod
    def next_token_blocks(config: ModelConfig) -> list[str]:
        """State-dict prefixes of head 0's blocks after the trunk ([]: head 0 is the trunk itself)."""
        return []

    @staticmethod
    def layout(config: ModelConfig, last_layer: int) -> str:
        """Where heads k >= 1 sit relative to standard layer `last_layer` (export metadata)."""
        raise NotImplementedError


class ParallelHeads(Heads):
    def __init__(self, config: ModelConfig, first_layer: int):
        super().__init__()
        per = config.head_layers
        self.heads = nn.ModuleList(
            nn.ModuleList(Block(config, first_layer + k * per + j) for j in range(per))
            for k in range(config.n_future))
        self.cache_layers = config.n_future * per
        self.first_layer = first_layer
        self.stackable = plain_blocks(config)
        self._stacked: dict[int, list] = {}

    def follow_trunk(self, first_layer: int) -> None:
        if first_layer == self.first_layer:
            return
        per = len(self.heads[0])
        for k, head in enumerate(self.heads):
            for j, block in enumerate(head):
                block.attn.layer_idx = first_layer + k * per + j
        self.first_layer = first_layer
        self._stacked = {}

    def hidden(self, k, trunk, prev, future, rotary, mask, cache=None, outputs_at=None):
        x = trunk  # [B, T, D]: every head reads the trunk output
        if not len(self.heads[k]) and outputs_at is not None:  # block-less (nanochat): the trunk's state
            return _pick(trunk, outputs_at)
        for j, block in enumerate(self.heads[k]):
            x = block(x, mask, rotary, cache, keep=outputs_at if j == len(self.heads[k]) - 1 else None)
        return x

    def hidden_all(self, n, trunk, future, rotary, mask, cache=None, batched=False, outputs_at=None):
        """Batched: layer j of every head as one stacked block (same input, same shapes), so n
        heads cost about one block's kernel launches. With `outputs_at` the last layer computes
        only keys and values at the other positions (1/6 of a block's matmuls)."""
        if not batched or n < 2:
            return [self.hidden(k, trunk, trunk, future, rotary, mask, cache, outputs_at) for k in range(n)]
        if n not in self._stacked:
            per = len(self.heads[0])
            # Head k's layer j sits at cache layer first + k*per + j: batch only when contiguous.
            self._stacked[n] = [StackedBlocks([self.heads[k][j] for k in range(n)], self.first_layer + j)
                                for j in range(per)] if per == 1 and self.stackable else None
        stacks = self._stacked[n]
        if stacks is None:
            return [self.hidden(k, trunk, trunk, future, rotary, mask, cache, outputs_at) for k in range(n)]
        x = trunk.unsqueeze(0).expand(n, *trunk.shape)
        for j, stack in enumerate(stacks):
            x = stack(x, mask, rotary, cache, keep=outputs_at if j == len(stacks) - 1 else None)
        return list(x.unbind(0))

    def draft_parameters(self):
        return [p for head in self.heads[1:] for p in head.parameters()]

    def flops_per_token(self, attention, unembed):
        n, per = len(self.heads), len(self.heads[0])
        matmul = self.matmul_parameters()
        return (2 * matmul // n + per * attention + unembed,  # head 0's blocks are on the path
                2 * matmul + n * per * attention + n * unembed)

    @staticmethod
    def next_token_blocks(config):
        return [f"heads.heads.0.{j}." for j in range(config.head_layers)]

    @staticmethod
    def layout(config, last_layer):
        return (f"head k >= 1: blocks heads.heads.k.* on the trunk output (the hidden state after "
                f"standard layer {config.n_layers - 1}, before head 0's layers), then the final norm "
                "and unembedding")


class SequentialModule(nn.Module):
    """DeepSeek-V3 MTP module: eh_proj([enorm(Emb(x_{t+k})); hnorm(h^{k-1}_t)]) -> block.
    The embedding comes first in the concatenation, as in the DeepSeek-V3 release."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = make_norm(config)
        self.hnorm = make_norm(config)
        self.eh_proj = nn.Linear(2 * config.d_model, config.d_model, bias=False)
        self.block = Block(config, layer_idx)


class SequentialHeads(Heads):
    reads_ahead = True

    def __init__(self, config: ModelConfig, first_layer: int):
        super().__init__()
        # Each module keeps its own cache group, so its blocks are layer 0 of that group.
        self.modules_ = nn.ModuleList(SequentialModule(config, 0) for _ in range(config.n_future - 1))
        self.cache_layers = 0  # none of these blocks live in the trunk's cache

    def check(self, n_heads, cached, padded):
        if n_heads < 2:
            return
        if cached:
            raise ValueError("sequential MTP depths keep caches of their own, per row: ask for depths "
                             "k >= 1 without a cache (use_cache=False), or decode with mtplab's engine")
        if padded:
            raise ValueError("sequential MTP depths take no padding mask or position_ids: ask for the "
                             "depths of unpadded rows (head 0's logits take padding)")

    def hidden_all(self, n, trunk, future, rotary, mask, cache=None, batched=False, outputs_at=None):
        if outputs_at is not None and n > 1:
            raise ValueError("sequential depths read every position's state: no outputs_at")
        return super().hidden_all(n, trunk, future, rotary, mask, cache, batched, outputs_at)

    def hidden(self, k, trunk, prev, future, rotary, mask, cache=None):
        if k == 0:
            return trunk
        if cache is not None:
            raise ValueError("sequential depths keep caches of their own: use run_module")
        following = future(k)  # depth k-1 covers at least the positions depth k can
        return self.run_module(k, prev[:, :following.size(1)], following, rotary)

    def run_module(self, k: int, h_prev: torch.Tensor, following: torch.Tensor, rotary: Rotary | None,
                   cache: KVCache | None = None) -> torch.Tensor:
        """Depth k at positions i..j: h_prev = depth k-1 there [B, n, D], following = the
        embeddings of x_{i+k..j+k} [B, n, D]. With a cache (this module's own, one layer), the
        positions continue the cached ones."""
        module = self.modules_[k - 1]
        x = module.eh_proj(torch.cat([module.enorm(following), module.hnorm(h_prev)], dim=-1))
        start = cache.length if cache is not None else 0
        out = module.block(x, AttentionMask(start, x.size(1), x.device), rotary, cache)
        if cache is not None:
            cache.advance(x.size(1))
        return out

    def draft_parameters(self):
        return list(self.modules_.parameters())  # depth 0 is the trunk itself

    def flops_per_token(self, attention, unembed):
        return unembed, 2 * self.matmul_parameters() + len(self.modules_) * attention + (1 + len(self.modules_)) * unembed

    def drafter(self, model, n_draft, max_len):
        return SequentialDrafter(model, n_draft, max_len) if n_draft else None

    @staticmethod
    def layout(config, last_layer):
        return (f"depth k >= 1: heads.modules_.(k-1) on depth k-1 (depth 0: the output of standard "
                f"layer {last_layer}, before the final norm) and the embedding of token t+k, then the "
                "final norm and unembedding")


class SequentialDrafter:
    """One row's DeepSeek depths at inference. Depth k at position t needs h^{k-1}_t and token t+k.
    Positions whose token t+k is already accepted are kept (in `history` and the depth's own cache);
    later ones use drafts and are redone at the next step."""

    def __init__(self, model: DraftingModel, n_draft: int, max_len: int):
        self.model = model
        c = model.config
        self.caches = [KVCache(1, 1, c.kv_heads, max_len, c.head_dim, model.device,
                               model.wte.weight.dtype) for _ in range(n_draft)]
        self.history: list[torch.Tensor | None] = [None] * (n_draft + 1)  # kept hidden per depth
        self.out: torch.Tensor | None = None

    def accept(self, trunk: torch.Tensor, tokens: list[int]) -> None:
        """trunk [1, n, D]: head 0's states at the newly accepted positions; tokens: every
        accepted token, the pending one included."""
        self.history[0] = _append(self.history[0], trunk)
        self.tokens = tokens
        self.out = None

    def draft_logits(self, k: int, drafts: list[int]) -> torch.Tensor:
        n = self.history[0].size(1)  # trunk positions 0..n-1 are accepted; tokens[n] is pending
        cache = self.caches[k - 1]
        first = cache.length  # depth k keeps positions [0, first)
        if k == 1:
            h_in = self.history[0][:, first:n]
        else:  # depth k-1 at [first, n): kept earlier, then what it computed in this step
            h_in = _cat(self.history[k - 1][:, first:self.prev_first], self.out)
        following = (self.tokens[first + k:] + drafts)[:n - first]  # token t+k for t in [first, n)
        embeds = self.model.embed(torch.tensor([following], device=self.model.device))
        out = self.model.heads.run_module(k, h_in, embeds, self.model.rotary, cache)
        keep = max(0, n - k + 1) - first  # positions whose token t+k is accepted, not drafted
        self.history[k] = _append(self.history[k], out[:, :keep])
        cache.rollback(first + keep)
        self.out, self.prev_first = out, first
        return self.model.head_logits(k, out[0, -1])

    def draft_tree(self, depth: int, width: int, budget: int) -> list[tuple[tuple[int, ...], int]]:
        """A dynamic tree of drafts, EAGLE-2's way: depth after depth the `width` likeliest nodes
        (by the product of their draft probabilities) are expanded with their `width` likeliest
        tokens, and of all the nodes the `budget` likeliest are kept. Each node is (its ranks
        among its parents' candidates, its token); a node's parent is always kept before it.

        Depth k at position t reads token t+k, so its positions up to n-k (n: the pending token's)
        are the same on every branch and are computed once, into history[k] and its own cache, as
        the chain does; the last k-1 positions read drafts, so each branch runs them, all branches
        as one batch over a copy of that cache."""
        n = self.history[0].size(1)
        model = self.model
        nodes: list[tuple[float, tuple[int, ...], list[int]]] = []  # (log-probability, ranks, drafts)
        frontier = [(0.0, (), [], None)]  # + each branch's depth k-1 states at its last k-2 positions
        for k in range(1, depth + 1):
            cache, common = self.caches[k - 1], n - k + 1  # positions [first, common): on every branch
            first = cache.length
            if common > first:
                h_in = self.history[k - 1][:, first:common]
                embeds = model.embed(torch.tensor([self.tokens[first + k:common + k]], device=model.device))
                self.history[k] = _append(self.history[k], model.heads.run_module(k, h_in, embeds, model.rotary, cache))
            if k == 1:
                states = None
                logits = model.head_logits(1, self.history[1][:, n - 1])  # [1, V]
            else:
                # the branch positions [lo, n): depth k-1 there is the shared state at `common`
                # (when the context reaches back that far), then the branch's own
                b, lo = len(frontier), max(0, common)
                parts = [self.history[k - 1][:, common:common + 1].expand(b, 1, -1)] if common >= 0 else []
                if k > 2:
                    parts.append(torch.stack([f[3] for f in frontier]))
                h_prev = torch.cat(parts, dim=1)  # [B, n - lo, D]
                embeds = model.embed(torch.tensor([f[2][len(f[2]) - (n - lo):] for f in frontier],
                                                  device=model.device))
                branches = KVCache(1, b, cache.k.size(2), n, cache.k.size(-1), model.device, cache.k.dtype)
                branches.k[:, :, :, :lo] = cache.k[:, :1, :, :lo]
                branches.v[:, :, :, :lo] = cache.v[:, :1, :, :lo]
                branches.lengths = [lo] * b
                states = model.heads.run_module(k, h_prev, embeds, model.rotary, branches)  # [B, n - lo, D]
                logits = model.head_logits(k, states[:, -1])  # [B, V]
            top = torch.log_softmax(logits.float(), dim=-1).topk(min(width, logits.size(-1)), dim=-1)
            children = []
            for i, (logp, ranks, drafts, _) in enumerate(frontier):
                for r, (lp, token) in enumerate(zip(top.values[i].tolist(), top.indices[i].tolist())):
                    children.append((logp + lp, ranks + (r,), drafts + [token],
                                     states[i] if states is not None else None))
            nodes += [c[:3] for c in children]
            frontier = sorted(children, key=lambda c: -c[0])[:width]
        kept = sorted(nodes, key=lambda c: (-c[0], len(c[1]), c[1]))[:budget]
        return [(ranks, drafts[-1]) for _, ranks, drafts in kept]


class MedusaHeads(Heads):
    def __init__(self, config: ModelConfig, first_layer: int):
        super().__init__()
        d, extra = config.d_model, config.n_future - 1
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(extra))
        self.lm_heads = nn.ModuleList(nn.Linear(d, config.vocab_size, bias=False) for _ in range(extra))

    def reset_parameters(self, unembedding):
        """Medusa's start: the residual branch is zero and every head copies the unembedding, so
        each head begins with exactly head 0's distribution."""
        with torch.no_grad():
            for block, lm_head in zip(self.blocks, self.lm_heads):
                block.weight.zero_()
                block.bias.zero_()
                lm_head.weight.copy_(unembedding)

    def hidden(self, k, trunk, prev, future, rotary, mask, cache=None):
        return trunk  # the heads work on the normed trunk output, in `unembed`

    def unembed(self, k, normed, unembedding):
        if k == 0:
            return F.linear(normed, unembedding)
        return self.lm_heads[k - 1](normed + F.silu(self.blocks[k - 1](normed)))

    def unembed_stacked(self, first, normed, unembedding):
        return torch.stack([self.unembed(first + i, x, unembedding) for i, x in enumerate(normed.unbind(-2))], -2)

    def draft_parameters(self):
        return list(self.parameters())  # head 0 is the trunk and the shared unembedding

    def flops_per_token(self, attention, unembed):
        return unembed, 2 * self.matmul_parameters() + unembed  # lm_heads: the others' unembeddings

    @staticmethod
    def layout(config, last_layer):
        return ("head k >= 1: heads.blocks.(k-1) (x + silu(W x + b)) and its own heads.lm_heads.(k-1), "
                "on the final-normed hidden state")


class Slot(nn.Module):
    """One slot: a residual GELU MLP over [x_t, h_prev] and a norm (Monostep's `Slot` minus its own
    vocabulary projection: slots here share the model's unembedding)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.d_model
        self.ff = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, d))
        self.norm = make_norm(config)

    def forward(self, x: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        return self.norm(h_prev + self.ff(torch.cat([x, h_prev], dim=-1)))


class SlotHeads(Heads):
    def __init__(self, config: ModelConfig, first_layer: int):
        super().__init__()
        self.in_norm = make_norm(config)
        self.init_state = nn.Parameter(torch.zeros(config.d_model))
        self.slots = nn.ModuleList(Slot(config) for _ in range(config.n_future))

    def hidden_all(self, n, trunk, future=None, rotary=None, mask=None, cache=None, batched=False,
                   outputs_at=None):
        """Slots 0..n-1 along one chain: [B, T, D] each (no attention: nothing in the cache)."""
        if outputs_at is not None:
            trunk = _pick(trunk, outputs_at)
        x = self.in_norm(trunk)
        h, out = self.init_state.expand_as(x), []
        for slot in self.slots[:n]:
            h = slot(x, h)
            out.append(h)
        return out

    def hidden(self, k, trunk, prev, future, rotary, mask, cache=None):
        # Recomputing slots < k from the trunk costs a few small MLPs and lets each head's loss
        # back-propagate on its own (losses.backward_heads), reaching the earlier slots it uses.
        return self.hidden_all(k + 1, trunk)[k]

    def draft_parameters(self):
        return [p for slot in self.slots[1:] for p in slot.parameters()]  # in_norm, init_state: slot 0's

    def flops_per_token(self, attention, unembed):
        return 2 * self.matmul_parameters("slots.0.") + unembed, 2 * self.matmul_parameters() + len(self.slots) * unembed

    native_misfit = ("slot heads' next-token slot (heads.slots.0: with model.mtp='slots' head 0 is a "
                     "slot MLP on the trunk) has")

    @staticmethod
    def layout(config, last_layer):
        return "slot k: heads.slots.k on the normed trunk output and slot k-1's state"


FAMILIES: dict[str, type[Heads]] = {"parallel": ParallelHeads, "sequential": SequentialHeads,
                                    "medusa": MedusaHeads, "slots": SlotHeads}


def make_heads(config: ModelConfig, first_layer: int) -> Heads:
    return FAMILIES[config.mtp](config, first_layer)


def family(config: ModelConfig) -> type[Heads]:
    return FAMILIES[config.mtp]


def _pick(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """x [B, T, D] at one position per row -> [B, 1, D]."""
    return x[torch.arange(x.size(0), device=x.device), at].unsqueeze(1)


def _append(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=1)


def _cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, b], dim=1) if a.size(1) else b
