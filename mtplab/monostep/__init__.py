"""Monostep: pooled-encoder block prediction, in one package (the README's recipe table names its source).

A bidirectional encoder pools the prefix into one vector; SLOTS chained slot heads turn it into the
next block of SLOTS tokens, so one forward yields a block. One module per stage:

    config.py    MonostepConfig: [model] settings under config.json's usual keys (arch = monostep)
    model.py     the pooled encoder (Trunk), the chained slots (Slot) and Monostep
    data.py      BlockBatches: (prefix, next block) samples, length-sorted pools, resumable
    training.py  the training recipe: epochs, AdamW, clipping, held-out block loss, the bundle
    decoding.py  block-autoregressive decoding (one forward per block, <empty> dropped)
    metric.py    the block loss (of a Monostep, or of a causal model's heads) and `mtplab eval`
    summary.py   `mtplab info`: parameters by part, FLOPs per forward
    bundle.py    the published monostep_bundle.pt <-> a checkpoint directory (convert / export)

The rest of mtplab reaches it only through the Architecture registered below (architectures.py):
each hook imports its stage on first use, so registering costs no import of torch.
"""

from __future__ import annotations

from ..architectures import Architecture, register
from .config import MonostepConfig


def _build(config):
    from .model import Monostep

    return Monostep(config)


def _summarize(config, context):
    from .summary import summarize

    return summarize(config, context)


def _describe(summary, config):
    from .summary import describe

    return describe(summary, config)


def _train(config, out_dir, resume, progress):
    from .training import train_monostep

    return train_monostep(config, out_dir, resume, progress)


def _decode(model, prompt, max_new_tokens, params, eos_id):
    from .decoding import generate_blocks

    return generate_blocks(model, prompt, max_new_tokens, params, eos_id)


def _evaluate(model, tokenizer, task, data, limit):
    from .metric import evaluate

    return evaluate(model, tokenizer, task, data, limit)


def _convert(source, options):
    from .bundle import convert_monostep

    return convert_monostep(source, options)


def _export(checkpoint, out_path):
    from .bundle import export_bundle

    return export_bundle(checkpoint, out_path)


MONOSTEP = register(Architecture(
    name=MonostepConfig.arch, label="Monostep", config=MonostepConfig, decoding="decodes in blocks",
    export_hint="write Monostep's bundle with `mtplab export monostep` instead",
    build=_build, summarize=_summarize, describe=_describe, train=_train, decode=_decode, evaluate=_evaluate,
    convert=_convert, convert_options=frozenset({"tokenizer", "trust_pickle"}),
    convert_what="Monostep's monostep_bundle.pt (+ GPT-2 tokenizer files) -> Monostep",
    export=_export, exported="Monostep's bundle"))

__all__ = ["MONOSTEP", "MonostepConfig"]
