"""`mtplab eval`'s tasks on a data file: GSM8K exact match, loss per head, perplexity.

Each returns (result dict, one-line summary); the CLI prints one or the other.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..data.batches import ChatBatches, PackedBatches
from ..data.blocks import BlockBatches
from ..data.packed import read_text_files
from ..data.pipeline import chat_pairs
from ..data.qa import load_qa_jsonl
from ..errors import MtplabError
from ..interop.atomic import atomic_write_text
from ..models.monostep import Monostep
from ..models.transformer import Transformer
from ..training.losses import evaluate_heads
from .block_loss import monostep_block_loss
from .exact_match import evaluate_answers
from .perplexity import perplexity

TASKS = ("gsm8k", "loss", "ppl")


def evaluate_task(model: Transformer, tokenizer, task: str, data: str, limit: int | None = None,
                  max_new_tokens: int = 256, out: str | Path | None = None,
                  progress: bool = False, batch_size: int = 16,
                  speculative: bool | None = None) -> tuple[dict, str]:
    """Score `model` on `data` (jsonl of question/answer, or text for loss/ppl). `out` receives the
    per-example rows of gsm8k, whose questions are answered `batch_size` at a time."""
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
        report = evaluate_answers(model, tokenizer, examples, max_new_tokens, progress=progress,
                                  batch_size=batch_size, speculative=speculative)
        atomic_write_text(Path(out), "".join(json.dumps(r) + "\n" for r in report.pop("rows")))
        result = {"task": "gsm8k", "accuracy": report["accuracy"], "n": report["n"], "per_example": str(out)}
        return result, f"GSM8K exact match: {report['accuracy']:.2%} of {report['n']} ({out})"
    if isinstance(model, Monostep):
        return _monostep_task(model, tokenizer, task, examples if is_jsonl and task == "loss" else text, limit)
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


def _monostep_task(model: Monostep, tokenizer, task: str, data, limit: int | None) -> tuple[dict, str]:
    """Seed 000's model scores blocks: `loss` is its block loss per slot over (prefix, next block)
    samples (of the answers in a jsonl, or of every block of a text's max_len windows); `ppl` is
    slot 0's next-token loss at every position (one forward per token: use --limit on long texts)."""
    window, slots = model.config.max_seq_len, model.n_future
    if isinstance(data, list):
        pairs = chat_pairs(data, tokenizer)
    else:
        ids = tokenizer.encode(data)[: None if limit is None else limit * window]
        if len(ids) < 2:
            raise MtplabError("need at least two tokens to score")
        pairs = [(ids[i:i + 1], ids[i + 1:i + window]) for i in range(0, len(ids) - 1, window - 1)]
    size = 1 if task == "ppl" else slots  # ppl: every position is a one-token block for slot 0
    batches = BlockBatches(pairs, size, 16, tokenizer.pad_id, model.config.empty_token, window)
    if task == "ppl":
        one_slot = _FirstSlot(model)
        result = monostep_block_loss(one_slot, batches)
        nats = result["loss"]
        n_bytes = len(tokenizer.decode([t for p, a in pairs for t in p + a]).encode("utf-8"))
        out = {"task": "ppl", "tokens": result["tokens"], "nats_per_token": nats, "perplexity": math.exp(nats),
               "bits_per_byte": nats * result["tokens"] / math.log(2) / max(n_bytes, 1)}
        return out, (f"{out['tokens']:,} tokens (slot 0): {nats:.4f} nats/token, perplexity "
                     f"{out['perplexity']:.2f}, {out['bits_per_byte']:.4f} bits/byte")
    result = monostep_block_loss(model, batches)
    summary = (f"block cross-entropy (nats/token): {result['loss']:.4f}; per slot: " +
               ", ".join(f"slot {k} {l:.4f}" for k, l in enumerate(result["slot_losses"])))
    return {"task": "loss", "loss": result["loss"], "head_losses": result["slot_losses"]}, summary


class _FirstSlot:
    """A Monostep model seen through slot 0 alone: [B, 1, V] logits of the next token."""

    def __init__(self, model: Monostep):
        self.model, self.device = model, model.device

    def __call__(self, ids, mask):
        return self.model(ids, mask)[:, :1]
