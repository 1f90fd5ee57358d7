"""The training loop: AdamW or Muon/Aurora (optimizers.py), warmup + cosine/WSD, TST phase 1 (tst.py),
accumulation, clipping, bf16 autocast where the hardware has it, periodic held-out evaluation, atomic rotating checkpoints,
bit-exact `--resume`, data parallelism under torchrun (distributed.py), skipped non-finite steps, a
clean stop on SIGINT/SIGTERM, metrics.jsonl, a progress bar and a loss plot.

Top to bottom: `train` (one process, or one rank of a torchrun), `_setup` (everything before the
first step), `_train` (the loop), then the loop's parts in the order a step calls them. What every
training loop shares (device, RNG, the run directory, the result type) is in run.py.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..architectures import architecture_of
from ..config import Config
from ..data.pipeline import Dataset, build_dataset
from ..evaluation.head_loss import evaluate_heads, mask_pad
from ..evaluation.plots import plot_losses
from ..models.checkpoint import WEIGHTS, load_base, load_state, save_step
from ..models.transformer import Transformer
from . import distributed, tst
from .faults import NonFiniteGuard, StopSignals
from .losses import backward_all_heads, backward_heads, head_weights, label_counts, weighted_loss
from .optimizers import make_optimizer
from .run import (LOSS_PLOT, METRICS, TrainResult, append_metrics, autocast_for, cleanup_on_failure, open_run,
                  pick_device, restore_rng, rng_state, seed_everything, truncate_metrics)
from .schedules import lr_multiplier


def train(config: Config, out_dir: str | Path, resume: bool = False, progress: bool = True,
          bar_options: dict | None = None) -> TrainResult:
    """Train the model described by `config`, writing a checkpoint directory to `out_dir`. Under
    torchrun this process is one rank of a data-parallel run (see distributed.py). Another
    architecture (model.arch, see architectures.py) trains with its own loop instead. `bar_options`
    go to the step bar's tqdm (e.g. position, leave, desc: `mtplab ablate` nests it under its own)."""
    other = architecture_of(config.model)
    if other is not None:
        with cleanup_on_failure(Path(out_dir)):
            return other.train(config, Path(out_dir), resume, progress)
    device = pick_device(config.train.device)
    ranks = distributed.start(device)
    device = distributed.rank_device(ranks, device)
    try:
        with cleanup_on_failure(Path(out_dir), ranks.main):
            return _train(config, Path(out_dir), resume, progress and ranks.main, device, ranks,
                          bar_options or {})
    finally:
        distributed.stop(ranks)


@dataclass
class _Run:
    """A run's working state: what `_setup` builds and the loop's parts share."""
    config: Config
    out_dir: Path
    ranks: distributed.Ranks
    device: torch.device
    dataset: Dataset
    model: Transformer
    optimizer: torch.optim.Optimizer
    phase1: tst.Superposition  # TST's phase 1: its steps, batches and backward (covers none when off)
    sharded: bool  # train.parallel = fsdp under torchrun
    guard: NonFiniteGuard
    start: int = 0  # the first step to train: a resumed run's checkpoint step
    resumed: bool = False
    last_good: str = "none (no step was saved)"  # the newest checkpoint, named when the guard gives up
    # derived from the above
    autocast: object = field(init=False)
    weights: list[float] = field(init=False)  # each head's share of the objective
    pad_id: int | None = field(init=False)  # labels equal to it are not scored (train.ignore_pad)
    grad_scale: float = field(init=False)
    rows: slice = field(init=False)  # this rank's rows of a global micro-batch
    trainable: list[torch.nn.Parameter] = field(init=False)
    run_config: dict = field(init=False)  # config.json of every checkpoint

    def __post_init__(self):
        t, tokenizer = self.config.train, self.dataset.tokenizer
        self.autocast = autocast_for(self.device, t.dtype)
        self.weights = head_weights(self.config.model)
        self.run_config = self.config.to_dict()
        self.rows = self.ranks.rows(t.batch_size)
        # a tokenizer without a pad token pads with eos, which must stay scored
        self.pad_id = tokenizer.token_to_id(tokenizer.pad) if t.ignore_pad else None
        self.grad_scale = distributed.loss_scale(self.ranks, self.sharded, t.grad_accum)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]


