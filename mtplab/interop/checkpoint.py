"""Checkpoint directories: config.json, model.safetensors, tokenizer.json, trainer_state.pt.

`save_pretrained` / `from_pretrained` in spirit: what one writes the other reads, each file replaced
atomically. The weights carry the training step in their metadata so that a resumed run can check
that weights and trainer state belong together.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..config import ModelConfig, model_config_from_dict
from ..errors import MtplabError
from ..models.build import build_model
from ..models.transformer import Transformer
from ..tokenizer import Tokenizer
from .atomic import atomic_write, atomic_write_text

CONFIG, WEIGHTS, TOKENIZER, TRAINER_STATE = "config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt"


def save_checkpoint(directory: str | Path, model: Transformer, tokenizer: Tokenizer,
                    run_config: dict[str, Any] | None = None, trainer_state: dict | None = None,
                    step: int = 0, weights: dict[str, torch.Tensor] | None = None) -> None:
    """`weights` replaces the model's own state dict (a sharded model's gathered copy)."""
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in (weights or model.state_dict()).items()}
    # Trainer state first, weights next, config last: a crash in between leaves a step mismatch
    # that `--resume` detects, never a config that points at missing files.
    if trainer_state is not None:
        atomic_write(directory / TRAINER_STATE, lambda tmp: torch.save(trainer_state, tmp))
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"step": str(step)}))
    tokenizer.save(directory)
    config = {"mtplab_version": __version__, "model": asdict(model.config),
              "tokenizer": tokenizer.describe(), "step": step}
    if run_config:
        config["run"] = run_config
    atomic_write_text(directory / CONFIG, json.dumps(config, indent=2) + "\n")


def read_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise MtplabError(f"no checkpoint directory at {directory}")
    path = directory / CONFIG
    if not path.is_file():
        raise MtplabError(f"{directory} is not a checkpoint: no {CONFIG}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MtplabError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise MtplabError(f"{path} has no model section")
    return config


def load_tokenizer(directory: str | Path, config: dict[str, Any] | None = None) -> Tokenizer:
    directory = Path(directory)
    config = config or read_config(directory)
    meta = config.get("tokenizer", {})
    if not (directory / TOKENIZER).is_file():
        raise MtplabError(f"{directory} has no {TOKENIZER}")
    return Tokenizer.from_path(directory / TOKENIZER, eos=meta.get("eos", "<|endoftext|>"),
                               chat_template=meta.get("chat_template", "monostep"))


def load_weights(directory: str | Path) -> tuple[dict[str, torch.Tensor], int]:
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise MtplabError(f"{Path(directory)} has no {WEIGHTS}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            step = int((handle.metadata() or {}).get("step", 0))
        return load_file(str(path)), step
    except (SafetensorError, OSError, ValueError) as exc:
        raise MtplabError(f"{path} is unreadable (truncated or corrupt?): {exc}") from None


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Tokenizer]:
    """The model (a `Transformer`, or a `Monostep` for seed 000's architecture) and tokenizer of a
    checkpoint directory, ready for inference."""
    config = read_config(directory)
    model_config: ModelConfig = model_config_from_dict(config["model"], f"{directory}/{CONFIG}")
    tokenizer = load_tokenizer(directory, config)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise MtplabError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                          f"holds {model_config.vocab_size}")
    if not model_config.vocab_real:  # a checkpoint from before the field: the tokenizer's ids are the real ones
        model_config.vocab_real = tokenizer.vocab_size
    model = build_model(model_config)
    state, _ = load_weights(directory)
    load_state(model, state, Path(directory) / WEIGHTS)
    return model.to(device).eval(), tokenizer


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Strict load with one clear message naming missing, unexpected or mis-shaped tensors."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    if shapes:
        problems.append("shape mismatch " + ", ".join(
            f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in shapes[:5]))
    if problems:
        raise MtplabError(f"{source} does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def load_base(model: Transformer, directory: str | Path) -> list[str]:
    """Load a checkpoint into a model that may have other heads: every tensor outside `heads.` must
    match; the model's heads that the checkpoint lacks keep their fresh initialisation (Medusa heads
    re-copy the loaded unembedding). Returns the names of the heads' tensors left fresh."""
    state, _ = load_weights(directory)
    expected = model.state_dict()
    lost = sorted(k for k in state if k not in expected)
    wrong = sorted(k for k in state if k in expected and state[k].shape != expected[k].shape)
    missing = sorted(k for k in expected if k not in state and not k.startswith("heads."))
    if lost or wrong or missing:
        raise MtplabError(f"{directory} cannot start this model: " + "; ".join(
            f"{what} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for what, keys in (("weights it would drop:", lost), ("shape mismatch:", wrong),
                               ("missing:", missing)) if keys))
    model.load_state_dict(state, strict=False)
    fresh = sorted(k for k in expected if k not in state)
    if fresh:
        model.heads.reset_parameters(model.unembedding)
    return fresh
