"""What a model is before it exists: parameters by part and FLOPs per token, built on the meta
device so that even the largest recipe costs no memory."""

from __future__ import annotations

import torch

from ..architectures import architecture_of
from ..config import ModelConfig
from .layout import ff_dim, loop_groups
from .transformer import Transformer


def build_on_meta(config: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(config)


def summarize(config: ModelConfig, context: int | None = None) -> dict:
    """Parameter counts (embeddings: token/position/value-embedding tables and an untied
    unembedding; trunk: the blocks, final norm and stream scalars; heads: everything of heads 0..n-1 beyond the trunk) and forward FLOPs
    per token with `context` tokens of attention (default: the full window)."""
    other = architecture_of(config)  # another architecture summarises itself
    if other is not None:
        return other.summarize(config, context or config.max_seq_len)
    model = build_on_meta(config)
    groups = {"embeddings": 0, "trunk": 0, "heads": 0}
    per_head_module = {}
    for name, p in model.named_parameters():
        if name.startswith(("wte.", "wpe.", "lm_head.", "value_embeds.")):
            groups["embeddings"] += p.numel()
        elif name.startswith("heads."):
            groups["heads"] += p.numel()
            key = ".".join(name.split(".")[:3])  # heads.<family list>.<k>
            per_head_module[key] = per_head_module.get(key, 0) + p.numel()
        else:
            groups["trunk"] += p.numel()
    context = context or config.max_seq_len
    d, n = config.d_model, config.n_future
    attention = 2 * 2 * context * d  # q·k and attn·v per layer, for one query position
    entry, shared, _ = loop_groups(config)
    passes = config.n_think_loops  # a shared block costs once per think loop

    def block_passes(name: str) -> int:
        i = int(name.split(".")[1])
        return passes if entry <= i < entry + shared else 1

    trunk_matmul = sum(p.numel() * block_passes(nm) for nm, p in model.named_parameters()
                       if nm.startswith("blocks.") and p.dim() == 2)
    trunk_calls = model.cache_layers(passes)
    unembed = 2 * d * config.vocab_size
    heads_main, heads_all = model.heads.flops_per_token(attention, unembed)
    flops_main = 2 * trunk_matmul + trunk_calls * attention + heads_main
    flops_all = 2 * trunk_matmul + trunk_calls * attention + heads_all
    return {"parameters": sum(groups.values()), "breakdown": groups,
            "per_head_module": per_head_module, "heads": n, "family": config.mtp,
            "context": context, "flops_per_token_next_token": flops_main,
            "flops_per_token_all_heads": flops_all}


# The parameter counts the published models' cards give, for the recipes that reproduce them.
CARD_PARAMETERS = {"aomts-100m": (126_401_024, "the AOMTS-TST-s6-100M-3k-1MTP-v1 card"),
                   "gelu-d12": (261_096_338, "the gelu-d12-chinchilla-261M card")}


def card_parameters(recipe_name: str, summary: dict, config: ModelConfig) -> dict | None:
    """The card's parameter count beside the built one, and how the two relate (a card may count
    a tied embedding / unembedding matrix twice, once as each); None for a recipe with no card."""
    if recipe_name not in CARD_PARAMETERS:
        return None
    published, source = CARD_PARAMETERS[recipe_name]
    built = summary["parameters"]
    tied = config.vocab_size * config.d_model if config.tie_embeddings else 0
    if published == built:
        explained = f"{published:,}: the same count"
    elif tied and published == built + tied:
        explained = (f"{published:,} = the {built:,} unique parameters + the tied {config.vocab_size:,} x "
                     f"{config.d_model} embedding / unembedding matrix ({tied:,}) counted a second time")
    else:
        explained = f"{published:,}, {published - built:+,} against the {built:,} built"
    return {"parameters": published, "source": source, "explained": explained}


def format_summary(summary: dict, config: ModelConfig) -> str:
    other = architecture_of(config)
    if other is not None:
        return other.describe(summary, config)
    c = config
    b = summary["breakdown"]
    lines = [
        f"decoder: d_model {c.d_model}, {c.n_layers} trunk blocks, {c.n_heads} attention heads "
        f"({c.kv_heads} key/value), {c.mlp} MLP {ff_dim(c)}, {c.norm}, {c.pos} positions, "
        f"vocab {c.vocab_size}, {'tied' if c.tie_embeddings else 'untied'} unembedding",
        f"heads: {summary['heads']} {summary['family']} (head k predicts token t+1+k)",
        *_feature_lines(c),
        f"parameters: {summary['parameters']:,}",
        f"  embeddings {b['embeddings']:,}   trunk {b['trunk']:,}   heads {b['heads']:,}",
        *([f"  {summary['card']['source']}: {summary['card']['explained']}"] if summary.get("card") else []),
        f"forward FLOPs per token at context {summary['context']}: "
        f"{summary['flops_per_token_next_token'] / 1e6:,.1f}M next-token path, "
        f"{summary['flops_per_token_all_heads'] / 1e6:,.1f}M all heads (training ~3x)",
    ]
    return "\n".join(lines)


def _feature_lines(c: ModelConfig) -> list[str]:
    """One line each for the nanochat and looped (Nano Reasoning Model) options that are on."""
    on = []
    if not c.norm_affine:
        on.append("parameterless norms")
    if c.qk_norm:
        on.append(f"QK-norm x{c.qk_scale:g}")
    if c.window_pattern:
        on.append(f"windows {c.window_pattern} (S = {c.window})")
    if c.value_embeds:
        on.append("value embeddings")
    if c.layer_lambdas:
        on.append("resid/x0 lambdas")
    if c.smear:
        on.append(f"smear {c.smear}")
    if c.backout:
        on.append("backout")
    if c.logit_softcap:
        on.append(f"softcap {c.logit_softcap:g}")
    lines = [f"features: {', '.join(on)}"] if on else []
    if c.loop_layers or c.low_rank:
        entry, shared, exit_ = loop_groups(c)
        lines.append(f"layers: {entry} entry + {shared} shared x {c.n_think_loops} loops + {exit_} exit"
                     + (f", low-rank {c.low_rank} projections" if c.low_rank else ""))
    return lines
