"""GPT-2 in Hugging Face's layout -> the MTP GPT-2 (MultiTokenGPT2) as an mtplab model.

The MTP GPT-2 splits GPT-2 124M into a shared trunk (embeddings + blocks 0-8) and four parallel
heads, full GPT-2 blocks initialised from blocks 9, 10, 11 and 11 again, all reading the trunk
output and sharing the final LayerNorm and the unembedding tied to wte. In general, for L blocks
and N heads:

    trunk  = blocks 0 .. T-1, with T = L - max(N-1, 1)
    head k = a copy of block min(T + k, L-1)

so N = 4, L = 12 gives trunk 0-8 and heads 9, 10, 11, 11, and N = 1 keeps GPT-2 exactly (trunk
0..L-2, head 0 = block L-1). `head_blocks` names the heads' source blocks instead; the trunk is then
every block before the first of them.

HF stores the projections as Conv1D, weight [in, out]: the transpose of nn.Linear's [out, in]; c_attn
packs q, k and v side by side along its output dimension.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import MtplabError
from ..models.transformer import Transformer
from .sources import (ConvertOptions, Converted, KeyReport, SourceWeights, assemble, config_int,
                      load_tokenizer, read_json, read_weights)

# The tanh approximation of GELU under HF's names; mtplab's MLP computes exactly this one.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
MASK_BUFFER = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")


def split_blocks(n_layer: int, heads: int | None, head_blocks: list[int] | None) -> tuple[int, list[int]]:
    """(trunk block count, source block of each head) for `heads` heads or explicit `head_blocks`."""
    if head_blocks is not None:
        if heads is not None and heads != len(head_blocks):
            raise MtplabError(f"--heads {heads} but --head-blocks names {len(head_blocks)} blocks")
        bad = [b for b in head_blocks if not 0 <= b < n_layer]
        if not head_blocks or bad:
            raise MtplabError(f"--head-blocks must name blocks 0..{n_layer - 1} of the source, got "
                              f"{','.join(map(str, head_blocks))}")
        trunk = min(head_blocks)
        if trunk < 1:
            raise MtplabError("--head-blocks: block 0 cannot start a head, the trunk needs it")
        return trunk, list(head_blocks)
    if heads is None:
        raise MtplabError("gpt2: pass --heads N (1 keeps GPT-2 as it is; the MTP GPT-2 uses 4)")
    if not 1 <= heads <= n_layer:
        raise MtplabError(f"--heads must be between 1 and {n_layer} (the source's blocks), got {heads}")
    trunk = n_layer - max(heads - 1, 1)
    return trunk, [min(trunk + k, n_layer - 1) for k in range(heads)]


def gpt2_shape(hf: dict[str, Any], where: str | Path) -> dict[str, Any]:
    """The sizes of an HF GPT-2 config.json, refusing variants mtplab's blocks do not compute."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise MtplabError(f"{where}: model_type is {hf.get('model_type')!r}, not gpt2")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in TANH_GELUS:
        raise MtplabError(f"{where}: activation_function {activation!r} is not the tanh GELU "
                          f"({', '.join(TANH_GELUS)}) that mtplab's MLP computes")
    for flag, fine in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True),
                       ("add_cross_attention", False)):
        if hf.get(flag, fine) != fine:
            raise MtplabError(f"{where}: {flag} = {hf[flag]!r} is not supported")
    shape = {key: config_int(hf, key, where)
             for key in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")}
    shape["d_ff"] = hf.get("n_inner") or 4 * shape["n_embd"]
    shape["eps"] = float(hf.get("layer_norm_epsilon", 1e-5))
    shape["tied"] = hf.get("tie_word_embeddings", True) is not False
    return shape


def block_weights(src: SourceWeights, source: str, target: str, d: int, d_ff: int) -> dict[str, torch.Tensor]:
    """One GPT-2 block (keys under `source`, e.g. 'h.9.') as mtplab block tensors under `target`."""
    w = {}
    for norm, into in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
        w[f"{target}{into}.weight"] = src.take(f"{source}{norm}.weight", (d,))
        w[f"{target}{into}.bias"] = src.take(f"{source}{norm}.bias", (d,))
    qkv = src.take(f"{source}attn.c_attn.weight", (d, 3 * d)).t()  # Conv1D [in, 3d] -> [3d, in]
    qkv_bias = src.take(f"{source}attn.c_attn.bias", (3 * d,))
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        w[f"{target}attn.{proj}.weight"] = qkv[i * d:(i + 1) * d]
        w[f"{target}attn.{proj}.bias"] = qkv_bias[i * d:(i + 1) * d]
    for source_name, into, d_in, d_out in (("attn.c_proj", "attn.o_proj", d, d),
                                           ("mlp.c_fc", "mlp.up_proj", d, d_ff),
                                           ("mlp.c_proj", "mlp.down_proj", d_ff, d)):
        w[f"{target}{into}.weight"] = src.take(f"{source}{source_name}.weight", (d_in, d_out)).t()
        w[f"{target}{into}.bias"] = src.take(f"{source}{source_name}.bias", (d_out,))
    return w


def gpt2_to_mtplab(hf_config: dict[str, Any], tensors: dict[str, torch.Tensor], heads: int | None = 1,
                   head_blocks: list[int] | None = None, where: str | Path = "GPT-2"
                   ) -> tuple[Transformer, KeyReport, int, list[int]]:
    """An HF GPT-2 config dict and state dict -> (mtplab model, key report, trunk blocks, head
    source blocks). Refuses on a missing or mis-shaped tensor; never loads partially."""
    s = gpt2_shape(hf_config, where)
    trunk, sources = split_blocks(s["n_layer"], heads, head_blocks)
    d, d_ff, vocab = s["n_embd"], s["d_ff"], s["vocab_size"]
    if d % s["n_head"]:
        raise MtplabError(f"{where}: n_embd {d} is not a multiple of n_head {s['n_head']}")
    # GPT2LMHeadModel saves its body under "transformer."; GPT2Model (and the original hub files) bare.
    root = "transformer." if "transformer.wte.weight" in tensors else ""
    src = SourceWeights(tensors, where)
    w = {"wte.weight": src.take(f"{root}wte.weight", (vocab, d)),
         "wpe.weight": src.take(f"{root}wpe.weight", (s["n_positions"], d)),
         "norm_f.weight": src.take(f"{root}ln_f.weight", (d,)),
         "norm_f.bias": src.take(f"{root}ln_f.bias", (d,))}
    for i in range(trunk):
        w.update(block_weights(src, f"{root}h.{i}.", f"blocks.{i}.", d, d_ff))
    for k, b in enumerate(sources):  # a block two heads start from is taken twice: two copies
        w.update(block_weights(src, f"{root}h.{b}.", f"heads.heads.{k}.0.", d, d_ff))
    tied = s["tied"]
    if "lm_head.weight" in tensors:
        if tied and torch.equal(tensors["lm_head.weight"].float(), w["wte.weight"]):
            src.ignore("lm_head.weight", "tied to wte")
        elif tied:
            raise MtplabError(f"{where}: lm_head.weight differs from wte.weight although the config "
                              "ties them")
        else:
            w["lm_head.weight"] = src.take("lm_head.weight", (vocab, d))
    elif not tied:
        src.take("lm_head.weight", (vocab, d))  # an untied head without its weight: refused here
    for key in tensors:
        if MASK_BUFFER.fullmatch(key):  # the causal mask and its fill value, not weights
            src.ignore(key, "attention-mask buffer")
    config = ModelConfig(vocab_size=vocab, d_model=d, n_layers=trunk, n_heads=s["n_head"], d_ff=d_ff,
                         max_seq_len=s["n_positions"], pos="learned", norm="layernorm",
                         norm_eps=s["eps"], mlp="gelu", bias=True, tie_embeddings=tied,
                         mtp="parallel", n_future=len(sources), head_layers=1)
    return assemble(config, w, where), src.report(), trunk, sources


def mtplab_from_gpt2(hf_model, heads: int = 1, head_blocks: list[int] | None = None) -> Transformer:
    """An in-memory `transformers.GPT2LMHeadModel` as an mtplab model (heads=1: the same logits)."""
    model, _, _, _ = gpt2_to_mtplab(hf_model.config.to_dict(), hf_model.state_dict(), heads,
                                    head_blocks, type(hf_model).__name__)
    return model


def convert_gpt2(source: Path, options: ConvertOptions) -> Converted:
    """A local HF GPT-2 directory (config.json + model.safetensors or pytorch_model.bin)."""
    if not source.is_dir() or not (source / "config.json").is_file():
        raise MtplabError(f"{source} is not an HF GPT-2 directory (no config.json)")
    hf_config = read_json(source / "config.json")
    tensors, weights_file = read_weights(source)
    model, report, trunk, sources = gpt2_to_mtplab(hf_config, tensors, options.heads,
                                                   options.head_blocks, weights_file)
    tokenizer, tokenizer_path = load_tokenizer(options.tokenizer, [source], options.eos,
                                               model.config.vocab_size, "GPT-2")
    heads = ", ".join(f"head {k} <- block {b}" for k, b in enumerate(sources))
    blocks = f"blocks 0-{trunk - 1}" if trunk > 1 else "block 0"
    notes = [f"trunk: embeddings + {blocks}; {heads}; shared final LayerNorm; "
             f"unembedding {'tied to wte' if model.config.tie_embeddings else 'untied'}",
             f"tokenizer: {tokenizer_path} ({tokenizer.vocab_size} tokens, eos {tokenizer.eos!r})"]
    return Converted(model, tokenizer, report, notes,
                     {"trunk_blocks": list(range(trunk)), "head_blocks": sources,
                      "tokenizer": str(tokenizer_path)})
