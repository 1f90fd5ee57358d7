"""Broken checkpoints and unwritable places: one line on stderr, exit 2, and nothing saved is lost."""

import errno
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtplab.config import load_config
from mtplab.errors import MtplabError
from mtplab.interop import atomic
from mtplab.training import trainer
from mtplab.training.checkpoints import step_dirs
from tests.conftest import TINY
from tests.test_cli import assert_one_line_error, run_cli


@pytest.fixture
def copy_of_run(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    return out


def generate(capsys, checkpoint):
    return run_cli(capsys, "generate", str(checkpoint), "--prompt", "Ava has", "--max-new-tokens", "4")


def test_truncated_weights(capsys, copy_of_run):
    weights = copy_of_run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    code, _, err = generate(capsys, copy_of_run)
    assert_one_line_error(code, err, "truncated or corrupt")


def test_garbage_weights(capsys, copy_of_run):
    (copy_of_run / "model.safetensors").write_bytes(b"\x00" * 64)
    code, _, err = generate(capsys, copy_of_run)
    assert_one_line_error(code, err, "model.safetensors")


def test_missing_and_extra_tensors_are_named(capsys, copy_of_run):
    path = copy_of_run / "model.safetensors"
    state = load_file(path)
    state["lm_head.extra"] = state.pop("norm_f.weight")
    path.unlink()  # a hard link to the step directory's copy: write a new file, not through it
    save_file(state, path)
    code, _, err = generate(capsys, copy_of_run)
    assert_one_line_error(code, err, "missing norm_f.weight; unexpected lm_head.extra")


def test_a_tokenizer_bigger_than_the_model_vocabulary(capsys, copy_of_run):
    config = json.loads((copy_of_run / "config.json").read_text())
    config["model"]["vocab_size"] = 64
    (copy_of_run / "config.json").unlink()
    (copy_of_run / "config.json").write_text(json.dumps(config))
    code, _, err = generate(capsys, copy_of_run)
    assert_one_line_error(code, err, "model.vocab_real (384) must be between 0 and model.vocab_size (64)")
    del config["model"]["vocab_real"]  # a checkpoint from before the field: the tokenizer is checked
    (copy_of_run / "config.json").write_text(json.dumps(config))
    code, _, err = generate(capsys, copy_of_run)
    assert_one_line_error(code, err, "tokenizer has")


def test_a_config_that_is_not_json(capsys, copy_of_run):
    (copy_of_run / "config.json").unlink()
    (copy_of_run / "config.json").write_text("{ half a config")
    code, _, err = generate(capsys, copy_of_run)
    assert_one_line_error(code, err, "not valid JSON")


def test_a_corrupt_dataset_line_is_reported_with_file_and_line(capsys, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?", "answer": 4}\n')
    code, _, err = run_cli(capsys, "train", "--recipe", str(TINY), "--out", str(tmp_path / "o"), "--quiet",
                           "--set", "data.source=jsonl", "--set", f"data.path={data}")
    assert_one_line_error(code, err, f"{data}:2:")


def test_an_output_path_under_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(capsys, "train", "--recipe", str(TINY), "--out", str(tmp_path / "file" / "run"),
                           "--quiet")
    assert_one_line_error(code, err, "cannot create")


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(capsys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    settings = ["--set", "train.steps=8", "--set", "train.eval_every=4", "--set", "data.n_train=400"]
    real_write = atomic.atomic_write

    def write_until_full(path, write):
        if "step-000008" in str(path):  # the disk fills up during the second checkpoint
            def short_write(tmp):
                tmp.write_bytes(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(path, short_write)
        return real_write(path, write)

    monkeypatch.setattr("mtplab.interop.checkpoint.atomic_write", write_until_full)
    code, _, err = run_cli(capsys, "train", "--recipe", str(TINY), "--out", str(out), "--quiet", *settings)
    assert_one_line_error(code, err, "No space left on device")
    assert [s for s, _ in step_dirs(out)] == [4]
    assert json.loads((out / "config.json").read_text())["step"] == 4
    assert not list(out.rglob(".*.tmp"))
    monkeypatch.undo()
    result = trainer.train(load_config(TINY, ["train.steps=8", "train.eval_every=4", "data.n_train=400"]), out,
                           resume=True, progress=False)
    assert result.step == 8 and all(torch.isfinite(p).all() for p in result.model.parameters())


def test_atomic_write_turns_os_errors_into_one_message(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def fails(tmp):
        tmp.write_bytes(b"new, half")
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(MtplabError, match="cannot write .*x.bin: Input/output error"):
        atomic.atomic_write(target, fails)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]
