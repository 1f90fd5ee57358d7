"""Crash-safe writes: whatever happens during a write, the target is the old file (or directory) or
the new one, never half of one, and no temporary is left behind."""

import errno
import os

import pytest

from mtplab import atomic
from mtplab.errors import MtplabError


def test_atomic_write_turns_os_errors_into_one_message(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def fails(tmp):
        tmp.write_bytes(b"new, half")
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(MtplabError, match="cannot write .*x.bin: Input/output error"):
        atomic.atomic_write(target, fails)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_an_interrupted_atomic_write_leaves_the_old_file_intact(tmp_path):
    target = tmp_path / "x.txt"
    atomic.atomic_write_text(target, "old")

    def interrupted(tmp):
        tmp.write_text("new, half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write(target, interrupted)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]
    atomic.atomic_write_text(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_atomic_write_makes_missing_parents_and_names_an_unwritable_one(tmp_path):
    atomic.atomic_write_text(tmp_path / "a" / "b" / "x.txt", "hi")
    assert (tmp_path / "a" / "b" / "x.txt").read_text() == "hi"
    (tmp_path / "file").write_text("")
    with pytest.raises(MtplabError, match="cannot write to .*file"):
        atomic.atomic_write_text(tmp_path / "file" / "x.txt", "hi")


def write_files(**files):
    def write(directory):
        for name, text in files.items():
            (directory / name).write_text(text)
    return write


def test_atomic_dir_writes_a_new_directory_whole(tmp_path):
    seen = []

    def write(directory):
        seen.append(directory)
        assert atomic.is_partial(directory.name) and directory.parent == tmp_path
        assert not (tmp_path / "out").exists()  # nothing at the target while it is written
        write_files(a="1", b="2")(directory)

    atomic.atomic_dir(tmp_path / "out", write)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not seen[0].exists()


def test_atomic_dir_replaces_an_existing_directory_whole(tmp_path):
    out = tmp_path / "out"
    atomic.atomic_dir(out, write_files(a="old", stale="old"))
    atomic.atomic_dir(out, write_files(a="new"))
    assert [p.name for p in out.iterdir()] == ["a"] and (out / "a").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old copy moved aside is gone


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_an_interrupted_atomic_dir_leaves_the_old_directory_intact(tmp_path, failure):
    out = tmp_path / "out"
    atomic.atomic_dir(out, write_files(a="old"))

    def interrupted(directory):
        (directory / "a").write_text("new, half")
        raise failure

    expected = MtplabError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected, match="cannot write .*out: No space left on device" if expected is MtplabError
                       else None):
        atomic.atomic_dir(out, interrupted)
    assert [p.name for p in out.iterdir()] == ["a"] and (out / "a").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    atomic.atomic_dir(out, write_files(a="old"))
    real_replace = os.replace

    def replace(source, target):
        if str(target) == str(out):  # moving the new directory in fails; moving the old one back works
            if not str(source).endswith(".old.tmp"):
                raise OSError(errno.EIO, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(MtplabError, match="cannot write .*out: Input/output error"):
        atomic.atomic_dir(out, write_files(a="new"))
    assert (out / "a").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_only_hidden_tmp_names_are_partial_writes():
    assert atomic.is_partial(".model.safetensors.abc123.tmp") and atomic.is_partial(".step-000004.1a2b3c4d.old.tmp")
    assert not atomic.is_partial("step-000004") and not atomic.is_partial("notes.tmp")
    assert not atomic.is_partial(".hidden")
