"""Checkpoints, in one place: writing, reading and validating a checkpoint directory, and a
training run's rotating step directories, resume and the published top-level files.

A checkpoint directory (what `mtplab train`, `mtplab convert` and `mtplab export-hf` read and write):

    config.json  model.safetensors  tokenizer.json  [trainer_state.pt]

`save_pretrained` / `from_pretrained` in spirit: what one writes the other reads, each file replaced
atomically (mtplab/atomic.py). The weights carry the training step in their metadata so that a
resumed run can check that weights and trainer state belong together.

A training run's directory holds one checkpoint directory per saved step, written whole or not at all:

    runs/x/
      config.json  model.safetensors  tokenizer.json     the newest step, for `mtplab generate` etc.
      checkpoints/step-000200/   config.json  model.safetensors  tokenizer.json  trainer_state.pt
      checkpoints/step-000400/   ...                     the last `keep` steps

A step is written into a hidden temporary directory, every file fsynced, then renamed into place:
a reader (or `--resume`) sees complete step directories only, whenever the process dies. The
top-level files are hard links to the newest step's (a copy where links are not supported), each
swapped in atomically. Leftovers of a write that was killed are removed on the next start.

This module sits with the models (it builds one from a config) and below everything that saves or
loads them: training, inference, serving and the converters and exports of interop/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir, atomic_write, atomic_write_text, fsync_dir, is_partial
from ..config import ModelConfig, model_config_from_dict, model_config_to_dict
from ..errors import MtplabError
from ..tokenizer import Tokenizer
from ..version import __version__
from .build import build_model
from .transformer import Transformer

CONFIG, WEIGHTS, TOKENIZER, TRAINER_STATE = "config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt"
CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")
PUBLISHED = (WEIGHTS, TOKENIZER, CONFIG)  # config last: it names the step the others belong to


# -- writing ------------------------------------------------------------------------------------
def save_checkpoint(directory: str | Path, model: torch.nn.Module, tokenizer: Tokenizer,
                    run_config: dict[str, Any] | None = None, trainer_state: dict | None = None,
                    step: int = 0, weights: dict[str, torch.Tensor] | None = None, *,
                    files: dict[str, str] | None = None) -> None:
    """Write a checkpoint directory. A new `directory` appears whole or not at all (written as a
    hidden sibling, then renamed); in an existing one each file is replaced atomically. `weights`
    replaces the model's own state dict (a sharded model's gathered copy); `files` adds text files
    (name -> text, e.g. a converted run's histories)."""
    directory = Path(directory)

    def write(path: Path) -> None:
        _write_files(path, model, tokenizer, run_config, trainer_state, step, weights, files or {})

    if directory.exists():
        write(directory)
    else:
        atomic_dir(directory, write)


def _write_files(directory: Path, model: torch.nn.Module, tokenizer: Tokenizer, run_config: dict | None,
                 trainer_state: dict | None, step: int, weights: dict[str, torch.Tensor] | None,
                 files: dict[str, str]) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in (weights or model.state_dict()).items()}
    # Trainer state first, weights next, config last: a crash in between leaves a step mismatch
    # that `--resume` detects, never a config that points at missing files.
    if trainer_state is not None:
        atomic_write(directory / TRAINER_STATE, lambda tmp: torch.save(trainer_state, tmp))
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"step": str(step)}))
    tokenizer.save(directory)
    config = {"mtplab_version": __version__, "model": model_config_to_dict(model.config),
              "tokenizer": tokenizer.describe(), "step": step}
    if run_config:
        config["run"] = run_config
    atomic_write_text(directory / CONFIG, json.dumps(config, indent=2) + "\n")
    for name, text in files.items():
        atomic_write_text(directory / name, text)


# -- reading ------------------------------------------------------------------------------------
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
        with safe_open(str(path), framework="pt") as handle:
            step = int((handle.metadata() or {}).get("step", 0))
        return load_file(str(path)), step
    except (SafetensorError, OSError, ValueError) as exc:
        raise MtplabError(f"{path} is unreadable (truncated or corrupt?): {exc}") from None


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Tokenizer]:
    """The model (a `Transformer`, or a registered architecture's, e.g. a `Monostep`) and tokenizer of a
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


# -- validating ---------------------------------------------------------------------------------
def state_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                   required: Callable[[str], bool] = lambda key: True) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped) keys of `state` against a model's `expected` state dict:
    the first two sorted, the mis-shaped in the model's order; a missing key that is not `required`
    is no problem."""
    missing = sorted(k for k in expected if k not in state and required(k))
    extra = sorted(k for k in state if k not in expected)
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    return missing, extra, shapes


