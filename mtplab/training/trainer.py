"""The training loop: AdamW or Muon/Aurora (optimizers.py), warmup + cosine/WSD, TST phase 1 (tst.py),
accumulation, clipping, bf16 autocast where the hardware has it, periodic held-out evaluation, atomic rotating checkpoints,
bit-exact `--resume`, data parallelism under torchrun, skipped non-finite steps, a clean stop on
SIGINT/SIGTERM, metrics.jsonl, a progress bar and a loss plot."""

from __future__ import annotations

import contextlib
import functools
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..architectures import architecture_of
from ..atomic import atomic_write_text
from ..config import Config
from ..data.batches import PackedBatches
from ..data.pipeline import Dataset, build_dataset
from ..errors import MtplabError
from ..evaluation.plots import plot_losses, read_metrics
from ..models.checkpoint import (TRAINER_STATE, WEIGHTS, load_base, load_latest, load_state, load_tokenizer,
                                remove_partial_writes, save_step, step_dirs)
from ..models.transformer import Transformer
from . import distributed, tst
from .faults import NonFiniteGuard, StopSignals
from .losses import backward_all_heads, backward_heads, evaluate_heads, label_counts, mask_pad
from .optimizers import make_optimizer
from .schedules import lr_multiplier

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


def resolve_vocab(config: Config, vocab_size: int) -> None:
    """Size the model's vocabulary from the tokenizer (rounded up to the config's vocab_multiple:
    64, or 1 for Monostep's exact 50262), or check that it fits; the tokenizer's size is the real
    vocabulary (the rows beyond it are padding, never emitted)."""
    m = config.model
    if m.vocab_size == 0:
        m.vocab_size = m.vocab_multiple * -(-vocab_size // m.vocab_multiple)
    elif vocab_size > m.vocab_size:
        raise MtplabError(f"tokenizer has {vocab_size} tokens but model.vocab_size is "
                          f"{m.vocab_size}: the vocabulary does not fit the model")
    if m.vocab_real == 0:
        m.vocab_real = vocab_size
    elif not vocab_size <= m.vocab_real <= m.vocab_size:
        raise MtplabError(f"model.vocab_real is {m.vocab_real}: it must hold the tokenizer's {vocab_size} "
                          f"tokens and fit model.vocab_size ({m.vocab_size})")


def train(config: Config, out_dir: str | Path, resume: bool = False, progress: bool = True,
          bar_options: dict | None = None) -> TrainResult:
    """Train the model described by `config`, writing a checkpoint directory to `out_dir`. Under
    torchrun this process is one rank of a data-parallel run (see distributed.py). Another
    architecture (model.arch, see architectures.py) trains with its own loop instead. `bar_options`
    go to the step bar's tqdm (e.g. position, leave, desc: `mtplab ablate` nests it under its own)."""
    other = architecture_of(config.model)
    if other is not None:
        with _cleanup_on_failure(Path(out_dir)):
            return other.train(config, Path(out_dir), resume, progress)
    device = pick_device(config.train.device)
    ranks = distributed.start(device)
    if ranks.active and device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    try:
        with _cleanup_on_failure(Path(out_dir), ranks.main):
            return _train(config, Path(out_dir), resume, progress and ranks.main, device, ranks,
                          bar_options or {})
    finally:
        distributed.stop(ranks)


@contextlib.contextmanager
def _cleanup_on_failure(out_dir: Path, main: bool = True):
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


def _train(config: Config, out_dir: Path, resume: bool, progress: bool, device: torch.device,
           ranks: distributed.Ranks, bar_options: dict) -> TrainResult:
    t_cfg = config.train
    distributed.check_batch(ranks, t_cfg.batch_size)
    seed_everything(t_cfg.seed)

    checkpoint, tokenizer = None, None
    if resume:
        checkpoint = resume_point(out_dir, ranks.main)
        if checkpoint is not None:
            tokenizer = load_tokenizer(checkpoint[3])
    if checkpoint is None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MtplabError(f"cannot create {out_dir}: {exc.strerror}") from None
        if not resume and (step_dirs(out_dir) or (out_dir / TRAINER_STATE).exists()):
            raise MtplabError(f"{out_dir} already holds a training run: pass --resume, "
                              "or choose another --out")
        if t_cfg.init_from:  # the base model's tokenizer, so that its weights mean the same ids
            tokenizer = load_tokenizer(t_cfg.init_from)

    tst.check_config(config)
    dataset = build_dataset(config, out_dir, tokenizer)
    resolve_vocab(config, dataset.tokenizer.vocab_size)
    model = Transformer(config.model).to(device)
    model.set_grad_checkpointing(t_cfg.grad_checkpointing)
    phase1 = tst.phase1_steps(config)
    superposed = None  # phase 1's batches: longer windows of the same token stream
    if phase1:
        window = tst.window_length(config.data.seq_len, t_cfg.tst_bag, model.n_future)
        try:
            superposed = PackedBatches(dataset.train.tokens, window - 1, t_cfg.batch_size, t_cfg.seed)
        except ValueError as exc:
            raise MtplabError(f"data: TST phase 1 needs rows of {window} tokens: {exc}") from None
    if t_cfg.init_from and checkpoint is None:
        load_base(model, t_cfg.init_from)
    if t_cfg.freeze_trunk:  # Medusa-1: the base model stays as it is, only the heads learn
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("heads."))
    sharded = ranks.active and t_cfg.parallel == "fsdp"
    if sharded and (phase1 or t_cfg.optimizer != "adamw"):
        raise MtplabError("train.parallel = fsdp supports AdamW without TST for now (Muon/Aurora need "
                          "whole matrices, TST's phase 1 its own forward): use ddp")
    if checkpoint is not None:
        load_state(model, checkpoint[1], checkpoint[3] / WEIGHTS)
    if sharded:
        distributed.shard(model, ranks, device)
    optimizer = make_optimizer(model, config)
    start, guard = 0, NonFiniteGuard(t_cfg.max_nonfinite_steps)
    last_good = "none (no step was saved)"
    if checkpoint is not None:
        start, _, state, directory = checkpoint
        if sharded:
            distributed.load_optimizer(model, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        dataset.train.load_state_dict(state["data"])
        if superposed is not None and "tst_data" in state:
            superposed.load_state_dict(state["tst_data"])
        restore_rng(state["rng"])
        guard.skipped = state.get("nonfinite_steps", 0)
        last_good = str(directory)
    if ranks.main:
        _truncate_metrics(out_dir / METRICS, start)

    autocast = autocast_for(device, t_cfg.dtype)
    weights = config.model.head_weights
    run_config = config.to_dict()
    result = TrainResult(model, dataset, out_dir, start, main=ranks.main,
                         resumed_from=start if checkpoint is not None else None)
    rows = ranks.rows(t_cfg.batch_size)
    step_backward = backward_all_heads if sharded else backward_heads
    # a tokenizer without a pad token pads with eos, which must stay scored
    pad_id = dataset.tokenizer.token_to_id(dataset.tokenizer.pad) if t_cfg.ignore_pad else None
    # FSDP averages gradients over ranks; the losses are already shares of the global mean
    grad_scale = (ranks.world if sharded else 1) / t_cfg.grad_accum
    trainable = [p for p in model.parameters() if p.requires_grad]

    def save(step: int) -> str:
        """Rank 0 writes; under FSDP every rank first takes part in gathering the shards."""
        model_state, optimizer_state = (distributed.full_state(model, optimizer) if sharded
                                        else (None, optimizer.state_dict()))
        if not ranks.main:
            return last_good
        state = {"step": step, "optimizer": optimizer_state, "rng": rng_state(),
                 "data": dataset.train.state_dict(), "nonfinite_steps": guard.skipped}
        if superposed is not None:
            state["tst_data"] = superposed.state_dict()
        directory = save_step(out_dir, step, model, dataset.tokenizer, run_config, state,
                              t_cfg.keep_checkpoints, model_state)
        plot_losses(out_dir / METRICS, out_dir / LOSS_PLOT)
        return str(directory)

    def evaluate(step: int) -> None:
        model.eval()
        with autocast():
            losses = evaluate_heads(model, dataset.eval.eval_batches(t_cfg.eval_batches))
        model.train()
        result.eval_head_losses = losses
        if ranks.main:
            _append(out_dir / METRICS, {"step": step, "eval_loss": _weighted(losses, weights),
                                        "eval_head_losses": losses})

    bar = tqdm(**{"total": t_cfg.steps, "initial": start, "disable": not progress, "unit": "step",
                  "desc": f"train {model.num_parameters() / 1e6:.2f}M", "dynamic_ncols": True,
                  **bar_options})
    model.train()
    t0 = window_t0 = time.perf_counter()
    window_tokens, side = 0, 0.0  # side: seconds spent evaluating and saving, apart from training
    with StopSignals() as signals:
        for step in range(start, t_cfg.steps):
            reset = t_cfg.tst_reset_optimizer and phase1 > 0
            if reset and step == phase1:  # the ablation: phase 2 starts from a fresh optimizer
                optimizer = make_optimizer(model, config)
            # a reset also restarts the schedule: phase 2 then warms up and decays on its own
            offset = phase1 if reset and step >= phase1 else 0
            mult = lr_multiplier(step - offset, t_cfg.steps - offset, t_cfg.warmup_steps,
                                 t_cfg.schedule, t_cfg.min_lr_ratio, t_cfg.decay_fraction)
            for group in optimizer.param_groups:
                group["lr"] = group.get("base_lr", t_cfg.lr) * mult
            lr = t_cfg.lr * mult
            head_losses = [0.0] * model.n_future
            for _ in range(t_cfg.grad_accum):
                if step < phase1:
                    raw = superposed.next_windows(rows).to(device, non_blocking=True)
                    positions = raw.size(0) * config.data.seq_len
                    counts = distributed.sum_(ranks, torch.tensor([positions] * model.n_future)).tolist()
                    micro = tst.backward_tst(model, raw, t_cfg.tst_bag, weights, grad_scale, autocast, counts)
                    window_tokens += (raw.size(1) - model.n_future) * raw.size(0) * ranks.world
                else:
                    ids, labels = dataset.train.next(rows)
                    ids, labels = ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                    labels = mask_pad(labels, pad_id)
                    counts = distributed.sum_(ranks, label_counts(labels, model.n_future)).tolist()
                    micro = step_backward(model, ids, labels, weights, grad_scale, autocast, counts,
                                          t_cfg.label_smoothing)
                    window_tokens += ids.numel() * ranks.world
                head_losses = [a + b / t_cfg.grad_accum for a, b in zip(head_losses, micro)]
            if not sharded:  # FSDP reduces the gradients itself, during backward
                distributed.sum_gradients(ranks, model)
            # one all-reduce for the losses and the stop flag, so that every rank decides alike
            # rank 0's clock decides (the others wait out its evaluations and saves under ddp)
            time_up = (ranks.main and bool(t_cfg.time_limit)
                       and time.perf_counter() - t0 - side >= t_cfg.time_limit)
            shared = distributed.sum_(ranks, torch.tensor(head_losses + [float(bool(signals.received)),
                                                                         float(time_up)], dtype=torch.float64))
            head_losses, stop, time_up = shared[:-2].tolist(), bool(shared[-2]), bool(shared[-1])
            grads = [p.grad for p in trainable if p.grad is not None]
            if t_cfg.clip > 0:
                grad_norm = distributed.to_float(torch.nn.utils.clip_grad_norm_(trainable, t_cfg.clip))
            else:
                grad_norm = distributed.to_float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            done = step + 1
            if guard.check(done, head_losses, grad_norm, last_good):
                optimizer.step()
            elif ranks.main:
                bar.write(f"mtplab: step {done}: non-finite loss or gradient, update skipped "
                          f"({guard.in_a_row} in a row, {guard.skipped} in all)", file=sys.stderr)
            optimizer.zero_grad(set_to_none=True)
            result.head_losses, result.step = head_losses, done
            bar.update(1)
            if ranks.main and (done % t_cfg.log_every == 0 or done == t_cfg.steps):
                now = time.perf_counter()
                tok_s = window_tokens / max(now - window_t0, 1e-9)
                window_t0, window_tokens = now, 0
                loss = _weighted(head_losses, weights)
                row = {"step": done, "loss": loss, "head_losses": head_losses, "lr": lr,
                       "tokens_per_s": tok_s}
                if step < phase1:  # multi-hot losses over bags: not comparable with next-token CE
                    row["tst"] = True
                if guard.skipped:
                    row["nonfinite_steps"] = guard.skipped
                _append(out_dir / METRICS, row)
                bar.set_postfix(loss=f"{loss:.3f}", head0=f"{head_losses[0]:.3f}", tok_s=f"{tok_s:,.0f}")
            scheduled = done % t_cfg.eval_every == 0 or done == t_cfg.steps or time_up
            side_t0 = time.perf_counter()
            if scheduled and (ranks.main or sharded):
                evaluate(done)
            if (scheduled or stop) and (ranks.main or sharded):
                last_good = save(done)
            side += time.perf_counter() - side_t0
            if time_up and not stop:  # a finished run, only shorter: evaluated and saved above
                result.time_limited = True
                break
            if stop:
                result.stopped_by = signals.name or "a stop signal on another rank"
                break
    bar.close()
    if ranks.main and start >= t_cfg.steps and not (out_dir / LOSS_PLOT).exists():
        plot_losses(out_dir / METRICS, out_dir / LOSS_PLOT)
    result.nonfinite_steps = guard.skipped
    result.seconds = time.perf_counter() - t0
    result.train_seconds = result.seconds - side
    return result


def _weighted(losses: list[float], weights: list[float]) -> float:
    return float(sum(l * w for l, w in zip(losses, weights)))


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint a run resumes from (they will be logged again)."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    if path.exists() or rows:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
