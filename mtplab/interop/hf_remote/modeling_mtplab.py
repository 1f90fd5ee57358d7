"""`MtplabForCausalLM`: mtplab's `Transformer` as a transformers causal LM with `generate()`.

The mtplab model is the submodule `model`, so the weights keep mtplab's own state-dict names behind
a `model.` prefix (or DeepSeek-V3's names for sequential MTP modules, see deepseek_layout.py).
`logits` are head 0's, the model's next-token distribution; `output_mtp_logits=True` adds every
head's (head k predicts token t+1+k from position t), for drafting. `past_key_values` is mtplab's
own preallocated KV cache, made by a forward with `use_cache=True` and passed back in.

Padded batches: `attention_mask` [B, S] (0 = padding; S = the cache's slots so far + T, as
`generate()` passes it) becomes mtplab's key mask, so no row attends to another's padding, in the
cache too, and the positions count each row's real tokens (or are `position_ids`, when given).
Left- and right-padded rows then get exactly their unpadded logits.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ...models.kv_cache import KVCache
from ...models.layers import Rotary
from ...models.transformer import Transformer
from .configuration_mtplab import MtplabConfig
from .deepseek_layout import use_deepseek_names


class MtplabCache(KVCache):
    """mtplab's KV cache, sized for `max_seq_len`, plus what `generate()` asks of a cache. Every
    row holds the same number of slots (padding included); `key_mask` remembers which are padding,
    for a later call that passes no attention_mask."""

    n_heads = 1  # parallel heads whose blocks the cache follows; set when the cache starts
    key_mask: torch.Tensor | None = None  # [B, slots] bool, once a call had padding

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


@dataclass
class MtplabCausalLMOutput(CausalLMOutputWithPast):
    """`logits` are head 0's; `mtp_logits[k]` head k's ([B, T_k, V]; T_k = T - k for sequential
    depths, which need the tokens after each position)."""

    mtp_logits: tuple[torch.FloatTensor, ...] | None = None


# The output's cache field: `cache` from transformers 5.24 on, `past_key_values` before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# Keywords generate() and pipelines pass that cannot change mtplab's result at these values; any
# other keyword, or these at another value, is refused rather than silently dropped.
# (`cache_position` restates the cache length, which the cache itself knows.)
IGNORABLE = {"output_attentions": (None, False), "output_hidden_states": (None, False),
             "inputs_embeds": (None,), "token_type_ids": (None,), "cache_position": "any"}


def _check_ignorable(kwargs: dict) -> None:
    for key, value in kwargs.items():
        allowed = IGNORABLE.get(key)
        if allowed is None:
            raise TypeError(f"MtplabForCausalLM.forward() got an unexpected keyword argument {key!r}")
        if allowed != "any" and not any(value is a for a in allowed):
            raise ValueError(f"MtplabForCausalLM does not support {key}={value!r}")


def _padding(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
             cache: MtplabCache | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(key_mask [B, S] or None, positions [B, T] or None) for mtplab's model; None for both when
    nothing is padded and the positions are the plain ones, so unpadded calls take the plain path."""
    b, t = input_ids.shape
    past = cache.length if cache is not None else 0
    key_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.size(0) != b or attention_mask.size(1) != past + t:
            raise ValueError(f"attention_mask must be [batch, cached + new positions] = [{b}, {past + t}] "
                             f"(1: a token, 0: padding); got {list(attention_mask.shape)}")
        key_mask = attention_mask.to(input_ids.device).bool()
    elif cache is not None and cache.key_mask is not None:  # padding in the cache, none among the new
        key_mask = torch.ones(b, past + t, dtype=torch.bool, device=input_ids.device)
        key_mask[:, :past] = cache.key_mask[:, :past]
    if key_mask is not None and bool(key_mask.all()):
        key_mask = None
    if cache is not None:
        cache.key_mask = key_mask
    if position_ids is not None:
        if position_ids.dim() != 2 or position_ids.size(0) not in (1, b) or position_ids.size(1) != t:
            raise ValueError(f"position_ids must be [batch, new positions] = [{b}, {t}]; "
                             f"got {list(position_ids.shape)}")
        position_ids = position_ids.to(input_ids.device).long().expand(b, t)
        if key_mask is None:  # unpadded: the plain positions continue the cache
            plain = torch.arange(past, past + t, device=input_ids.device)
            if torch.equal(position_ids, plain.expand(b, t)):
                position_ids = None
    return key_mask, position_ids


class MtplabForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MtplabConfig
    base_model_prefix = "model"
    _supports_sdpa = True  # mtplab always attends through F.scaled_dot_product_attention

    def __init__(self, config: MtplabConfig):
        super().__init__(config)
        self.model = Transformer(config.model_config())
        self.model.cache_class = MtplabCache
        if config.num_nextn_predict_layers:
            use_deepseek_names(self.model)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not make a DynamicCache: forward makes an MtplabCache

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.wte

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        # Every weight comes from the checkpoint (or from mtplab's own init when the model is built
        # directly). Only the rotary tables are not saved: from_pretrained builds the model on the
        # meta device, so they are computed again here.
        if isinstance(module, Rotary):
            c = self.model.config
            with torch.device("cpu"):
                fresh = Rotary(c.head_dim, c.max_seq_len, c.rope_base)
            module.cos.copy_(fresh.cos)
            module.sin.copy_(fresh.sin)
            module._memo = (None, None)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None,
                past_key_values: MtplabCache | None = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None, logits_to_keep: int = 0,
                output_mtp_logits: bool = False, return_dict: bool | None = None,
                cache: MtplabCache | None = None, **kwargs) -> MtplabCausalLMOutput | tuple:
        """input_ids [B, T] continue the positions in the cache (if given). The cache arrives as
        `past_key_values` (transformers 4.x and early 5.x) or `cache` (5.24 on). `use_cache`
        (default off) starts a cache when none is given. `attention_mask` [B, cached + T]: 0 marks
        padding (left or right), which no position attends to; `position_ids` [B, T] (default:
        each row's real tokens so far, from the mask). `logits_to_keep` > 0: logits of the last
        that many positions only. `labels`: the usual shifted next-token loss on head 0 (-100 at
        padding to leave it out)."""
        if past_key_values is not None and cache is not None and past_key_values is not cache:
            raise ValueError("pass the cache once: as `cache` or as `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values
        _check_ignorable(kwargs)
        heads = self.model.heads
        n_heads = self.model.n_future if output_mtp_logits else 1
        if cache is None and use_cache:
            cache = self.model.new_cache(batch=input_ids.size(0))
            cache.n_heads = n_heads
        if cache is not None and heads.cache_layers:  # heads with blocks in the cache
            followed = getattr(cache, "n_heads", 1)
            if n_heads > followed:
                raise ValueError("this cache follows head 0 only: start it with output_mtp_logits=True "
                                 "to get every head's logits")
            n_heads = followed  # keep every head the cache follows up to date
        key_mask, positions = _padding(input_ids, attention_mask, position_ids, cache)
        hidden = self.model.hidden_states(input_ids, cache, n_heads, key_mask, positions)
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.model.head_logits(0, hidden[0][:, keep])
        mtp_logits = None
        if output_mtp_logits:
            mtp_logits = (logits,) + tuple(self.model.head_logits(k, h[:, keep])
                                           for k, h in enumerate(hidden) if k > 0)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        out = MtplabCausalLMOutput(loss=loss, logits=logits, mtp_logits=mtp_logits, **{CACHE_FIELD: cache})
        return out if return_dict is not False else out.to_tuple()
