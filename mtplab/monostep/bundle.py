"""The published Monostep's `monostep_bundle.pt` <-> an mtplab checkpoint directory.

The bundle is one `torch.save` dict: model_state_dict, optimizer_state_dict, config (vocab_size,
d_model, n_layers, n_heads, max_len, slots, ...), train_history, eval_history, sample_output.
Converting keeps everything a bundle holds (the optimizer state as trainer_state.pt, the histories
as metrics.json, the config and sample in config.json), so exporting the result gives the same
bundle back, tensor for tensor.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..errors import MtplabError
from ..inference.decode import generate
from ..interop.sources import ConvertOptions, Converted, KeyReport, torch_load
from ..models.checkpoint import TRAINER_STATE, load_model, load_state, read_config
from ..tokenizer import Tokenizer
from .config import MonostepConfig
from .model import Monostep

# Monostep adds these to GPT-2's 50257 tokens in this order: <pad> is 50257, <empty> 50258, ...
SPECIALS = ["<pad>", "<empty>", "<system>", "<user>", "<assistant>"]
BUNDLE_KEYS = ("model_state_dict", "config")
METRICS_JSON = "metrics.json"  # per-epoch {"train_loss": [...], "eval_loss": [...]}
SAMPLE_QUESTION = "If a shop has 12 apples and sells 5, how many are left?"  # the card's example


def history_json(history: dict) -> str:
    return json.dumps(history, indent=2) + "\n"


def read_bundle(path: str | Path, trust_pickle: bool = False) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MtplabError(f"no bundle file at {path}")
    if not zipfile.is_zipfile(path):
        raise MtplabError(f"{path} is not a torch.save file")
    bundle = torch_load(path, trust_pickle)
    if not isinstance(bundle, dict) or any(k not in bundle for k in BUNDLE_KEYS):
        raise MtplabError(f"{path} is not a Monostep bundle: it needs the keys {', '.join(BUNDLE_KEYS)}")
    return bundle


def model_config(bundle_config: dict, empty_id: int) -> MonostepConfig:
    try:
        return MonostepConfig(vocab_size=int(bundle_config["vocab_size"]),
                              d_model=int(bundle_config["d_model"]), n_layers=int(bundle_config["n_layers"]),
                              n_heads=int(bundle_config["n_heads"]), max_seq_len=int(bundle_config["max_len"]),
                              n_future=int(bundle_config["slots"]),
                              dropout=float(bundle_config.get("dropout", 0.1)), empty_token=empty_id)
    except KeyError as exc:
        raise MtplabError(f"the bundle's config lacks {exc.args[0]!r}") from None


def seed_tokenizer(path: str | Path) -> Tokenizer:
    """GPT-2's files (or the bundle's saved tokenizer) with Monostep's special tokens at their ids."""
    tokenizer = Tokenizer.from_path(path, SPECIALS)
    base = tokenizer.token_to_id("<|endoftext|>")
    for offset, token in enumerate(SPECIALS, start=1):
        if tokenizer.token_to_id(token) != base + offset:
            raise MtplabError(f"{path}: {token} has id {tokenizer.token_to_id(token)}, the Monostep "
                              f"checkpoint expects {base + offset}")
    return tokenizer


def convert_monostep(source: Path, options: ConvertOptions) -> Converted:
    """`mtplab convert monostep BUNDLE --tokenizer DIR`: the bundle's model, its optimizer state
    (trainer_state.pt), histories (metrics.json), config and sample (config.json)."""
    if options.tokenizer is None:
        raise MtplabError("monostep needs --tokenizer: GPT-2's files (vocab.json + merges.txt or "
                          "tokenizer.json), or the bundle's saved tokenizer directory")
    bundle = read_bundle(source, bool(options.trust_pickle))
    tokenizer = seed_tokenizer(options.tokenizer)
    config = model_config(bundle["config"], tokenizer.token_to_id("<empty>"))
    if tokenizer.vocab_size != config.vocab_size:
        raise MtplabError(f"the tokenizer has {tokenizer.vocab_size} tokens, the bundle's model "
                          f"{config.vocab_size}: not the tokenizer it was trained with")
    model = Monostep(config)
    load_state(model, bundle["model_state_dict"], source)  # strict: every key, every shape
    optimizer = bundle.get("optimizer_state_dict")
    history = {"train_loss": list(bundle.get("train_history") or []),
               "eval_loss": list(bundle.get("eval_history") or [])}
    return Converted(model.eval(), tokenizer, KeyReport(),
                     notes=[f"Monostep: {config.n_future} slots, vocabulary {config.vocab_size}"],
                     run={"monostep_bundle": {"config": bundle["config"], "sample_output": bundle.get("sample_output")}},
                     trainer_state=None if optimizer is None else {"optimizer": optimizer},
                     files={METRICS_JSON: history_json(history)})


def export_bundle(checkpoint: str | Path, out_path: str | Path, model: Monostep | None = None,
                  tokenizer: Tokenizer | None = None) -> Path:
    """Write the checkpoint (or the given in-memory model) as a Monostep bundle."""
    checkpoint, out_path = Path(checkpoint), Path(out_path)
    run = read_config(checkpoint).get("run", {})
    if model is None:
        model, tokenizer = load_model(checkpoint)
    if not isinstance(model, Monostep):
        raise MtplabError(f"{checkpoint} is not a Monostep model (model.arch = monostep): no bundle to write")
    source = run.get("monostep_bundle", {})
    bundle_config = source.get("config") or _bundle_config(model.config, run.get("train", {}))
    history = {"train_loss": [], "eval_loss": []}
    if (checkpoint / METRICS_JSON).is_file():
        history.update(json.loads((checkpoint / METRICS_JSON).read_text()))
    optimizer = None
    # a converted bundle keeps it beside the weights; a training run in its newest step directory
    states = [checkpoint / TRAINER_STATE] + sorted(checkpoint.glob(f"checkpoints/step-*/{TRAINER_STATE}"))[::-1]
    found = [p for p in states if p.is_file()]
    if found:
        optimizer = torch.load(found[0], map_location="cpu", weights_only=True).get("optimizer")
    sample = source.get("sample_output")
    if sample is None:
        sample = generate(model, tokenizer, SAMPLE_QUESTION, chat=True, max_new_tokens=128)
    bundle = {"model_state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
              "optimizer_state_dict": optimizer, "config": bundle_config,
              "train_history": history["train_loss"], "eval_history": history["eval_loss"],
              "sample_output": sample}
    atomic_write(out_path, lambda tmp: torch.save(bundle, tmp))
    return out_path


def _bundle_config(config: MonostepConfig, train: dict) -> dict:
    out = {"vocab_size": config.vocab_size, "d_model": config.d_model, "n_layers": config.n_layers,
           "n_heads": config.n_heads, "max_len": config.max_seq_len, "slots": config.n_future,
           "dropout": config.dropout}
    for key in ("lr", "epochs", "batch_size", "seed"):
        if key in train:
            out[key] = train[key]
    return out