def _setup(config: Config, out_dir: Path, resume: bool, device: torch.device, ranks: distributed.Ranks) -> _Run:
    """Everything before the first step, in an order the random streams depend on: the run
    directory, data and tokenizer, the model (fresh, from a base model, or resumed), its sharding,
    the optimizer, and a resumed run's trainer state."""
    t = config.train
    distributed.check_batch(ranks, t.batch_size)
    seed_everything(t.seed)
    checkpoint, tokenizer = open_run(out_dir, resume, ranks.main, t.init_from)
    tst.check_config(config)
    dataset = build_dataset(config, out_dir, tokenizer)
    config = replace(config, model=config.model.sized_for(dataset.tokenizer))
    model = Transformer(config.model).to(device)
    model.set_grad_checkpointing(t.grad_checkpointing)
    phase1 = tst.Superposition(config, dataset, model.n_future)
    if t.init_from and checkpoint is None:
        load_base(model, t.init_from)
    if t.freeze_trunk:  # Medusa-1: the base model stays as it is, only the heads learn
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("heads."))
    sharded = distributed.sharded(ranks, t.parallel, t.optimizer, phase1.steps > 0)
    if checkpoint is not None:
        load_state(model, checkpoint[1], checkpoint[3] / WEIGHTS)
    if sharded:
        distributed.shard(model, ranks, device)
    run = _Run(config, out_dir, ranks, device, dataset, model, make_optimizer(model, config), phase1, sharded,
               NonFiniteGuard(t.max_nonfinite_steps))
    if checkpoint is not None:
        _restore(run, checkpoint)
    if ranks.main:
        truncate_metrics(out_dir, run.start)
    return run


def _restore(run: _Run, checkpoint: tuple) -> None:
    """--resume: the optimizer, both data readers' positions, the random streams and the count of
    skipped steps, as the checkpoint saved them."""
    run.start, _, state, directory = checkpoint
    distributed.restore_optimizer(run.model, run.optimizer, state["optimizer"], run.sharded)
    run.dataset.train.load_state_dict(state["data"])
    run.phase1.load_state_dict(state.get("tst_data"))
    restore_rng(state["rng"])
    run.guard.skipped = state.get("nonfinite_steps", 0)
    run.resumed, run.last_good = True, str(directory)


def _train(config: Config, out_dir: Path, resume: bool, progress: bool, device: torch.device,
           ranks: distributed.Ranks, bar_options: dict) -> TrainResult:
    t = config.train
    run = _setup(config, out_dir, resume, device, ranks)
    result = TrainResult(run.model, run.dataset, out_dir, run.start, main=ranks.main,
                         resumed_from=run.start if run.resumed else None)
    bar = tqdm(**{"total": t.steps, "initial": run.start, "disable": not progress, "unit": "step",
                  "desc": f"train {run.model.num_parameters() / 1e6:.2f}M", "dynamic_ncols": True,
                  **bar_options})
    run.model.train()
    clock = _Clock()
    with StopSignals() as signals:
        for step in range(run.start, t.steps):
            if run.phase1.restarts_optimizer(step):
                run.optimizer = make_optimizer(run.model, run.config)
            lr = _set_lr(run, step)
            head_losses, tokens = _accumulate(run, step)
            head_losses, stop, time_up = _agree(run, head_losses, signals, clock)
            done = step + 1
            _update(run, done, head_losses, bar)
            result.head_losses, result.step = head_losses, done
            bar.update(1)
            clock.tokens += tokens
            if ranks.main and (done % t.log_every == 0 or done == t.steps):
                _log(run, done, head_losses, lr, clock.tokens_per_s(), run.phase1.covers(step), bar)
            scheduled = done % t.eval_every == 0 or done == t.steps or time_up
            with clock.aside():  # evaluations and saves are not training time
                if scheduled and (ranks.main or run.sharded):
                    result.eval_head_losses = _evaluate(run, done)
                if (scheduled or stop) and (ranks.main or run.sharded):
                    run.last_good = _save(run, done)
            if time_up and not stop:  # a finished run, only shorter: evaluated and saved above
                result.time_limited = True
                break
            if stop:
                result.stopped_by = signals.name or "a stop signal on another rank"
                break
    bar.close()
    if ranks.main and run.start >= t.steps and not (out_dir / LOSS_PLOT).exists():
        plot_losses(out_dir / METRICS, out_dir / LOSS_PLOT)
    result.nonfinite_steps = run.guard.skipped
    result.seconds = time.perf_counter() - clock.t0
    result.train_seconds = result.seconds - clock.side
    return result


class _Clock:
    """The run's time: since the start, the part spent evaluating and saving (`aside`, which
    train.time_limit does not count), and the tokens trained on since the last logged step."""

    def __init__(self):
        self.t0 = self.window_t0 = time.perf_counter()
        self.side, self.tokens = 0.0, 0

    def training_seconds(self) -> float:
        return time.perf_counter() - self.t0 - self.side

    @contextlib.contextmanager
    def aside(self):
        t0 = time.perf_counter()
        yield
        self.side += time.perf_counter() - t0

    def tokens_per_s(self) -> float:
        """Since the last call (or the start); starts the next window."""
        now = time.perf_counter()
        rate = self.tokens / max(now - self.window_t0, 1e-9)
        self.window_t0, self.tokens = now, 0
        return rate


def _set_lr(run: _Run, step: int) -> float:
    """The step's learning rate in every parameter group (each group's own base_lr scaled alike)."""
    t = run.config.train
    offset = run.phase1.schedule_offset(step)
    mult = lr_multiplier(step - offset, t.steps - offset, t.warmup_steps, t.schedule, t.min_lr_ratio,
                         t.decay_fraction)
    for group in run.optimizer.param_groups:
        group["lr"] = group.get("base_lr", t.lr) * mult
    return t.lr * mult


