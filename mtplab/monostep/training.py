"""Monostep's training recipe: (prefix, next block) samples, mean cross-entropy
over the slots with `<empty>` unscored, AdamW, gradient clipping, a fixed number of epochs, and a
held-out evaluation after each.

A run directory holds what the published model ships beside mtplab's checkpoint files:
`metrics.json` (per-epoch train/eval loss), `loss.png` and `monostep_bundle.pt` (its format, see
bundle.py). Checkpoints are saved after every epoch and on a stop signal, so `--resume`
continues mid-epoch exactly where a run stopped.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..config import Config
from ..data.pipeline import build_tokenizer, chat_pairs, load_examples
from ..errors import MtplabError
from ..evaluation.plots import plot_epoch_losses
from ..models.checkpoint import load_state, load_tokenizer, save_step, step_dirs
from ..training.faults import NonFiniteGuard, StopSignals
from ..training.schedules import lr_multiplier
from ..training.run import (LOSS_PLOT, TrainResult, autocast_for, pick_device, restore_rng,
                            resume_point, rng_state, seed_everything)
from .bundle import METRICS_JSON, export_bundle, history_json
from .data import BlockBatches
from .metric import monostep_block_loss, slot_cross_entropy
from .model import Monostep

BUNDLE = "monostep_bundle.pt"


def train_monostep(config: Config, out_dir: Path, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train the Monostep model `config` describes into `out_dir` (mtplab.train dispatches here)."""
    t_cfg = config.train
    device = pick_device(t_cfg.device)
    seed_everything(t_cfg.seed)
    checkpoint, tokenizer = _open_run(config, out_dir, resume)
    config, tokenizer, empty_id, train_b, eval_b = _block_data(config, tokenizer)
    model = Monostep(config.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t_cfg.lr, betas=(t_cfg.beta1, t_cfg.beta2),
                                  weight_decay=t_cfg.weight_decay)
    total_steps = t_cfg.epochs * len(train_b)
    epochs = _Epochs()
    if checkpoint is not None:
        epochs.step, weights, state, directory = checkpoint
        load_state(model, weights, directory)
        optimizer.load_state_dict(state["optimizer"])
        train_b.load_state_dict(state["data"])
        epochs.history = state["history"]
        epochs.loss_sum, epochs.loss_count = state["epoch_loss"]
        restore_rng(state["rng"])
    run_config = config.to_dict()
    autocast = autocast_for(device, t_cfg.dtype)

    def save() -> str:
        state = {"step": epochs.step, "optimizer": optimizer.state_dict(), "rng": rng_state(),
                 "data": train_b.state_dict(), "history": epochs.history,
                 "epoch_loss": [epochs.loss_sum, epochs.loss_count]}
        return str(save_step(out_dir, epochs.step, model, tokenizer, run_config, state, t_cfg.keep_checkpoints))

    result = TrainResult(model, None, out_dir, epochs.step,
                         resumed_from=epochs.step if checkpoint is not None else None)
    bar = tqdm(total=total_steps, initial=epochs.step, disable=not progress, unit="batch", dynamic_ncols=True,
               desc=f"monostep {model.num_parameters() / 1e6:.2f}M")
    guard = NonFiniteGuard(t_cfg.max_nonfinite_steps)
    t0, last_good, side = time.perf_counter(), "none", 0.0  # side: seconds evaluating and saving
    model.train()
    with StopSignals() as signals:
        while epochs.step < total_steps:
            mult = lr_multiplier(epochs.step, total_steps, t_cfg.warmup_steps, t_cfg.schedule,
                                 t_cfg.min_lr_ratio, t_cfg.decay_fraction)
            loss, grad_norm = _step(model, optimizer, train_b.next(), t_cfg.lr * mult, t_cfg.clip, empty_id, autocast)
            if guard.check(epochs.step + 1, [loss], grad_norm, last_good):
                optimizer.step()
                epochs.loss_sum, epochs.loss_count = epochs.loss_sum + loss, epochs.loss_count + 1
            optimizer.zero_grad(set_to_none=True)
            epochs.step += 1
            bar.update(1)
            if epochs.step % t_cfg.log_every == 0:
                bar.set_postfix(epoch=train_b.epoch + 1, loss=f"{loss:.3f}")
            time_up = bool(t_cfg.time_limit) and time.perf_counter() - t0 - side >= t_cfg.time_limit
            side_t0 = time.perf_counter()
            if epochs.step % len(train_b) == 0 or time_up:  # an epoch (or the time) ends: evaluate, record, save
                result.eval_head_losses = epochs.close(model, eval_b, t_cfg.eval_batches or None, autocast, bar)
                last_good = save()
                write_metrics(out_dir, epochs.history)
            elif signals.received:
                last_good = save()
            side += time.perf_counter() - side_t0
            if signals.received:
                result.stopped_by = signals.name
                break
            if time_up:
                result.time_limited = True
                break
    bar.close()
    result.step, result.head_losses = epochs.step, [epochs.loss_sum / max(epochs.loss_count, 1)]
    result.nonfinite_steps, result.seconds = guard.skipped, time.perf_counter() - t0
    result.train_seconds = result.seconds - side
    if not result.stopped_by:  # metrics.json and the plot were written at the last epoch's end
        model.eval()
        export_bundle(out_dir, out_dir / BUNDLE, model=model, tokenizer=tokenizer)
    return result


