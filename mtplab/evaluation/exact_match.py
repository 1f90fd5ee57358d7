"""Exact-match accuracy of math answers: the final number after `####` (GSM8K), else the last number.
Answers are generated greedily from chat-format prompts."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def normalize_number(text: str) -> str | None:
    """'1,000' -> '1000', '$3.50' -> '3.5', '-07' -> '-7'; None when it is not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a worked solution, normalized; None if it has no number."""
    if "####" in text:
        after = text.split("####")[-1]
        match = NUMBER.search(after)
        if match:
            return normalize_number(match.group())
    numbers = NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def is_correct(prediction: str, reference: str) -> bool:
    gold = extract_answer(reference)
    return gold is not None and extract_answer(prediction) == gold


def evaluate_answers(model, tokenizer, examples: list[dict], max_new_tokens: int = 128,
                     progress: bool = False, batch_size: int = 16,
                     speculative: bool | None = None) -> dict:
    """Greedy answers to `examples` (question/answer dicts), `batch_size` questions decoded
    together (each answer is the one it gets alone); accuracy overall and by `steps` when the
    examples carry it, plus one row per example."""
    from ..inference.decode import decode_many

    rows = []
    answers = decode_many(model, tokenizer, [ex["question"] for ex in examples], chat=True,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, speculative=speculative,
                          progress=progress, desc="answering")
    for ex, answer in zip(examples, answers):
        output = answer.text
        rows.append({"question": ex["question"], "reference": ex["answer"], "output": output,
                     "prediction": extract_answer(output), "target": extract_answer(ex["answer"]),
                     "correct": is_correct(output, ex["answer"]), "steps": ex.get("steps")})
    by_steps: dict[int, list[bool]] = {}
    for row in rows:
        if row["steps"] is not None:
            by_steps.setdefault(row["steps"], []).append(row["correct"])
    return {"accuracy": sum(r["correct"] for r in rows) / max(len(rows), 1), "n": len(rows),
            "accuracy_by_steps": {k: sum(v) / len(v) for k, v in sorted(by_steps.items())},
            "rows": rows}
