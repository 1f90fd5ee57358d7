"""The causal decoder: token embedding, positions, a trunk of pre-norm blocks, MTP heads, and the
shared final norm + unembedding. Every architecture choice is a `ModelConfig` flag.

Stream-level features live here (attention-level ones are in layers.py):
- smear (nanochat): x_t += smear_lambda * sigmoid(smear_gate(x_t[:smear])) * x_{t-1}, on the
  token embedding; the cache keeps the ids so the previous token is known across calls.
- value embeddings: one [V, Hkv*hd] table per alternating layer, gated into v by that layer.
- resid/x0 lambdas: before block i, x <- resid_lambdas[i]*x + x0_lambdas[i]*x0 (x0 = embedding).
- backout: the final stream minus backout_lambda * the stream leaving block n_layers//2 (nanochat
  keeps block n_layers//2's output, e.g. block 6's of 12, and subtracts it before the final norm).
- looped layers (the Nano Reasoning Model's): entry blocks, a shared group run n_think_loops times
  (between passes x <- g*x + (1-g)*x_pre, g = sigmoid(think_gate), x_pre the stream before the
  loop), exit blocks.
  Each pass of a shared block has its own cache layer, so the cache layout depends on the count.
- logit softcap: c*tanh(z/c) on every head's logits.
- padded vocabulary: the tables hold vocab_size rows (a multiple of 64), the tokenizer fewer
  (vocab_real); every logits function puts -inf at the padded ids, after the softcap, so no
  decoding path can emit them and every loss is over the real vocabulary (as nanochat cuts
  `logits[..., :vocab_size]`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .heads import make_heads
from .kv_cache import KVCache
from .layers import AttentionMask, Block, Rotary, init_weights, make_norm
from .layout import attention_window, has_value_embed, loop_groups

def mask_padded_ids(logits: torch.Tensor, real: int) -> torch.Tensor:
    """logits [..., V] with -inf at ids >= real (padded rows). masked_fill and not a large negative
    constant: -inf is exact in fp16/bf16, softmax gives it probability 0 and its gradient is 0."""
    if real >= logits.size(-1):
        return logits
    return logits.masked_fill(torch.arange(logits.size(-1), device=logits.device) >= real, float("-inf"))


class Transformer(nn.Module):
    stack_heads = True  # batch one-block heads at inference (off while FSDP shards the weights)
    cache_class = KVCache  # what `new_cache` makes (the HF export's wrapper uses a subclass)

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
        n = config.n_layers
        self.blocks = nn.ModuleList(Block(config, i, attention_window(config, i), has_value_embed(config, i))
                                    for i in range(n))
        self.embed_norm = make_norm(config) if config.embed_norm else None
        if config.value_embeds:  # keyed by the layer that reads the table
            self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, config.kv_heads * config.head_dim)
                                               for i in range(n) if has_value_embed(config, i)})
        if config.layer_lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(n))  # [L] start as the plain residual
            self.x0_lambdas = nn.Parameter(torch.zeros(n))
        if config.smear:
            self.smear_gate = nn.Linear(config.smear, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(()))  # starts off: no mixing
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(()))
        if config.loop_layers:
            self.think_gate = nn.Parameter(torch.tensor(0.5))  # the NRM's start
        self.n_think_loops = config.n_think_loops  # may be changed at inference; no new parameters
        self.heads = make_heads(config, first_layer=self.cache_layers(self.n_think_loops))
        self.norm_f = make_norm(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        init_weights(self, config.init_std, config.n_layers + config.head_layers)
        self.heads.reset_parameters(self.unembedding)

    @property
    def n_future(self) -> int:
        return self.config.n_future

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def set_grad_checkpointing(self, on: bool = True) -> None:
        """Recompute every block (trunk and heads) in backward instead of keeping its activations:
        about one block's activations alive per layer instead of all of them, for ~1/3 more compute."""
        for module in self.modules():
            if isinstance(module, Block):
                module.grad_checkpointing = on

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- pieces, used one at a time by the memory-saving training step -------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wte(ids)

    def cache_layers(self, n_loops: int) -> int:
        """Cache layers the trunk uses with `n_loops` think loops (heads' layers follow them)."""
        entry, shared, exit_ = loop_groups(self.config)
        return entry + shared * n_loops + exit_

    def _token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids)
        return self.embed_norm(x) if self.embed_norm is not None else x

    def _smear(self, x: torch.Tensor, ids: torch.Tensor, mask: AttentionMask, cache: KVCache | None) -> torch.Tensor:
        """x [B, T, D] -> x with the previous token's embedding mixed in through a learned gate."""
        if cache is not None and max(cache.lengths) > 0:  # the token before this call's first one is cached
            first = self._token_embedding(cache.previous_ids())  # [B, 1, D]
        else:
            first = torch.zeros_like(x[:, :1])
        if mask.parents is None:
            prev = torch.cat([first, x[:, :-1]], dim=1)  # [B, T, D]
        else:  # a tree: each position's previous token is its parent's (the cache's end for -1)
            index = (mask.parents + 1)[..., None].expand(-1, -1, x.size(-1))
            prev = torch.cat([first, x], dim=1).gather(1, index)
        if mask.positions is not None:  # position 0 of a row (after padding, or a new row) has none
            prev = prev * (mask.positions > 0).unsqueeze(-1).to(prev.dtype)
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :self.config.smear]))  # [B, T, 1]
        return x + gate * prev

    def trunk(self, ids: torch.Tensor | None, mask: AttentionMask, cache: KVCache | None = None,
              embeds: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] ids -> [B, T, D] hidden states before the heads. `embeds` ([B, T, D]) replaces the
        token embedding, for inputs that are not single tokens (TST's averaged bags; no smear,
        value embeddings or cache then)."""
        c = self.config
        x = self._token_embedding(ids) if embeds is None else embeds
        if self.wpe is not None:
            positions = (torch.arange(mask.start, mask.start + x.size(1), device=x.device)
                         if mask.positions is None else mask.positions.clamp(0, c.max_seq_len - 1))
            x = x + self.wpe(positions)
        if c.smear:
            x = self._smear(x, ids, mask, cache)
        if cache is not None:
            cache.store_ids(ids)
        if c.dropout and self.training:
            x = F.dropout(x, c.dropout, True)
        x0, mid = x, None
        entry, shared, _ = loop_groups(c)
        n_loops = cache.n_loops if cache is not None else self.n_think_loops
        slot = 0  # cache layer of the next block call

        def run(i: int, x: torch.Tensor) -> torch.Tensor:
            nonlocal slot, mid
            if c.layer_lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](ids) if has_value_embed(c, i) else None
            x = self.blocks[i](x, mask, self.rotary, cache, slot, ve)
            slot += 1
            if c.backout and i == c.n_layers // 2 and mid is None:  # a looped block: its first pass
                mid = x
            return x

        for i in range(entry):
            x = run(i, x)
        if shared:
            x_pre = x
            for loop in range(n_loops):
                for i in range(entry, entry + shared):
                    x = run(i, x)
                if loop < n_loops - 1:  # the NRM's: blend back toward the pre-loop state
                    g = torch.sigmoid(self.think_gate)
                    x = g * x + (1 - g) * x_pre
        for i in range(entry + shared, c.n_layers):
            x = run(i, x)
        if mid is not None:
            x = x - self.backout_lambda * mid
        return x

    def head_hidden(self, k: int, trunk: torch.Tensor, prev: torch.Tensor, ids: torch.Tensor | None,
                    mask: AttentionMask, cache: KVCache | None = None) -> torch.Tensor:
        """Head k's hidden state from the trunk output and head k-1's state (see Heads.hidden)."""
        return self.heads.hidden(k, trunk, prev, self._future(ids), self.rotary, mask, cache)

    def _future(self, ids: torch.Tensor | None):
        """The embeddings k tokens ahead of each position (what sequential depths read)."""
        return None if ids is None else (lambda k: self.embed(ids[:, k:]))

    @property
    def unembedding(self) -> torch.Tensor:
        return self.lm_head.weight if self.lm_head is not None else self.wte.weight

    def _softcap(self, z: torch.Tensor) -> torch.Tensor:
        cap = self.config.logit_softcap
        return cap * torch.tanh(z / cap) if cap else z

    def _finish(self, z: torch.Tensor) -> torch.Tensor:
        """Raw unembedding output [..., V] -> logits: the softcap, then -inf at the padded ids."""
        return mask_padded_ids(self._softcap(z), self.config.real_vocab_size)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The shared final norm and unembedding (head 0's, and every head's that shares it)."""
        return self._finish(F.linear(self.norm_f(h), self.unembedding))

    def head_logits(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Head k's logits from its hidden state [..., D]."""
        return self._finish(self.heads.unembed(k, self.norm_f(h), self.unembedding))

    def stacked_logits(self, states: list[torch.Tensor], first: int = 0) -> torch.Tensor:
        """Heads first..first+H-1's logits from their states (H x [..., D]) -> [..., H, V], with
        one read of a shared unembedding."""
        return self._finish(self.heads.unembed_stacked(first, self.norm_f(torch.stack(states, -2)),
                                                       self.unembedding))

    # -- whole forward -------------------------------------------------------------------------
    def new_cache(self, batch: int = 1, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """A cache laid out for the current `n_think_loops` (it keeps that count while in use)."""
        c = self.config
        return self.cache_class(self.cache_layers(self.n_think_loops) + self.heads.cache_layers, batch,
                                c.kv_heads, max_len or c.max_seq_len, c.head_dim, device=self.device,
                                dtype=dtype or self.wte.weight.dtype, n_loops=self.n_think_loops)

    def hidden_states(self, ids: torch.Tensor, cache: KVCache | None = None, n_heads: int | None = None,
                      key_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                      with_trunk: bool = False, outputs_at: torch.Tensor | None = None,
                      parents: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Hidden states of the first `n_heads` heads, before the final norm: head k gives
        [B, T_k, D] (T_k = T, or T - k for sequential depths). With a cache, the new positions
        continue each row's cached ones and every row advances by T. `key_mask` [B, S] (False:
        a padding slot, never attended to) and `positions` [B, T] serve padded batches; the
        positions default to the slots minus the padding before them. `with_trunk`: the trunk's
        output [B, T, D] comes last, after the heads'. `outputs_at` [B] (a prefill that reads one
        position per row): the heads' states only there, [B, 1, D]; their blocks still cache every
        position, and the trunk's output stays whole. `parents` [B, T]: the new positions are a
        tree of drafts (see AttentionMask.ragged), each seeing only its ancestors."""
        n_heads = self.n_future if n_heads is None else n_heads
        self.heads.check(n_heads, cache is not None, key_mask is not None or positions is not None)
        mask = self.attention_mask(ids, cache, key_mask, positions, parents)
        if cache is not None:
            self.heads.follow_trunk(self.cache_layers(cache.n_loops))
        h = self.trunk(ids, mask, cache)
        out = self.heads_hidden(h, n_heads, ids, mask, cache, outputs_at)
        if cache is not None:
            cache.advance(ids.size(1))
        return out + [h] if with_trunk else out

    def heads_hidden(self, h: torch.Tensor, n_heads: int, ids: torch.Tensor | None = None,
                     mask: AttentionMask | None = None, cache: KVCache | None = None,
                     outputs_at: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Heads 0..n_heads-1's hidden states from the trunk's h [B, T, D]. Heads that keep nothing
        in the cache (`heads.cache_layers == 0`) and have no drafter need neither mask nor ids: the
        engine drafts with them from one position per row."""
        batched = self.stack_heads and not torch.is_grad_enabled()
        return self.heads.hidden_all(n_heads, h, self._future(ids), self.rotary, mask, cache, batched,
                                     outputs_at)

    def attention_mask(self, ids: torch.Tensor, cache: KVCache | None = None,
                       key_mask: torch.Tensor | None = None,
                       positions: torch.Tensor | None = None,
                       parents: torch.Tensor | None = None) -> AttentionMask:
        """The mask for new ids [B, T] after what `cache` holds: the plain one when every row
        starts at the same slot and nothing is padded or branches, else a ragged one."""
        starts = cache.lengths if cache is not None else [0] * ids.size(0)
        if (key_mask is None and positions is None and parents is None
                and all(n == starts[0] for n in starts)):
            return AttentionMask(starts[0], ids.size(1), ids.device)
        return AttentionMask.ragged(starts, ids.size(1), ids.device, key_mask, positions, parents)

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, n_heads: int | None = None,
                last_only: bool = False, key_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Logits [B, T_k, V] of the first `n_heads` heads (see `hidden_states`)."""
        return [self.head_logits(k, h[:, -1:] if last_only else h)
                for k, h in enumerate(self.hidden_states(ids, cache, n_heads, key_mask, positions))]
