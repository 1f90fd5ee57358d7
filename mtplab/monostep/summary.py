"""`mtplab info` for a Monostep model: parameters by part and FLOPs per forward (one block)."""

from __future__ import annotations

import torch

from .config import MonostepConfig
from .model import Monostep


def summarize(config: MonostepConfig, context: int) -> dict:
    """A Monostep model re-encodes the whole prefix for every block: FLOPs are per forward."""
    with torch.device("meta"):
        model = Monostep(config)
    groups = {"embeddings": 0, "trunk": 0, "heads": 0}
    for name, p in model.named_parameters():
        part = ("embeddings" if name.startswith(("trunk.tok_emb", "trunk.pos_emb")) else
                "trunk" if name.startswith("trunk.") else "heads")
        groups[part] += p.numel()
    encoder = sum(p.numel() for nm, p in model.named_parameters() if nm.startswith("trunk.encoder") and p.dim() == 2)
    slots = sum(p.numel() for nm, p in model.named_parameters() if nm.startswith("slots.") and p.dim() == 2)
    per_forward = context * (2 * encoder + config.n_layers * 2 * 2 * context * config.d_model) + 2 * slots
    return {"parameters": sum(groups.values()), "breakdown": groups, "heads": config.n_future,
            "family": "monostep", "context": context, "flops_per_forward": per_forward}


def describe(summary: dict, config: MonostepConfig) -> str:
    c, b = config, summary["breakdown"]
    return "\n".join([
        f"monostep: pooled encoder d_model {c.d_model}, {c.n_layers} layers, {c.n_heads} "
        f"attention heads, GELU MLP {4 * c.d_model}, learned positions ({c.max_seq_len}), vocab {c.vocab_size}",
        f"slots: {summary['heads']} chained slot heads, one block of {summary['heads']} tokens per forward",
        f"parameters: {summary['parameters']:,}",
        f"  embeddings {b['embeddings']:,}   trunk {b['trunk']:,}   slots {b['heads']:,}",
        f"forward FLOPs per block at context {summary['context']}: "
        f"{summary['flops_per_forward'] / 1e6:,.1f}M (the prefix is re-encoded for every block)"])
