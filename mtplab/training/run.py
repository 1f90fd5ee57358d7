"""What every training loop shares: the device and its autocast, seeding and the RNG state a
checkpoint carries, the run directory (a fresh one, or `--resume` from its
newest checkpoint), metrics.jsonl, and `TrainResult`, what a run returns."""

from __future__ import annotations

import contextlib
import functools
import json
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.pipeline import Dataset
from ..errors import MtplabError
from ..evaluation.plots import read_metrics
from ..atomic import atomic_write_text
from ..models.checkpoint import TRAINER_STATE, load_latest, load_tokenizer, remove_partial_writes, step_dirs
from ..models.transformer import Transformer
from ..tokenizer import Tokenizer

METRICS, LOSS_PLOT = "metrics.jsonl", "loss.png"


@dataclass
class TrainResult:
    model: Transformer
    dataset: Dataset
    out_dir: Path
    step: int
    head_losses: list[float] = field(default_factory=list)  # last logged train losses
    eval_head_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0  # the whole run: training steps, evaluations and checkpoint writes
    train_seconds: float = 0.0  # the training steps alone: what train.time_limit counts
    resumed_from: int | None = None  # the step --resume continued from
    nonfinite_steps: int = 0  # updates skipped for a non-finite loss or gradient
    stopped_by: str = ""  # the signal that ended the run early (a checkpoint was saved)
    time_limited: bool = False  # train.time_limit ended the run (evaluated and saved as a last step)
    main: bool = True  # rank 0 (the process that writes), or a single process


# -- device and numbers ------------------------------------------------------------------------
def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MtplabError("device cuda requested but no CUDA GPU is available")
    return torch.device(name)


def autocast_for(device: torch.device, dtype: str):
    """bf16 autocast on a GPU that supports it ('auto'), or wherever asked for ('bf16')."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda"
                                   and torch.cuda.is_bf16_supported())
    if not use_bf16:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


# -- random streams: seeded at the start, saved in every checkpoint, restored on --resume -------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "cached": cached}


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- the run directory ---------------------------------------------------------------------------
@contextlib.contextmanager
def cleanup_on_failure(out_dir: Path, main: bool = True):
    """A run that fails before saving any step leaves no directory behind if it made it (its
    tokenizer and data cache included): a failed command leaves nothing half-made."""
    made = not out_dir.exists()
    try:
        yield
    except BaseException:
        if main and made and out_dir.is_dir() and not step_dirs(out_dir) \
                and not (out_dir / TRAINER_STATE).exists():
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def resume_point(out_dir: Path, main: bool = True):
    """--resume: the newest checkpoint that reads back, as `load_latest` gives it (None when the
    run has none yet), and a line on stderr saying where training continues."""
    if not out_dir.is_dir():
        raise MtplabError(f"cannot resume: {out_dir} does not exist")
    if main:
        remove_partial_writes(out_dir)
    checkpoint = load_latest(out_dir)
    if main:
        where = (f"resuming from step {checkpoint[0]} ({checkpoint[3]})" if checkpoint is not None
                 else f"{out_dir} has no checkpoint yet: starting from step 0")
        tqdm.write(f"mtplab: {where}", file=sys.stderr)  # above any progress bar already shown
    return checkpoint


def open_run(out_dir: Path, resume: bool, main: bool, init_from: str = "") -> tuple[tuple | None, Tokenizer | None]:
    """The checkpoint `--resume` continues from (None for a fresh run, or a run with none yet) and
    the tokenizer the run must keep: the checkpoint's, or the base model's (`init_from`), so that
    its weights mean the same ids; None when the run trains its own. A fresh run gets an empty
    (or new) directory: one that already holds a run is refused."""
    if resume:
        checkpoint = resume_point(out_dir, main)
        if checkpoint is not None:
            return checkpoint, load_tokenizer(checkpoint[3])
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MtplabError(f"cannot create {out_dir}: {exc.strerror}") from None
    if not resume and (step_dirs(out_dir) or (out_dir / TRAINER_STATE).exists()):
        raise MtplabError(f"{out_dir} already holds a training run: pass --resume, "
                          "or choose another --out")
    return None, load_tokenizer(init_from) if init_from else None


# -- metrics.jsonl -------------------------------------------------------------------------------
def append_metrics(out_dir: Path, row: dict) -> None:
    with open(out_dir / METRICS, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint a run resumes from (they will be logged again)."""
    path = out_dir / METRICS
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    if path.exists() or rows:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
