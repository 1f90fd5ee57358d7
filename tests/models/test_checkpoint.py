"""mtplab/models/checkpoint.py. Checkpoints survive any kill: SIGKILL at random moments and inside
each stage of a checkpoint write, then `--resume`, ends bit-identical to a run that was never
interrupted. Below, the module on its own: what it writes it reads, a bad state dict is refused in
one line, steps rotate and the newest is published, resume skips a step that does not read back."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import mtplab
from mtplab.atomic import is_partial
from mtplab.config import load_config
from mtplab.errors import MtplabError
from mtplab.models.checkpoint import (CHECKPOINTS, CONFIG, TOKENIZER, TRAINER_STATE, WEIGHTS, load_latest, load_model,
                                      load_state, load_weights, read_config, remove_partial_writes, save_checkpoint,
                                      save_step, step_dirs)
from mtplab.models.transformer import Transformer
from mtplab.tokenizer import Tokenizer
from mtplab.training import trainer
from tests.conftest import ROOT, TINY

RUN = ["train", "--recipe", str(TINY), "--quiet", "--set", "train.steps=30", "--set", "train.eval_every=4",
       "--set", "train.log_every=1", "--set", "data.n_train=400", "--set", "data.n_eval=16"]

# Runs the CLI with one function wrapped so that the process SIGKILLs itself at a chosen point of its
# n-th checkpoint: half-way through writing the weights, with the step directory written but not yet
# renamed into place, or with the top-level weights published but not their config.
DRIVER = """
import os, signal, sys
import mtplab.models.checkpoint as checkpoint
point, nth = sys.argv[1], int(sys.argv[2])
calls = []
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def due():
    calls.append(1)
    return len(calls) == nth
if point == "weights":
    real_save = checkpoint.save_file
    def save_file(state, path, metadata=None):
        real_save(state, path, metadata=metadata)
        if due():
            with open(path, "r+b") as handle:
                handle.truncate(os.path.getsize(path) // 2)
            die()
    checkpoint.save_file = save_file
elif point == "rename":
    real_checkpoint = checkpoint.save_checkpoint
    def save_checkpoint(*args):
        real_checkpoint(*args)
        if due():
            die()
    checkpoint.save_checkpoint = save_checkpoint
elif point == "publish":
    real_publish = checkpoint.publish
    def publish(source, target):
        real_publish(source, target)
        if target.name == "tokenizer.json" and due():
            die()
    checkpoint.publish = publish
from mtplab.cli import main
sys.exit(main(sys.argv[3:]))
"""


def logged_steps(out):
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def run(args, out, kill_after=None):
    """Run the driver; with `kill_after`, SIGKILL it that many seconds after it logs a new step."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = logged_steps(out)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args, "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        while proc.poll() is None and logged_steps(out) <= before:
            time.sleep(0.05)
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path):
    straight, out = tmp_path / "straight", tmp_path / "killed"
    code, err = run(["none", "0", *RUN], straight)
    assert code == 0, err
    chance = random.Random(7)
    kills = [("time", 0.0), ("weights", 2), ("rename", 2), ("publish", 2), ("weights", 1)]
    kills += [("time", chance.uniform(0.0, 1.5)) for _ in range(3)]
    outcomes = []
    for i, (point, arg) in enumerate(kills):
        resume = ["--resume"] if i else []
        if point == "time":
            code, err = run(["none", "0", *RUN, *resume], out, kill_after=arg)
            assert code in (-signal.SIGKILL, 0), err  # 0: the run finished before the kill
        else:
            code, err = run([point, str(arg), *RUN, *resume], out)
            assert code == -signal.SIGKILL, err
        outcomes.append((point, code, [s for s, _ in step_dirs(out)]))
        for _, directory in step_dirs(out):  # every checkpoint left on disk loads
            load_model(directory)
        if (out / "config.json").exists():
            load_model(out)
    code, err = run(["none", "0", *RUN, "--resume"], out)
    assert code == 0, err
    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 31))  # none lost, none twice
    assert not [p for p in out.rglob(".*.tmp")]  # no partial write left behind
    assert len(step_dirs(out)) == 2  # rotation kept the last two
    print(outcomes)


def test_sigterm_from_the_command_line_saves_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mtplab", *RUN, "--set", "train.steps=100000", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    (step, directory), = step_dirs(out)
    assert json.loads((out / "config.json").read_text())["step"] == step
    load_model(directory)


def test_rotation_keeps_the_newest_steps(tmp_path):
    config = load_config(TINY, ["train.steps=12", "train.eval_every=3", "train.keep_checkpoints=2",
                                "data.n_train=400", "data.n_eval=16"])
    trainer.train(config, tmp_path / "run", progress=False)
    assert [s for s, _ in step_dirs(tmp_path / "run")] == [9, 12]


