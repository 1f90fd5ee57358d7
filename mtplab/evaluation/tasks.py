"""`mtplab eval`'s tasks on a data file: GSM8K exact match, loss per head, perplexity.

Each returns (result dict, one-line summary); the CLI prints one or the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..architectures import architecture_of
from ..atomic import atomic_write_text
from ..data.batches import IGNORE, PackedBatches
from ..data.packed import read_text_files
from ..data.pipeline import chat_pairs
from ..data.qa import load_qa_jsonl
from ..errors import MtplabError
from ..models.transformer import Transformer
from .head_loss import evaluate_heads
from .exact_match import evaluate_answers
from .perplexity import perplexity

TASKS = ("gsm8k", "loss", "ppl")
# `loss` on a jsonl example longer than the context: how it is scored
LONG = {"window": "scored with a sliding window", "truncate": "cut from the left to the context",
        "skip": "skipped"}


def evaluate_task(model: Transformer, tokenizer, task: str, data: str, limit: int | None = None,
                  max_new_tokens: int = 256, out: str | Path | None = None,
                  progress: bool = False, batch_size: int = 16,
                  speculative: bool | None = None, long: str = "window") -> tuple[dict, str]:
    """Score `model` on `data` (jsonl of question/answer, or text for loss/ppl). `out` receives the
    per-example rows of gsm8k, whose questions are answered `batch_size` at a time. `long`: what
    `loss` does with a jsonl example longer than the context (see `answer_rows`)."""
    if task not in TASKS:
        raise MtplabError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if long not in LONG:
        raise MtplabError(f"unknown way to score long examples {long!r}; choose one of {', '.join(LONG)}")
    if limit is not None and limit < 1:
        raise MtplabError(f"--limit must be >= 1, got {limit}")
    is_jsonl = data.endswith(".jsonl")
    if task == "gsm8k" or (task == "loss" and is_jsonl):
        examples = load_qa_jsonl(data, limit)
    else:
        text = read_text_files([data])[0]
        if not text.strip():
            raise MtplabError(f"{data}: no text")
    if task == "gsm8k":
        report = evaluate_answers(model, tokenizer, examples, max_new_tokens, progress=progress,
                                  batch_size=batch_size, speculative=speculative)
        atomic_write_text(Path(out), "".join(json.dumps(r) + "\n" for r in report.pop("rows")))
        result = {"task": "gsm8k", "accuracy": report["accuracy"], "n": report["n"], "per_example": str(out)}
        return result, f"GSM8K exact match: {report['accuracy']:.2%} of {report['n']} ({out})"
    other = architecture_of(model)  # another architecture scores loss and ppl its own way
    if other is not None:
        return other.evaluate(model, tokenizer, task, examples if is_jsonl and task == "loss" else text, limit)
    if task == "loss" and is_jsonl:
        return _answer_loss(model, tokenizer, examples, long, data)
    if task == "loss":
        seq = model.config.max_seq_len
        ids = tokenizer.encode(text)[: None if limit is None else limit * seq + 1]
        try:
            batches = PackedBatches(np.asarray(ids, dtype=np.int64), max(1, min(seq, len(ids) - 1)), 8)
        except ValueError as exc:  # fewer than two tokens
            raise MtplabError(f"{data}: {exc}") from None
        losses = evaluate_heads(model, batches.eval_batches(10**9))
        summary = "mean cross-entropy per head (nats/token): " + ", ".join(
            f"head {k} {l:.4f}" for k, l in enumerate(losses))
        return {"task": "loss", "head_losses": losses}, summary
    result = {"task": "ppl", **perplexity(model, tokenizer.encode(text), len(text.encode("utf-8")))}
    return result, (f"{result['tokens']:,} tokens: {result['nats_per_token']:.4f} nats/token, "
                    f"perplexity {result['perplexity']:.2f}, {result['bits_per_byte']:.4f} bits/byte")


def _answer_loss(model: Transformer, tokenizer, examples: list[dict], long: str, data: str) -> tuple[dict, str]:
    """`loss` on question/answer examples: every head's mean cross-entropy on the answers (as in
    training), every example scored; those longer than the context as `long` says."""
    seq = model.config.max_seq_len
    pairs = [(p, a) for p, a in chat_pairs(examples, tokenizer) if a]
    n_long = sum(len(p) + len(a) - 1 > seq for p, a in pairs)
    rows = [row for p, a in pairs for row in answer_rows(p, a, seq, long)]
    if not rows:
        raise MtplabError(f"{data}: no example fits the {seq}-token context (all {n_long} skipped)")
    rows.sort(key=lambda r: len(r[0]))  # similar lengths together: less padding
    losses = evaluate_heads(model, _collate(rows, tokenizer.pad_id, 8))
    scored = len(pairs) - (n_long if long == "skip" else 0)
    how = LONG[long] + (f" ({seq}-token windows, stride {max(1, seq // 2)})" if long == "window" else "")
    result = {"task": "loss", "head_losses": losses, "examples": len(pairs), "scored_examples": scored,
              "longer_than_context": n_long, "long_examples": long,
              "skipped_longer_than_context": n_long if long == "skip" else 0}
    summary = (f"mean cross-entropy per head (nats/token) on the answers of {scored:,} of {len(pairs):,} "
               f"examples: " + ", ".join(f"head {k} {l:.4f}" for k, l in enumerate(losses)))
    if n_long:
        summary += f"; {n_long:,} longer than the {seq}-token context, {how}"
    return result, summary


def answer_rows(prompt: list[int], answer: list[int], window: int,
                long: str = "window") -> list[tuple[list[int], list[int]]]:
    """(inputs, labels) rows of at most `window` tokens that score `answer` after `prompt`: labels
    are the next tokens on the answer, IGNORE elsewhere; head k at position t is scored against
    labels[t + k] (as in training). An example that fits is one row. A longer one is
    - window: read in windows of `window` tokens moving by half a window, each scoring only the
      labels the window before did not (the first: all), so that every head scores every answer
      token exactly once, as a fitting example would, with at least half a window of context
      (less the head's offset) before it;
    - truncate: cut from the left to its last window + 1 tokens (the question's start goes first);
    - skip: no rows."""
    ids = prompt + answer
    first = len(prompt) - 1  # the first label on the answer
    labels = [IGNORE] * first + ids[len(prompt):]  # labels[t] = ids[t + 1] on the answer
    if len(ids) - 1 <= window:
        return [(ids[:-1], labels)]
    if long == "skip":
        return []
    if long == "truncate":
        cut = len(ids) - 1 - window
        return [(ids[cut:-1], labels[cut:])]
    stride, rows, done = max(1, window // 2), [], 0  # labels [0, done) are scored
    while done < len(labels):
        stop = min(len(labels), done + stride if done else window)
        start = max(0, stop - window)
        if stop > first:  # a window that holds answer labels
            part = [IGNORE] * (done - start) + labels[done:stop]
            rows.append((ids[start:stop], part))
        done = stop
    return rows


def _collate(rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int):
    """Right-padded [B, T] inputs and labels, `batch_size` rows at a time."""
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin:begin + batch_size]
        width = max(len(x) for x, _ in chunk)
        inputs = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for r, (x, y) in enumerate(chunk):
            inputs[r, :len(x)], labels[r, :len(y)] = torch.tensor(x), torch.tensor(y)
        yield inputs, labels

