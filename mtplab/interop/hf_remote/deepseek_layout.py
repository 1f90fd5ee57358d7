"""DeepSeek-V3's names for mtplab's sequential MTP modules (`mtplab export-hf --deepseek-layout`).

DeepSeek-V3 stores MTP module j as one more decoder layer after the trunk's n layers:

    mtplab                               DeepSeek-V3
    heads.modules_.{j}.enorm             layers.{n+j}.enorm            (norm of the token embedding)
    heads.modules_.{j}.hnorm             layers.{n+j}.hnorm            (norm of the previous depth)
    heads.modules_.{j}.eh_proj           layers.{n+j}.eh_proj          (projection of the concat)
    heads.modules_.{j}.block.attn_norm   layers.{n+j}.input_layernorm
    heads.modules_.{j}.block.attn        layers.{n+j}.self_attn
    heads.modules_.{j}.block.mlp_norm    layers.{n+j}.post_attention_layernorm
    heads.modules_.{j}.block.mlp         layers.{n+j}.mlp

The embedding, final norm and unembedding stay shared (`wte`, `norm_f`); they are not repeated
per layer as DeepSeek-V3's `embed_tokens` / `shared_head` copies are.
"""

import re

import torch.nn as nn

MODULE_PARTS = ("enorm", "hnorm", "eh_proj")
BLOCK_PARTS = {"attn_norm": "input_layernorm", "attn": "self_attn",
               "mlp_norm": "post_attention_layernorm", "mlp": "mlp"}


def deepseek_name(key: str, n_layers: int) -> str:
    """An mtplab state-dict key under DeepSeek-V3's name; keys outside the MTP modules unchanged."""
    match = re.fullmatch(r"heads\.modules_\.(\d+)\.(\w+)\.(.+)", key)
    if match is None:
        return key
    j, part, rest = int(match[1]), match[2], match[3]
    if part == "block":
        part, rest = rest.split(".", 1)
        part = BLOCK_PARTS[part]
    return f"layers.{n_layers + j}.{part}.{rest}"


def use_deepseek_names(model: nn.Module) -> None:
    """Register the sequential modules of an mtplab `Transformer` under DeepSeek-V3's names instead
    of mtplab's. The modules are the same objects, so the model computes exactly as before; only
    its state-dict keys change (to what `deepseek_name` gives)."""
    heads, n = model.heads, model.config.n_layers
    before = {id(p) for p in model.parameters()}
    layers = nn.ModuleDict()
    for j, module in enumerate(heads.modules_):
        layer = nn.Module()
        for part in MODULE_PARTS:
            layer.add_module(part, getattr(module, part))
        for part, name in BLOCK_PARTS.items():
            layer.add_module(name, getattr(module.block, part))
        layers[str(n + j)] = layer
    modules = list(heads.modules_)
    del heads._modules["modules_"]  # unregistered, so each tensor has one name: the DeepSeek one
    heads.modules_ = modules  # a plain list: the heads' code indexes it as before
    model.layers = layers
    if {id(p) for p in model.parameters()} != before:  # a part of the module this map lacks
        raise RuntimeError("DeepSeek-V3 names do not cover every tensor of the MTP modules")