@pytest.mark.parametrize("broken", ["truncated", "foreign"])
def test_a_run_with_no_readable_checkpoint_is_not_resumed(tmp_path, broken):
    out = tmp_path / "run"
    trainer.train(load_config(TINY, ["train.steps=4", "train.eval_every=4", "data.n_train=400"]), out,
                  progress=False)
    (_, directory), = step_dirs(out)
    state = directory / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100] if broken == "truncated" else b"not a pickle")
    with pytest.raises(Exception, match="no checkpoint .* reads back"):
        trainer.train(load_config(TINY, ["train.steps=8", "data.n_train=400"]), out, resume=True, progress=False)


# -- the module itself, without a training run ------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    """A tiny untrained model and a tokenizer that fits it."""
    tokenizer = Tokenizer.train([f"Ava has {n} apples." for n in range(40)], 300)
    model = Transformer(load_config(TINY, [f"model.vocab_size={tokenizer.vocab_size}"]).model)
    return model.eval(), tokenizer


def test_what_save_checkpoint_writes_load_model_reads(tmp_path, small):
    model, tokenizer = small
    save_checkpoint(tmp_path / "ckpt", model, tokenizer, {"note": "x"}, {"step": 7}, step=7, files={"extra.txt": "hi"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary beside it
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted(
        [CONFIG, WEIGHTS, TOKENIZER, TRAINER_STATE, "extra.txt"])
    config = read_config(tmp_path / "ckpt")
    assert config["step"] == 7 and config["run"] == {"note": "x"} and config["mtplab_version"] == mtplab.__version__
    assert load_weights(tmp_path / "ckpt")[1] == 7
    loaded, loaded_tokenizer = load_model(tmp_path / "ckpt")
    assert loaded_tokenizer.vocab_size == tokenizer.vocab_size
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_a_new_checkpoint_directory_appears_whole_or_not_at_all(tmp_path, small, monkeypatch):
    model, tokenizer = small

    def disk_full(directory):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tokenizer, "save", disk_full)
    with pytest.raises(MtplabError, match="cannot write .*ckpt: No space left on device"):
        save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("norm_f.weight"), "missing norm_f.weight"),
    (lambda s: s.update({"lm_head.extra": torch.zeros(1)}), "unexpected lm_head.extra"),
    (lambda s: s.update({"norm_f.weight": torch.zeros(3)}), "shape mismatch norm_f.weight (3,) vs (64,)"),
])
def test_a_bad_state_dict_is_refused_in_one_line_naming_the_key(small, edit, message):
    model, _ = small
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    edit(state)
    with pytest.raises(MtplabError) as info:
        load_state(model, state, "w.safetensors")
    assert str(info.value) == f"w.safetensors does not fit the model: {message}"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded


def test_steps_rotate_and_the_newest_is_published(tmp_path, small):
    model, tokenizer = small
    out = tmp_path / "run"
    for step in (1, 2, 3):
        save_step(out, step, model, tokenizer, {}, {"step": step}, keep=2)
    assert [s for s, _ in step_dirs(out)] == [2, 3]
    newest = out / CHECKPOINTS / "step-000003"
    for name in (CONFIG, WEIGHTS, TOKENIZER):  # hard links to the newest step's files
        assert os.path.samefile(out / name, newest / name)
    assert read_config(out)["step"] == 3 and not (out / TRAINER_STATE).exists()
    save_step(out, 3, model, tokenizer, {}, {"step": 3, "again": True}, keep=0)  # the same step again
    save_step(out, 4, model, tokenizer, {}, {"step": 4}, keep=0)
    assert [s for s, _ in step_dirs(out)] == [2, 3, 4]
    assert torch.load(newest / TRAINER_STATE, weights_only=True)["again"]
    assert not [p for p in out.rglob("*") if is_partial(p.name)]


def test_resume_takes_the_newest_step_that_reads_back(tmp_path, small):
    model, tokenizer = small
    out = tmp_path / "run"
    assert load_latest(out) is None
    for step in (1, 2):
        save_step(out, step, model, tokenizer, {}, {"step": step}, keep=0)
    torch.save({"step": 1}, out / CHECKPOINTS / "step-000002" / TRAINER_STATE)  # not the weights' step
    warnings = []
    step, weights, state, directory = load_latest(out, warn=warnings.append)
    assert (step, state, directory.name) == (1, {"step": 1}, "step-000001")
    assert weights.keys() == model.state_dict().keys()
    assert warnings == [f"mtplab: skipping {out / CHECKPOINTS / 'step-000002'}: weights are from step 2 but "
                        "the trainer state from step 1"]


def test_partial_writes_are_removed_and_nothing_else(tmp_path, small):
    model, tokenizer = small
    out = tmp_path / "run"
    save_step(out, 1, model, tokenizer, {}, {"step": 1})
    leftovers = [out / ".model.safetensors.link.tmp", out / CHECKPOINTS / ".step-000002.1a2b3c4d.tmp",
                 out / CHECKPOINTS / ".step-000001.1a2b3c4d.old.tmp"]
    leftovers[0].write_text("")
    for directory in leftovers[1:]:
        directory.mkdir()
        (directory / WEIGHTS).write_text("")
    (out / "notes.tmp").write_text("mine")
    remove_partial_writes(out)
    assert not any(p.exists() for p in leftovers) and (out / "notes.tmp").exists()
    assert [s for s, _ in step_dirs(out)] == [1]
