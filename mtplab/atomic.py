"""Crash-safe writes: build the new file or directory as a hidden sibling, fsync it, then rename it
over the target.

A reader (or a resumed run) sees either the old file or directory or the new one, never half of
one. Every temporary this module makes is hidden and ends in `.tmp` (`is_partial`), so that a
process killed in the middle leaves only names the next start can recognise and remove.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

from .errors import MtplabError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and move the result to `path` atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise MtplabError(f"cannot write to {path.parent}: {exc.strerror}") from None
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MtplabError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_dir(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_dir)` on a fresh hidden sibling directory and rename it to `path`. An existing
    `path` is moved aside first and removed after, so the path holds the old directory or the new
    one, never a mix; whatever fails, no temporary is left behind."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise MtplabError(f"cannot write to {path.parent}: {exc.strerror or exc}") from None
    try:
        write(tmp)
        fsync_dir(tmp)
        _replace_dir(tmp, path)
    except OSError as exc:
        raise MtplabError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed


def is_partial(name: str) -> bool:
    """Whether a file or directory name is one of this module's temporaries (or a moved-aside old
    directory): what a process killed while writing leaves behind."""
    return name.startswith(".") and name.endswith(".tmp")


def _sibling(path: Path, kind: str) -> Path:
    """.NAME.1a2b3c4d.tmp (kind "tmp") or .NAME.1a2b3c4d.old.tmp (kind "old")."""
    suffix = ".tmp" if kind == "tmp" else f".{kind}.tmp"
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}{suffix}"


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an old `target` is moved aside first and removed after."""
    old = _sibling(target, "old") if target.exists() else None
    if old is not None:
        os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
