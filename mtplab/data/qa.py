"""Question/answer jsonl files: GSM8K's schema (`question`, `answer`), MetaMathQA's (`query`,
`response`) read the same way. Errors name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MtplabError

FIELD_PAIRS = [("question", "answer"), ("query", "response")]


def load_qa_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise MtplabError(f"data file not found: {path}")
    examples = []
    with open(path, encoding="utf-8", errors="strict") as handle:
        try:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise MtplabError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                examples.append(_qa(row, path, lineno))
                if limit is not None and len(examples) >= limit:
                    break
        except UnicodeDecodeError:
            raise MtplabError(f"{path}: not UTF-8 text") from None
    if not examples:
        raise MtplabError(f"{path}: no examples")
    return examples


def _qa(row, path: Path, lineno: int) -> dict:
    if isinstance(row, dict):
        for q, a in FIELD_PAIRS:
            if isinstance(row.get(q), str) and isinstance(row.get(a), str):
                return {"question": row[q], "answer": row[a]}
    raise MtplabError(f"{path}:{lineno}: expected string fields question/answer or query/response")


def qa_to_text(example: dict, eos: str) -> str:
    """A Q/A pair as one plain document, for packed language-model training."""
    return f"{example['question'].strip()}\n{example['answer'].strip()}{eos}"
