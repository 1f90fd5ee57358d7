"""`mtplab eval`'s tasks on a data file: GSM8K exact match, loss per head, perplexity.

Each returns (result dict, one-line summary); the CLI prints one or the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data.batches import ChatBatches, PackedBatches
from ..data.packed import read_text_files
from ..data.pipeline import chat_pairs
from ..data.qa import load_qa_jsonl
from ..errors import MtplabError
from ..interop.atomic import atomic_write_text
from ..models.transformer import Transformer
from ..training.losses import evaluate_heads
from .exact_match import evaluate_answers
from .perplexity import perplexity

TASKS = ("gsm8k", "loss", "ppl")


def evaluate_task(model: Transformer, tokenizer, task: str, data: str, limit: int | None = None,
                  max_new_tokens: int = 256, out: str | Path | None = None,
                  progress: bool = False) -> tuple[dict, str]:
    """Score `model` on `data` (jsonl of question/answer, or text for loss/ppl). `out` receives the
    per-example rows of gsm8k."""
    if task not in TASKS:
        raise MtplabError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
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
        report = evaluate_answers(model, tokenizer, examples, max_new_tokens, progress=progress)
        atomic_write_text(Path(out), "".join(json.dumps(r) + "\n" for r in report.pop("rows")))
        result = {"task": "gsm8k", "accuracy": report["accuracy"], "n": report["n"], "per_example": str(out)}
        return result, f"GSM8K exact match: {report['accuracy']:.2%} of {report['n']} ({out})"
    if task == "loss":
        seq = model.config.max_seq_len
        try:
            if is_jsonl:
                batches = ChatBatches(chat_pairs(examples, tokenizer), seq, 8, tokenizer.pad_id)
            else:
                ids = tokenizer.encode(text)[: None if limit is None else limit * seq + 1]
                batches = PackedBatches(np.asarray(ids, dtype=np.int64), max(1, min(seq, len(ids) - 1)), 8)
        except ValueError as exc:  # nothing fits the model's context window
            raise MtplabError(f"{data}: {exc}") from None
        losses = evaluate_heads(model, batches.eval_batches(10**9))
        skipped = getattr(batches, "dropped", 0)
        summary = "mean cross-entropy per head (nats/token): " + ", ".join(
            f"head {k} {l:.4f}" for k, l in enumerate(losses))
        if skipped:
            summary += f" ({skipped} examples longer than the {seq}-token context skipped)"
        return {"task": "loss", "head_losses": losses, "skipped_longer_than_context": skipped}, summary
    result = {"task": "ppl", **perplexity(model, tokenizer.encode(text), len(text.encode("utf-8")))}
    return result, (f"{result['tokens']:,} tokens: {result['nats_per_token']:.4f} nats/token, "
                    f"perplexity {result['perplexity']:.2f}, {result['bits_per_byte']:.4f} bits/byte")