def _open_run(config: Config, out_dir: Path, resume: bool):
    """Refuse what Monostep cannot train, and find the checkpoint to resume from: (checkpoint or
    None, its tokenizer or None)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MtplabError("monostep training runs in one process (no torchrun)")
    if config.train.epochs < 1:
        raise MtplabError("a monostep recipe trains for train.epochs (>= 1) passes over its samples")
    if config.data.format != "chat":
        raise MtplabError("a monostep model trains on question/answer data (data.format = chat)")
    checkpoint = resume_point(out_dir) if resume else None
    if checkpoint is not None:
        return checkpoint, load_tokenizer(checkpoint[3])
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume and step_dirs(out_dir):
        raise MtplabError(f"{out_dir} already holds a training run: pass --resume, or choose another --out")
    return None, None


def _block_data(config: Config, tokenizer):
    """The config with the model sized for the tokenizer and its `<empty>` id recorded, the tokenizer
    (trained on the examples unless resuming), that id, and the training and held-out block batches."""
    train_examples, eval_examples = load_examples(config)
    if tokenizer is None:
        tokenizer = build_tokenizer(config, [f"{ex['question']}\n{ex['answer']}" for ex in train_examples])
    empty_id = tokenizer.token_to_id("<empty>")
    if empty_id is None:
        raise MtplabError("a monostep model needs the <empty> token: add it to tokenizer.special_tokens")
    config = replace(config, model=replace(config.model, empty_token=empty_id).sized_for(tokenizer))

    def batches(examples: list[dict]) -> BlockBatches:
        return BlockBatches(chat_pairs(examples, tokenizer), config.model.n_future, config.train.batch_size,
                            tokenizer.pad_id, empty_id, config.model.max_seq_len, config.train.seed)

    return config, tokenizer, empty_id, batches(train_examples), batches(eval_examples)


def _step(model: Monostep, optimizer: torch.optim.Optimizer, batch, lr: float, clip: float, empty_id: int,
          autocast) -> tuple[float, float]:
    """One forward and backward of a block batch at learning rate `lr`: (mean slot loss, gradient
    norm). The caller steps the optimizer only when both are finite."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    ids, mask, targets = (t.to(model.device) for t in batch)
    with autocast():
        logits = model(ids, mask)
    total, count = slot_cross_entropy(logits, targets, empty_id)
    loss = total.sum() / count.sum().clamp_min(1)
    loss.backward()
    return loss.item(), float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf")))


@dataclass
class _Epochs:
    """Where a run is: the step, the loss summed over the epoch so far, and each closed epoch's
    train and held-out losses."""
    step: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    history: dict = field(default_factory=lambda: {"train_loss": [], "eval_loss": []})

    def close(self, model: Monostep, eval_batches: BlockBatches, limit: int | None, autocast, bar) -> list[float]:
        """Evaluate on the held-out blocks, record the epoch and start the next; the slots' losses."""
        model.eval()
        with autocast():
            held_out = monostep_block_loss(model, eval_batches, limit)
        model.train()
        self.history["train_loss"].append(self.loss_sum / max(self.loss_count, 1))
        self.history["eval_loss"].append(held_out["loss"])
        self.loss_sum, self.loss_count = 0.0, 0
        bar.write(f"epoch {len(self.history['eval_loss'])}: train {self.history['train_loss'][-1]:.3f}, "
                  f"eval {held_out['loss']:.3f}")
        return held_out["slot_losses"]


def write_metrics(out_dir: Path, history: dict) -> None:
    atomic_write_text(out_dir / METRICS_JSON, history_json(history))
    plot_epoch_losses(history, out_dir / LOSS_PLOT)