def _keys(keys: list[str], shown: int) -> str:
    return ", ".join(keys[:shown]) + (" ..." if len(keys) > shown else "")


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Strict load with one clear message naming missing, unexpected or mis-shaped tensors."""
    expected = model.state_dict()
    missing, extra, shapes = state_mismatch(expected, state)
    problems = []
    if missing:
        problems.append(f"missing {_keys(missing, 5)}")
    if extra:
        problems.append(f"unexpected {_keys(extra, 5)}")
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
    missing, lost, wrong = state_mismatch(expected, state, required=lambda key: not key.startswith("heads."))
    if lost or wrong or missing:
        raise MtplabError(f"{directory} cannot start this model: " + "; ".join(
            f"{what} {_keys(keys, 4)}" for what, keys in (("weights it would drop:", lost),
                                                         ("shape mismatch:", sorted(wrong)), ("missing:", missing))
            if keys))
    model.load_state_dict(state, strict=False)
    fresh = sorted(k for k in expected if k not in state)
    if fresh:
        model.heads.reset_parameters(model.unembedding)
    return fresh


# -- a training run: step directories, rotation, publishing, resume ------------------------------
def step_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete step directories, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def remove_partial_writes(out_dir: Path) -> None:
    """Delete temporary files and directories left by a process killed while writing."""
    out_dir = Path(out_dir)
    for parent in (out_dir, out_dir / CHECKPOINTS, out_dir / "data"):
        if parent.is_dir():
            for p in parent.iterdir():
                if is_partial(p.name):
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def save_step(out_dir: Path, step: int, model, tokenizer, run_config: dict, trainer_state: dict,
              keep: int = 2, weights: dict | None = None) -> Path:
    """Write checkpoints/step-N atomically, point the top-level files at it, drop all but the
    newest `keep` steps (0 keeps every step). Returns the step directory."""
    root = Path(out_dir) / CHECKPOINTS
    final = root / f"step-{step:06d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MtplabError(f"cannot write a checkpoint in {root}: {exc.strerror or exc}") from None
    # the same step saved again (a resumed run's last step) replaces the old directory whole
    atomic_dir(final, lambda tmp: save_checkpoint(tmp, model, tokenizer, run_config, trainer_state, step, weights))
    for name in PUBLISHED:
        publish(final / name, Path(out_dir) / name)
    rotate(out_dir, keep)
    return final


def rotate(out_dir: Path, keep: int) -> None:
    """Drop all but the newest `keep` step directories (0 keeps every step)."""
    if keep > 0:
        for _, old in step_dirs(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def publish(source: Path, target: Path) -> None:
    """Make `target` the same file as `source`, atomically: a hard link when the file system has
    them, else a copy."""
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        atomic_write(target, lambda path: shutil.copyfile(source, path))
        return
    os.replace(tmp, target)
    fsync_dir(target.parent)


def load_latest(out_dir: Path, warn=lambda text: print(text, file=sys.stderr)):
    """(step, weights, trainer_state, directory) of the newest step that reads back, or None when
    the run has no checkpoint yet. A step that does not read (a disk error, a hand-edited file) is
    reported and the one before it is used."""
    out_dir = Path(out_dir)
    candidates = step_dirs(out_dir)
    if not candidates and (out_dir / TRAINER_STATE).is_file():  # a run saved before step dirs existed
        candidates = [(-1, out_dir)]
    for _, directory in reversed(candidates):
        try:
            weights, step = load_weights(directory)
            state = torch.load(directory / TRAINER_STATE, weights_only=True)
        except MtplabError as exc:
            warn(f"mtplab: skipping {directory}: {exc}")
            continue
        except Exception as exc:  # a truncated or foreign trainer_state.pt
            warn(f"mtplab: skipping {directory}: cannot read {TRAINER_STATE} ({exc})")
            continue
        if state.get("step") != step:
            warn(f"mtplab: skipping {directory}: weights are from step {step} but the trainer state "
                 f"from step {state.get('step')}")
            continue
        return step, weights, state, directory
    if candidates:
        raise MtplabError(f"no checkpoint in {out_dir} reads back: cannot resume")
    return None
