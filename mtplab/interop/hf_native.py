"""Native Hugging Face architectures: `mtplab export-hf --format native` and `mtplab convert hf`.

When a checkpoint's next-token path is exactly a standard architecture, the export is that
architecture's own directory, loadable with `trust_remote_code=False` (lm-eval, vLLM, TGI and
llama.cpp's convert_hf_to_gguf.py read it as they read any GPT-2 or Llama):

    pos="learned", LayerNorm, tanh-GELU MLP           -> GPT2LMHeadModel   (model_type "gpt2")
    pos="rope", RMSNorm, SwiGLU MLP (GQA, tied or not) -> LlamaForCausalLM  (model_type "llama")

The standard model's layers are the trunk's blocks and, for parallel heads, head 0's blocks (which
finish the next-token path); `native_layers` lists them. What a standard config can express is
mapped (norm_eps, rope_base, kv heads, d_ff, tie_embeddings, max_seq_len, dropout; mtplab's bias
flag is Llama's attention_bias + mlp_bias, GPT-2 always has biases). A weight the standard model has
and the mtplab one lacks is written as the constant that computes the same (parameterless norms:
gain 1, bias 0; GPT-2 without biases: 0) and checked to still be that constant on the way back.
Anything else (value embeddings, QK-norm, windows, smear, backout, softcap, loops, low rank, slot
heads, whose head 0 is a slot MLP) has no place in a standard class: `misfits` names it, and such
a checkpoint keeps the remote-code export.

The extra heads go beside the standard files:

    mtp_heads.safetensors   every tensor the standard model does not hold, under mtplab's own
                            state-dict names (heads.*); absent when there is none
    mtp_heads.json          the full ModelConfig ("model"), the tokenizer's description, the
                            mtplab version and which standard layer is which mtplab block
    model.safetensors.index.json   names model.safetensors as the only weights file, so that
                            loaders globbing *.safetensors (vLLM) leave mtp_heads.safetensors alone

A padded vocabulary (vocab_size rows, vocab_real of them the tokenizer's) is cut to its real rows:
a standard class cannot mask logits, and so its config's vocab_size is the tokenizer's, generate()
never emits a padded id and lm-eval's log-softmax is over the real vocabulary, as mtplab's is.

`convert_hf` reads such a directory back into the mtplab checkpoint it came from, bit for bit but
for the padded rows, which come back as zeros (never read: no token has their id, their logits are
-inf), and a plain GPT-2 or Llama directory (no mtp_heads.json) as a one-head mtplab model. GPT-2's tensors
come in through gpt2.py's mapping; Llama's names are the one table `llama_names`, read both ways.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..architectures import architecture_of
from ..config import ModelConfig, model_config_from_dict
from ..errors import MtplabError
from ..models.heads import family
from ..models.layout import attention_window, ff_dim
from ..models.transformer import Transformer
from ..tokenizer import CHAT_TEMPLATES, Tokenizer
from ..version import __version__
from .gpt2 import block_weights, gpt2_shape, gpt2_to_mtplab, split_blocks
from .sources import (ConvertOptions, Converted, SourceWeights, assemble, config_int, load_tokenizer,
                      read_json, read_safetensors, read_weights)

GPT2, LLAMA = "GPT2LMHeadModel", "LlamaForCausalLM"
MODEL_TYPES = {GPT2: "gpt2", LLAMA: "llama"}
VOCAB_TABLES = ("wte.weight", "lm_head.weight")  # [vocab_size, D]: cut to the real rows in the export
HEADS_JSON, HEADS_WEIGHTS, INDEX = "mtp_heads.json", "mtp_heads.safetensors", "model.safetensors.index.json"


# -- does the trunk fit? -------------------------------------------------------------------------
def target(config: ModelConfig) -> str:
    """The standard class a trunk would be: learned positions are GPT-2's, RoPE is Llama's."""
    return GPT2 if config.pos == "learned" else LLAMA


def misfits(config: ModelConfig) -> list[tuple[str, str]]:
    """What keeps the trunk from being exactly `target(config)`: (feature in words, with the verb
    that follows it; its setting). Empty when it fits."""
    c, arch, other = config, target(config), architecture_of(config)
    windowed = any(0 < attention_window(c, i) < c.max_seq_len for i in range(c.n_layers))
    found = [
        (other is not None, f"a {other and other.label} model has", f"model.arch={c.arch!r}"),
        (c.value_embeds, "value embeddings (model.value_embeds) have", "model.value_embeds=true"),
        (c.embed_norm, "the embedding norm (model.embed_norm) has", "model.embed_norm=true"),
        (c.qk_norm, "QK-norm (model.qk_norm) has", "model.qk_norm=true"),
        (windowed, f"sliding-window attention (model.window_pattern={c.window_pattern!r}) has",
         f"model.window_pattern={c.window_pattern!r}"),
        (c.layer_lambdas, "per-layer residual and x0 scales (model.layer_lambdas) have",
         "model.layer_lambdas=true"),
        (c.smear > 0, f"smear (model.smear={c.smear}) has", f"model.smear={c.smear}"),
        (c.backout, "backout (model.backout) has", "model.backout=true"),
        (c.logit_softcap > 0, f"the logit softcap (model.logit_softcap={c.logit_softcap:g}) has",
         f"model.logit_softcap={c.logit_softcap:g}"),
        (c.loop_layers > 0, f"looped layers (model.loop_layers={c.loop_layers}) have",
         f"model.loop_layers={c.loop_layers}"),
        (c.low_rank > 0, f"low-rank projections (model.low_rank={c.low_rank}) have",
         f"model.low_rank={c.low_rank}"),
        (family(c).native_misfit is not None, family(c).native_misfit, f"model.mtp={c.mtp!r}"),
    ]
    if arch == LLAMA:
        found += [(c.norm != "rmsnorm", f"{c.norm} (model.norm={c.norm!r}) has", f"model.norm={c.norm!r}"),
                  (c.mlp != "swiglu", f"the {c.mlp} MLP (model.mlp={c.mlp!r}; Llama's is SwiGLU) has",
                   f"model.mlp={c.mlp!r}")]
    else:
        found += [(c.norm != "layernorm", f"{c.norm} (model.norm={c.norm!r}) has", f"model.norm={c.norm!r}"),
                  (c.mlp != "gelu", f"the {c.mlp} MLP (model.mlp={c.mlp!r}; GPT-2's is tanh GELU) has",
                   f"model.mlp={c.mlp!r}"),
                  (c.kv_heads != c.n_heads, f"grouped-query attention (model.n_kv_heads={c.n_kv_heads}) has",
                   f"model.n_kv_heads={c.n_kv_heads}")]
    return [(words, setting) for hit, words, setting in found if hit]


def misfit_message(config: ModelConfig) -> str | None:
    """One line naming what does not fit (the first feature, then the others' settings), or None."""
    found = misfits(config)
    if not found:
        return None
    others = f" (nor {', '.join(setting for _, setting in found[1:])})" if len(found) > 1 else ""
    return (f"cannot export natively: {found[0][0]} no place in {target(config)}{others}; "
            "--format remote exports it with remote code")


def check_fits(config: ModelConfig) -> str:
    """The standard class of a trunk that fits; else the one-line MtplabError."""
    message = misfit_message(config)
    if message:
        raise MtplabError(message)
    return target(config)


# -- names -----------------------------------------------------------------------------------------
def native_layers(config: ModelConfig) -> list[str]:
    """The mtplab block (state-dict prefix) of each standard layer: the trunk's blocks, then for
    parallel heads head 0's, which finish the next-token path (other families' head 0 is the trunk)."""
    return [f"blocks.{i}." for i in range(config.n_layers)] + family(config).next_token_blocks(config)


def _fill(name: str) -> float:
    """The value of a weight the standard model has and this mtplab model does not: a norm's gain
    is 1, any bias 0 (both compute exactly what the missing weight's absence computes)."""
    return 1.0 if name.endswith("weight") else 0.0


def llama_names(config: ModelConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """(mtplab name, LlamaForCausalLM name, shape) of every tensor the Llama model holds."""
    c = config
    d, f, q, kv = c.d_model, ff_dim(c), c.n_heads * c.head_dim, c.kv_heads * c.head_dim
    names = [("wte.weight", "model.embed_tokens.weight", (c.real_vocab_size, d))]
    for i, block in enumerate(native_layers(c)):
        layer = f"model.layers.{i}."
        parts = [("attn_norm.weight", "input_layernorm.weight", (d,)),
                 ("mlp_norm.weight", "post_attention_layernorm.weight", (d,))]
        for proj, d_out, d_in in (("q_proj", q, d), ("k_proj", kv, d), ("v_proj", kv, d), ("o_proj", d, q)):
            parts.append((f"attn.{proj}.weight", f"self_attn.{proj}.weight", (d_out, d_in)))
            if c.bias:
                parts.append((f"attn.{proj}.bias", f"self_attn.{proj}.bias", (d_out,)))
        for proj, d_out, d_in in (("gate_proj", f, d), ("up_proj", f, d), ("down_proj", d, f)):
            parts.append((f"mlp.{proj}.weight", f"mlp.{proj}.weight", (d_out, d_in)))
            if c.bias:
                parts.append((f"mlp.{proj}.bias", f"mlp.{proj}.bias", (d_out,)))
        names += [(block + ours, layer + theirs, shape) for ours, theirs, shape in parts]
    names.append(("norm_f.weight", "model.norm.weight", (d,)))
    if not c.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight", (c.real_vocab_size, d)))
    return names


# -- configs ---------------------------------------------------------------------------------------
def native_config(config: ModelConfig, eos_id: int | None = None, pad_id: int | None = None,
                  dtype: str = "float32") -> dict[str, Any]:
    """The standard class's config.json for a trunk that fits."""
    c, arch = config, check_fits(config)
    common = {"architectures": [arch], "model_type": MODEL_TYPES[arch], "vocab_size": c.real_vocab_size,
              "initializer_range": c.init_std, "tie_word_embeddings": c.tie_embeddings,
              "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": pad_id, "use_cache": True,
              "dtype": dtype, "torch_dtype": dtype}  # the name transformers 5 reads, and 4's
    n = len(native_layers(c))
    if arch == GPT2:
        return {**common, "n_layer": n, "n_embd": c.d_model, "n_head": c.n_heads, "n_inner": ff_dim(c),
                "n_positions": c.max_seq_len, "n_ctx": c.max_seq_len, "activation_function": "gelu_new",
                "layer_norm_epsilon": c.norm_eps, "resid_pdrop": c.dropout, "embd_pdrop": c.dropout,
                "attn_pdrop": c.dropout, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    return {**common, "num_hidden_layers": n, "hidden_size": c.d_model, "intermediate_size": ff_dim(c),
            "num_attention_heads": c.n_heads, "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
            "hidden_act": "silu", "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
            # rope_theta for transformers 4 and llama.cpp, rope_parameters for transformers 5
            "rope_theta": c.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_base},
            "attention_bias": c.bias, "mlp_bias": c.bias, "attention_dropout": c.dropout,
            "pretraining_tp": 1}


def llama_shape(hf: dict[str, Any], where: str | Path) -> dict[str, Any]:
    """The sizes of an HF Llama config.json, refusing variants mtplab's blocks do not compute."""
    if hf.get("model_type") != "llama":
        raise MtplabError(f"{where}: model_type is {hf.get('model_type')!r}, not llama")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise MtplabError(f"{where}: hidden_act {act!r} is not SwiGLU's silu, which mtplab's MLP computes")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise MtplabError(f"{where}: RoPE scaling {kind!r} is not supported (mtplab computes plain RoPE)")
    s = {key: config_int(hf, key, where) for key in ("vocab_size", "hidden_size", "intermediate_size",
                                                     "num_hidden_layers", "num_attention_heads")}
    s["num_key_value_heads"] = hf.get("num_key_value_heads") or s["num_attention_heads"]
    width = s["hidden_size"] // s["num_attention_heads"]
    head_dim = hf.get("head_dim") or width
    if head_dim != width or width * s["num_attention_heads"] != s["hidden_size"]:
        raise MtplabError(f"{where}: head_dim {head_dim} x {s['num_attention_heads']} heads is not "
                          f"hidden_size {s['hidden_size']} (mtplab's heads split d_model)")
    if s["num_attention_heads"] % s["num_key_value_heads"]:
        raise MtplabError(f"{where}: num_attention_heads is not a multiple of num_key_value_heads")
    bias = bool(hf.get("attention_bias", False))
    if bool(hf.get("mlp_bias", False)) != bias:
        raise MtplabError(f"{where}: attention_bias and mlp_bias differ; mtplab's bias flag sets both")
    s["bias"] = bias
    s["max_position_embeddings"] = config_int(hf, "max_position_embeddings", where)
    s["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    s["rms_norm_eps"] = float(hf.get("rms_norm_eps", 1e-6))
    s["tied"] = bool(hf.get("tie_word_embeddings", False))  # LlamaConfig's default: untied
    return s


def shape_of(hf: dict[str, Any], where: str | Path) -> dict[str, Any]:
    return (gpt2_shape if hf.get("model_type") == "gpt2" else llama_shape)(hf, where)


def heads_description(config: ModelConfig) -> str:
    if config.n_future == 1:
        return "one head: the standard model is the whole model"
    return family(config).layout(config, len(native_layers(config)) - 1)


# -- the export ------------------------------------------------------------------------------------
def native_files(model: Transformer, tokenizer: Tokenizer) -> dict[str, Any]:
    """The standard files of a model whose trunk fits (else the one-line MtplabError): file name ->
    dict (JSON) or (tensors, metadata) (safetensors). Tokenizer and generation files are the
    caller's (hf_export, shared with the remote export)."""
    c = model.config
    arch = check_fits(c)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for table in VOCAB_TABLES:  # the padded rows stay behind (see the module's docstring)
        if table in state:
            state[table] = state[table][:c.real_vocab_size]
    dtype = model.wte.weight.dtype
    used: set[str] = set()

    def part(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name in state:
            used.add(name)
            return state[name]
        return torch.full(shape, _fill(name), dtype=dtype)

    if arch == LLAMA:
        weights = {theirs: part(ours, shape) for ours, theirs, shape in llama_names(c)}
    else:
        weights = gpt2_weights(c, part)
    weights = {k: v.contiguous() for k, v in weights.items()}
    left = {k: v.contiguous() for k, v in state.items() if k not in used}
    stray = [k for k in left if not k.startswith("heads.")]
    if stray:  # a trunk tensor `misfits` does not know of: never drop it
        raise MtplabError(f"cannot export natively: {stray[0]} has no place in {arch}")
    files: dict[str, Any] = {
        "config.json": native_config(c, tokenizer.eos_id, tokenizer.pad_id,
                                     str(dtype).removeprefix("torch.")),
        "model.safetensors": (weights, {"format": "pt"}),
        INDEX: {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())},
                "weight_map": {name: "model.safetensors" for name in sorted(weights)}},
        HEADS_JSON: {"mtplab_version": __version__, "architecture": arch, "model": asdict(c),
                     "tokenizer": tokenizer.describe(), "native_layers": native_layers(c),
                     "heads_file": HEADS_WEIGHTS if left else None, "heads": heads_description(c)},
    }
    if left:
        files[HEADS_WEIGHTS] = (left, {"format": "pt", "mtplab_version": __version__})
    return files


def gpt2_weights(c: ModelConfig, part) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's tensors, the inverse of gpt2.block_weights: Conv1D stores [in, out], the
    transpose of nn.Linear's weight, and c_attn packs q, k and v side by side."""
    d, f = c.d_model, ff_dim(c)
    w = {"transformer.wte.weight": part("wte.weight", (c.real_vocab_size, d)),
         "transformer.wpe.weight": part("wpe.weight", (c.max_seq_len, d))}
    for i, block in enumerate(native_layers(c)):
        h = f"transformer.h.{i}."
        for norm, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            for kind in ("weight", "bias"):
                w[f"{h}{norm}.{kind}"] = part(f"{block}{ours}.{kind}", (d,))
        qkv = [f"{block}attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        w[f"{h}attn.c_attn.weight"] = torch.cat([part(f"{p}.weight", (d, d)) for p in qkv]).t()
        w[f"{h}attn.c_attn.bias"] = torch.cat([part(f"{p}.bias", (d,)) for p in qkv])
        for theirs, ours, d_in, d_out in (("attn.c_proj", "attn.o_proj", d, d), ("mlp.c_fc", "mlp.up_proj", d, f),
                                          ("mlp.c_proj", "mlp.down_proj", f, d)):
            w[f"{h}{theirs}.weight"] = part(f"{block}{ours}.weight", (d_out, d_in)).t()
            w[f"{h}{theirs}.bias"] = part(f"{block}{ours}.bias", (d_out,))
    w["transformer.ln_f.weight"] = part("norm_f.weight", (d,))
    w["transformer.ln_f.bias"] = part("norm_f.bias", (d,))
    if not c.tie_embeddings:
        w["lm_head.weight"] = part("lm_head.weight", (c.real_vocab_size, d))
    return w


# -- back: `mtplab convert hf DIR --out CKPT` -----------------------------------------------------------
def convert_hf(source: Path, options: ConvertOptions) -> Converted:
    """An HF GPT-2 or Llama directory -> an mtplab checkpoint. With mtp_heads.json (a native export)
    the mtplab model it came from, every head included; without, a one-head model computing the same
    as the directory (the last layer as head 0's block, as `convert gpt2 --heads 1` has it)."""
    if not source.is_dir() or not (source / "config.json").is_file():
        raise MtplabError(f"{source} is not an HF model directory (no config.json)")
    hf = read_json(source / "config.json")
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES.values():
        hint = (" (an mtplab remote-code export: convert the checkpoint it was exported from)"
                if kind == "mtplab" else "")
        raise MtplabError(f"{source}: model_type {kind!r}{hint}; convert hf reads "
                          f"{' and '.join(MODEL_TYPES.values())} directories")
    tensors, weights_file = read_weights(source)
    meta = read_json(source / HEADS_JSON) if (source / HEADS_JSON).is_file() else None
    if meta is None:
        model, report, config = plain_model(hf, tensors, weights_file)
        tokenizer_meta: dict[str, Any] = {}
    else:
        config = heads_config(hf, meta, source)
        src = SourceWeights(tensors, weights_file)
        weights = (llama_to_mtplab if kind == "llama" else gpt2_native_to_mtplab)(config, src)
        weights = pad_vocab(config, drop_fills(config, weights, weights_file))
        heads_path = source / HEADS_WEIGHTS
        heads = read_safetensors(heads_path) if heads_path.is_file() else {}
        clash = sorted(set(heads) & set(weights))
        if clash:
            raise MtplabError(f"{heads_path}: {clash[0]} is also in {weights_file.name}")
        model = assemble(config, {**weights, **heads}, source)
        report = src.report()
        tokenizer_meta = meta.get("tokenizer") or {}
    eos = options.eos or tokenizer_meta.get("eos")
    tokenizer, tokenizer_path = load_tokenizer(options.tokenizer, [source], eos, config.real_vocab_size,
                                               MODEL_TYPES[target(config)])
    template = tokenizer_meta.get("chat_template", tokenizer.chat_template)
    if template not in CHAT_TEMPLATES:
        raise MtplabError(f"{source / HEADS_JSON}: unknown chat template {template!r}")
    tokenizer = Tokenizer(tokenizer.hf, eos=tokenizer.eos, chat_template=template,
                          pad=tokenizer_meta.get("pad", tokenizer.pad))
    arch = target(config)
    heads = (f"{config.n_future} {config.mtp} heads, from {HEADS_WEIGHTS}" if meta is not None
             and (source / HEADS_WEIGHTS).is_file() else f"{config.n_future} head")
    notes = [f"{arch}: {len(native_layers(config))} layers -> trunk of {config.n_layers} blocks"
             f"{' + head 0' if config.mtp == 'parallel' and config.head_layers else ''}; {heads}; "
             f"unembedding {'tied' if config.tie_embeddings else 'untied'}",
             f"tokenizer: {tokenizer_path} ({tokenizer.vocab_size} tokens, eos {tokenizer.eos!r})"]
    return Converted(model, tokenizer, report, notes,
                     {"architecture": arch, "mtp_heads": meta is not None, "tokenizer": str(tokenizer_path)})


def heads_config(hf: dict[str, Any], meta: dict[str, Any], source: Path) -> ModelConfig:
    """The ModelConfig of mtp_heads.json, checked to describe the standard model beside it."""
    where = source / HEADS_JSON
    if not isinstance(meta.get("model"), dict):
        raise MtplabError(f"{where} has no model section")
    config = model_config_from_dict(meta["model"], str(where))
    arch = check_fits(config)
    if MODEL_TYPES[arch] != hf.get("model_type"):
        raise MtplabError(f"{where} describes a {arch}, but config.json's model_type is "
                          f"{hf.get('model_type')!r}")
    have, want = shape_of(hf, source / "config.json"), shape_of(native_config(config), where)
    wrong = [key for key in want if have.get(key) != want[key]]
    if wrong:
        raise MtplabError(f"{source / 'config.json'} does not match {where}: {wrong[0]} is "
                          f"{have.get(wrong[0])!r}, the mtplab model has {want[wrong[0]]!r}")
    return config


def llama_to_mtplab(config: ModelConfig, src: SourceWeights) -> dict[str, torch.Tensor]:
    weights = {ours: src.take(theirs, shape) for ours, theirs, shape in llama_names(config)}
    tied_head(config, src, weights["wte.weight"])
    return weights


def gpt2_native_to_mtplab(config: ModelConfig, src: SourceWeights) -> dict[str, torch.Tensor]:
    """A GPT2LMHeadModel's tensors under mtplab's names, layer i into native_layers' block i."""
    c = config
    d = c.d_model
    root = "transformer." if src.has("transformer.wte.weight") else ""
    w = {"wte.weight": src.take(f"{root}wte.weight", (c.real_vocab_size, d)),
         "wpe.weight": src.take(f"{root}wpe.weight", (c.max_seq_len, d)),
         "norm_f.weight": src.take(f"{root}ln_f.weight", (d,)),
         "norm_f.bias": src.take(f"{root}ln_f.bias", (d,))}
    for i, block in enumerate(native_layers(c)):
        w.update(block_weights(src, f"{root}h.{i}.", block, d, ff_dim(c)))
    if not c.tie_embeddings:
        w["lm_head.weight"] = src.take("lm_head.weight", (c.real_vocab_size, d))
    else:
        tied_head(c, src, w["wte.weight"])
    return w


def tied_head(config: ModelConfig, src: SourceWeights, wte: torch.Tensor) -> None:
    """A tied model's saved lm_head.weight is a copy of the embedding (ignored), or an error."""
    if config.tie_embeddings and src.has("lm_head.weight"):
        if not torch.equal(src.tensors["lm_head.weight"].float(), wte):
            raise MtplabError(f"{src.where}: lm_head.weight differs from the embedding although the "
                              "config ties them")
        src.ignore("lm_head.weight", "tied to the embedding")


def pad_vocab(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The export's vocabulary tables [vocab_real, D] back at the model's vocab_size rows: zeros
    after the real ones (rows no token reads and whose logits are -inf)."""
    padding = config.vocab_size - config.real_vocab_size
    return {name: torch.cat([t, t.new_zeros(padding, t.size(1))]) if name in VOCAB_TABLES and padding else t
            for name, t in weights.items()}


def drop_fills(config: ModelConfig, weights: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """Drop the standard weights this mtplab model lacks, which must still hold the constants the
    export wrote (a norm's gain 1, a bias 0); anything else would not survive the conversion."""
    with torch.device("meta"):
        expected = set(Transformer(config).state_dict())
    kept = {}
    for name, tensor in weights.items():
        if name in expected:
            kept[name] = tensor
        elif not torch.all(tensor == _fill(name)):
            raise MtplabError(f"{where}: {name} is not {_fill(name):g} everywhere, but the mtplab model "
                              "has no such weight (see mtp_heads.json's model): it would be lost")
    return kept


def plain_model(hf: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path):
    """A standard directory without mtplab heads: (model, key report, config), one head."""
    if hf.get("model_type") == "gpt2":
        model, report, _, _ = gpt2_to_mtplab(hf, tensors, heads=1, where=where)
        return model, report, model.config
    s = llama_shape(hf, where)
    trunk, _ = split_blocks(s["num_hidden_layers"], 1, None)
    kv = s["num_key_value_heads"]
    config = ModelConfig(vocab_size=s["vocab_size"], d_model=s["hidden_size"], n_layers=trunk,
                         n_heads=s["num_attention_heads"], n_kv_heads=0 if kv == s["num_attention_heads"] else kv,
                         d_ff=s["intermediate_size"], max_seq_len=s["max_position_embeddings"], pos="rope",
                         rope_base=s["rope_theta"], norm="rmsnorm", norm_eps=s["rms_norm_eps"], mlp="swiglu",
                         bias=s["bias"], tie_embeddings=s["tied"], mtp="parallel", n_future=1, head_layers=1)
    src = SourceWeights(tensors, where)
    weights = llama_to_mtplab(config, src)
    for key in tensors:
        if key.endswith("rotary_emb.inv_freq"):  # older transformers saved RoPE's table
            src.ignore(key, "recomputed RoPE buffer")
    return assemble(config, weights, where), src.report(), config


__all__ = ["GPT2", "LLAMA", "target", "misfits", "misfit_message", "check_fits", "native_layers",
           "native_config", "native_files", "convert_hf"]