def _accumulate(run: _Run, step: int) -> tuple[list[float], int]:
    """The step's train.grad_accum micro-batches back-propagated (a TST batch in phase 1) and the
    replicas' gradients summed: each head's loss, and the tokens read over all ranks."""
    t = run.config.train
    head_losses, tokens = [0.0] * run.model.n_future, 0
    for _ in range(t.grad_accum):
        if run.phase1.covers(step):
            micro, n = run.phase1.micro_step(run.model, run.rows, run.device, run.ranks, run.weights,
                                             run.grad_scale, run.autocast)
        else:
            micro, n = _next_token_step(run)
        head_losses = [a + b / t.grad_accum for a, b in zip(head_losses, micro)]
        tokens += n
    distributed.reduce_gradients(run.ranks, run.model, run.sharded)
    return head_losses, tokens


def _next_token_step(run: _Run) -> tuple[list[float], int]:
    """One micro-batch of next-token training, back-propagated: each head's loss and the tokens read.
    Each head's loss is divided by its token count over all ranks (see distributed.py)."""
    ids, labels = run.dataset.train.next(run.rows)
    ids, labels = ids.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
    labels = mask_pad(labels, run.pad_id)
    counts = distributed.sum_(run.ranks, label_counts(labels, run.model.n_future)).tolist()
    # FSDP's hooks run on the model's own forward: sharded, every head's logits are alive at once
    backward = backward_all_heads if run.sharded else backward_heads
    losses = backward(run.model, ids, labels, run.weights, run.grad_scale, run.autocast, counts,
                      run.config.train.label_smoothing)
    return losses, ids.numel() * run.ranks.world


def _agree(run: _Run, head_losses: list[float], signals: StopSignals, clock: _Clock) -> tuple[list[float], bool, bool]:
    """The losses summed over ranks, whether to stop (a signal on any rank) and whether time is up:
    one all-reduce, so that every rank decides alike. Rank 0's clock decides (the others wait out
    its evaluations and saves under ddp)."""
    t = run.config.train
    time_up = run.ranks.main and bool(t.time_limit) and clock.training_seconds() >= t.time_limit
    shared = distributed.sum_(run.ranks, torch.tensor(head_losses + [float(bool(signals.received)),
                                                                     float(time_up)], dtype=torch.float64))
    return shared[:-2].tolist(), bool(shared[-2]), bool(shared[-1])


def _update(run: _Run, done: int, head_losses: list[float], bar) -> None:
    """Clip and take the optimizer step, unless the loss or gradient is not finite: then the update
    is skipped and counted (the guard stops the run after too many in a row)."""
    grad_norm = distributed.grad_norm(run.trainable, run.config.train.clip)
    if run.guard.check(done, head_losses, grad_norm, run.last_good):
        run.optimizer.step()
    elif run.ranks.main:
        bar.write(f"mtplab: step {done}: non-finite loss or gradient, update skipped "
                  f"({run.guard.in_a_row} in a row, {run.guard.skipped} in all)", file=sys.stderr)
    run.optimizer.zero_grad(set_to_none=True)


def _log(run: _Run, done: int, head_losses: list[float], lr: float, tok_s: float, superposed: bool, bar) -> None:
    loss = weighted_loss(head_losses, run.weights)
    row = {"step": done, "loss": loss, "head_losses": head_losses, "lr": lr, "tokens_per_s": tok_s}
    if superposed:  # multi-hot losses over bags: not comparable with next-token CE
        row["tst"] = True
    if run.guard.skipped:
        row["nonfinite_steps"] = run.guard.skipped
    append_metrics(run.out_dir, row)
    bar.set_postfix(loss=f"{loss:.3f}", head0=f"{head_losses[0]:.3f}", tok_s=f"{tok_s:,.0f}")


def _evaluate(run: _Run, step: int) -> list[float]:
    """Every head's held-out loss, logged (rank 0); under FSDP every rank takes part."""
    run.model.eval()
    with run.autocast():
        losses = evaluate_heads(run.model, run.dataset.eval.eval_batches(run.config.train.eval_batches))
    run.model.train()
    if run.ranks.main:
        append_metrics(run.out_dir, {"step": step, "eval_loss": weighted_loss(losses, run.weights),
                                     "eval_head_losses": losses})
    return losses


def _save(run: _Run, step: int) -> str:
    """A checkpoint of the step; returns its directory. Rank 0 writes; under FSDP every rank first
    takes part in gathering the shards."""
    model_state, optimizer_state = distributed.states(run.model, run.optimizer, run.sharded)
    if not run.ranks.main:
        return run.last_good
    state = {"step": step, "optimizer": optimizer_state, "rng": rng_state(),
             "data": run.dataset.train.state_dict(), "nonfinite_steps": run.guard.skipped}
    if (phase1_data := run.phase1.state_dict()) is not None:
        state["tst_data"] = phase1_data
    directory = save_step(run.out_dir, step, run.model, run.dataset.tokenizer, run.run_config, state,
                          run.config.train.keep_checkpoints, model_state)
    plot_losses(run.out_dir / METRICS, run.out_dir / LOSS_PLOT)
    return str(directory)
