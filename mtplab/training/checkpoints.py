"""A training run's checkpoints: one directory per saved step, written whole or not at all.

    runs/x/
      config.json  model.safetensors  tokenizer.json     the newest step, for `mtplab generate` etc.
      checkpoints/step-000200/   config.json  model.safetensors  tokenizer.json  trainer_state.pt
      checkpoints/step-000400/   ...                     the last `keep` steps

A step is written into a hidden temporary directory, every file fsynced, then renamed into place:
a reader (or `--resume`) sees complete step directories only, whenever the process dies. The
top-level files are hard links to the newest step's (a copy where links are not supported), each
swapped in atomically. Leftovers of a write that was killed are removed on the next start.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import torch

from ..errors import MtplabError
from ..interop.atomic import atomic_write, fsync_dir
from ..interop.checkpoint import (CONFIG, TOKENIZER, TRAINER_STATE, WEIGHTS, load_weights,
                                  save_checkpoint)

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")
PUBLISHED = (WEIGHTS, TOKENIZER, CONFIG)  # config last: it names the step the others belong to


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
                if p.name.startswith(".") and p.name.endswith(".tmp"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def save_step(out_dir: Path, step: int, model, tokenizer, run_config: dict, trainer_state: dict,
              keep: int = 2, weights: dict | None = None) -> Path:
    """Write checkpoints/step-N atomically, point the top-level files at it, drop all but the
    newest `keep` steps (0 keeps every step). Returns the step directory."""
    root = Path(out_dir) / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as exc:
        raise MtplabError(f"cannot write a checkpoint in {root}: {exc.strerror or exc}") from None
    try:
        save_checkpoint(tmp, model, tokenizer, run_config, trainer_state, step, weights)
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (a resumed run's last step): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name in PUBLISHED:
        publish(final / name, Path(out_dir) / name)
    if keep > 0:
        for _, old in step_dirs(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


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
