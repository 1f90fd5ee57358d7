"""What every training loop shares (training/run.py): the device, autocast, the random streams a
checkpoint carries, the run directory a failed run does not leave behind, metrics.jsonl."""

import json
import random

import numpy as np
import pytest
import torch

from mtplab.errors import MtplabError
from mtplab.training import run


def test_the_device_is_the_one_asked_for_and_cuda_without_a_gpu_is_an_error(monkeypatch):
    assert run.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run.pick_device("auto") == torch.device("cpu")
    with pytest.raises(MtplabError, match="device cuda requested but no CUDA GPU is available"):
        run.pick_device("cuda")


def test_autocast_is_bf16_where_asked_and_off_on_the_cpu_by_default():
    cpu = torch.device("cpu")
    with run.autocast_for(cpu, "auto")():
        assert not torch.is_autocast_enabled("cpu")
    with run.autocast_for(cpu, "bf16")():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_a_saved_rng_state_replays_every_stream():
    run.seed_everything(3)
    first = draws()
    run.seed_everything(3)
    assert draws() == first  # python, numpy and torch all seeded
    state = run.rng_state()
    expected = [draws() for _ in range(3)]
    run.seed_everything(99)  # a resumed process starts elsewhere...
    run.restore_rng(state)
    assert [draws() for _ in range(3)] == expected  # ...and continues exactly


def test_a_failed_run_removes_the_directory_it_made_and_nothing_else(tmp_path):
    made = tmp_path / "new-run"
    with pytest.raises(RuntimeError):
        with run.cleanup_on_failure(made):
            made.mkdir()
            (made / "tokenizer.json").write_text("{}")
            raise RuntimeError("failed before any step was saved")
    assert not made.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        with run.cleanup_on_failure(existing):
            raise RuntimeError("boom")
    assert existing.is_dir()
    saved = tmp_path / "saved-a-step"
    with pytest.raises(KeyboardInterrupt):
        with run.cleanup_on_failure(saved):
            (saved / "checkpoints" / "step-5").mkdir(parents=True)
            raise KeyboardInterrupt
    assert (saved / "checkpoints" / "step-5").is_dir()  # a saved step is kept, for --resume
    with run.cleanup_on_failure(tmp_path / "fine"):
        (tmp_path / "fine").mkdir()
    assert (tmp_path / "fine").is_dir()


def test_a_fresh_run_refuses_a_directory_that_holds_one_and_resume_needs_the_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert run.open_run(out, resume=False, main=True) == (None, None) and out.is_dir()
    assert run.open_run(out, resume=False, main=True) == (None, None)  # still empty: fine
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    with pytest.raises(MtplabError, match="already holds a training run: pass --resume"):
        run.open_run(out, resume=False, main=True)
    with pytest.raises(MtplabError, match="cannot resume: .*nope does not exist"):
        run.open_run(tmp_path / "nope", resume=True, main=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run.open_run(empty, resume=True, main=True) == (None, None)
    assert "has no checkpoint yet: starting from step 0" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(MtplabError, match="cannot create .*file/run"):
        run.open_run(tmp_path / "file" / "run", resume=False, main=True)


def test_metrics_after_the_resumed_step_are_dropped(tmp_path):
    for row in ({"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7},
                {"step": 3, "loss": 2.2}):
        run.append_metrics(tmp_path, row)
    with open(tmp_path / run.METRICS, "a") as handle:
        handle.write('{"step": 4, "lo')  # a line cut short by a crash
    run.truncate_metrics(tmp_path, 2)
    rows = [json.loads(line) for line in (tmp_path / run.METRICS).read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7}]
    run.truncate_metrics(tmp_path / "no-metrics-yet", 0)
    assert not (tmp_path / "no-metrics-yet" / run.METRICS).exists()
