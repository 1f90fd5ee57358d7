"""Several blocks of the same shape evaluated as one: batched matmuls and one attention call.

At batch-1 decoding on a CPU, time goes to the number of kernel launches, not to arithmetic, so the
parallel heads' blocks (same input, same shapes) cost about one block this way instead of n. Used
for inference only; training runs each head on its own to keep one head's logits alive at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .kv_cache import KVCache
from .layers import AttentionMask, Block, Rotary

PARTS = ["attn_norm.weight", "attn_norm.bias", "mlp_norm.weight", "mlp_norm.bias",
         "attn.q_proj.weight", "attn.q_proj.bias", "attn.k_proj.weight", "attn.k_proj.bias",
         "attn.v_proj.weight", "attn.v_proj.bias", "attn.o_proj.weight", "attn.o_proj.bias",
         "mlp.gate_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.weight", "mlp.up_proj.bias",
         "mlp.down_proj.weight", "mlp.down_proj.bias"]


def plain_blocks(config: ModelConfig) -> bool:
    """Whether `config`'s blocks can be stacked: StackedBlocks knows only the plain block's parts
    (affine norms, no q/k norm, full-rank projections)."""
    return config.norm_affine and not config.qk_norm and not config.low_rank


class StackedBlocks:
    def __init__(self, blocks: list[Block], first_layer: int):
        self.blocks, self.first_layer = blocks, first_layer
        self.key, self.w = None, {}
        attn, mlp = blocks[0].attn, blocks[0].mlp
        self.n_heads, self.n_kv, self.hd = attn.n_heads, attn.n_kv, attn.hd
        self.mlp_kind = mlp.kind
        self.rms = isinstance(blocks[0].attn_norm, torch.nn.RMSNorm)
        self.eps = blocks[0].attn_norm.eps
        # (part, the module holding it in each block, its parameter name): looked up at every
        # call, which costs far less than walking named_parameters() once per decoding step
        self.parts = []
        for name in PARTS:
            path, attr = name.rsplit(".", 1)
            try:
                holders = [b.get_submodule(path) for b in blocks]
            except AttributeError:  # a part this MLP kind does not have
                continue
            if getattr(holders[0], attr, None) is not None:
                self.parts.append((name, holders, attr))

    def _weights(self) -> dict[str, torch.Tensor]:
        """Stacked copies, rebuilt whenever a parameter changed: in place (training, loading) or
        its storage (`model.to(device)` swaps `.data` without a new version)."""
        params = [(name, [getattr(h, attr) for h in holders]) for name, holders, attr in self.parts]
        key = tuple((p.data_ptr(), p._version) for _, ps in params for p in ps)
        if key != self.key:
            self.w = {}
            for name, ps in params:
                stacked = torch.stack([p.detach() for p in ps])
                # linear weights [n, out, in] -> [n, in, out] for bmm; vectors -> [n, 1, dim]
                self.w[name] = stacked.transpose(1, 2).contiguous() if stacked.dim() == 3 \
                    else stacked.unsqueeze(1)
            self.key = key
        return self.w

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        bias = self.w.get(name + ".bias")
        w = self.w[name + ".weight"]
        return torch.baddbmm(bias, x, w) if bias is not None else torch.bmm(x, w)

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        d = x.size(-1)
        if self.rms:
            return F.rms_norm(x, (d,), eps=self.eps) * self.w[name + ".weight"]
        y = F.layer_norm(x, (d,), eps=self.eps) * self.w[name + ".weight"]
        return y + self.w[name + ".bias"] if name + ".bias" in self.w else y

    def __call__(self, x: torch.Tensor, mask: AttentionMask, rotary: Rotary | None,
                 cache: KVCache | None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, B, T, D] (head i's input) -> [n, B, T, D]; with `keep` ([B] positions) every
        position's keys and values but only position keep[b]'s output: [n, B, 1, D]."""
        self._weights()
        n, b, t, d = x.shape
        flat = x.reshape(n, b * t, d)
        h = self._norm(flat, "attn_norm")
        k = self._linear(h, "attn.k_proj").view(n * b, t, self.n_kv, self.hd).transpose(1, 2)
        v = self._linear(h, "attn.v_proj").view(n * b, t, self.n_kv, self.hd).transpose(1, 2)
        at = mask if keep is None else mask.at(keep)
        if keep is not None:  # the residual stream and the queries only where outputs are read
            rows = torch.arange(b, device=x.device)
            flat = x[:, rows, keep]  # [n, B, D]
            h = h.view(n, b, t, d)[:, rows, keep]
            t = 1
        q = self._linear(h, "attn.q_proj").view(n * b, t, self.n_heads, self.hd).transpose(1, 2)
        if rotary is not None and keep is None:  # q and k in one rotation
            q, k = rotary(torch.cat([q, k], dim=1), mask).split([self.n_heads, self.n_kv], dim=1)
        elif rotary is not None:
            q, k = rotary(q, at), rotary(k, mask)
        if cache is not None:
            kn, vn = cache.update_layers(self.first_layer, k.view(n, b, self.n_kv, -1, self.hd),
                                         v.view(n, b, self.n_kv, -1, self.hd))
            k, v = kn.reshape(n * b, self.n_kv, -1, self.hd), vn.reshape(n * b, self.n_kv, -1, self.hd)
        attn_mask = at.mask
        if attn_mask is not None and attn_mask.dim() == 4:  # per row: the same rows for every head
            attn_mask = attn_mask.repeat(n, 1, 1, 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=at.is_causal,
                                           enable_gqa=self.n_kv != self.n_heads)
        y = y.transpose(1, 2).reshape(n, b * t, self.n_heads * self.hd)
        flat = flat + self._linear(y, "attn.o_proj")
        h = self._norm(flat, "mlp_norm")
        if self.mlp_kind == "swiglu":
            h = F.silu(self._linear(h, "mlp.gate_proj")) * self._linear(h, "mlp.up_proj")
        elif self.mlp_kind == "relu2":
            h = F.relu(self._linear(h, "mlp.up_proj")).square()
        else:
            h = F.gelu(self._linear(h, "mlp.up_proj"), approximate="tanh")
        return (flat + self._linear(h, "mlp.down_proj")).view(n, b, t, d)
