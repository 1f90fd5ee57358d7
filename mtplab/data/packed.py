"""Text corpora as one long token array on disk (numpy memmap), the format packed LM batches read.

`tokens.bin` holds the ids back to back, documents separated by eos; `tokens.json` records the
dtype (uint16 when the vocabulary fits, else uint32) and the count.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from ..atomic import atomic_write, atomic_write_text
from ..errors import MtplabError


TEXT_SUFFIXES = (".txt", ".raw", ".text")
_GUTENBERG_START = re.compile(r"\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|-TEXT)[^*]*\*\*\*",
                              re.IGNORECASE)
_GUTENBERG_END = re.compile(r"\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|-TEXT)", re.IGNORECASE)
_GUTENBERG_END_LINE = re.compile(r"\n[ \t]*End of (?:the )?Project Gutenberg", re.IGNORECASE)


def text_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files `paths` name: a directory stands for its text files (.txt, .raw, .text), sorted
    by name, not recursing."""
    files = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not inside:
                raise MtplabError(f"{path}: a directory with no text files ({', '.join(TEXT_SUFFIXES)})")
            files += inside
        elif path.is_file():
            files.append(path)
        else:
            raise MtplabError(f"text file not found: {path}")
    return files


def strip_gutenberg(text: str) -> str:
    """A Project Gutenberg e-text without its header and licence footer: what lies between the
    `*** START OF ... ***` and `*** END OF ...` lines (and before an "End of Project Gutenberg's ..."
    line just above the latter). Text without both markers comes back as it is."""
    start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
    if not start or not end or end.start() <= start.end():
        return text
    body = text[start.end():end.start()]
    tail = _GUTENBERG_END_LINE.search(body, max(0, len(body) - 2000))
    return (body[:tail.start()] if tail else body).strip("\n") + "\n"


def read_text_files(paths: Iterable[str | Path]) -> list[str]:
    """One string per file (a directory: one per text file in it); Project Gutenberg boilerplate
    is stripped."""
    texts = []
    for path in text_files(paths):
        try:
            texts.append(strip_gutenberg(path.read_text(encoding="utf-8").lstrip("\ufeff")))
        except UnicodeDecodeError:
            raise MtplabError(f"{path}: not UTF-8 text") from None
    return texts


def pack_tokens(documents: Iterable[list[int]], eos_id: int, out: str | Path, vocab_size: int) -> np.memmap:
    """Write documents' ids, each followed by eos, to `out` (a .bin file) and map it back."""
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    arrays = [np.asarray(doc + [eos_id], dtype=dtype) for doc in documents if doc]
    if not arrays:
        raise MtplabError("the corpus is empty: no tokens to train on")
    flat = np.concatenate(arrays)
    out = Path(out)
    atomic_write(out, lambda tmp: flat.tofile(tmp))
    atomic_write_text(out.with_suffix(".json"), json.dumps({"dtype": np.dtype(dtype).name,
                                                            "count": int(flat.size)}))
    return open_tokens(out)


def open_tokens(path: str | Path) -> np.memmap:
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise MtplabError(f"no packed tokens at {path} (needs {path.name} and {meta_path.name})")
    meta = json.loads(meta_path.read_text())
    dtype = np.dtype(meta["dtype"])
    if path.stat().st_size != meta["count"] * dtype.itemsize:
        raise MtplabError(f"{path}: size does not match {meta_path.name} (truncated file?)")
    return np.memmap(path, dtype=dtype, mode="r", shape=(meta["count"],))
