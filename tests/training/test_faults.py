import json
import os
import signal

import pytest
import torch

from mtplab.config import load_config
from mtplab.errors import MtplabError
from mtplab.models.checkpoint import load_latest, load_model, step_dirs
from mtplab.training import trainer
from tests.conftest import TINY

SMALL = ["train.steps=20", "train.eval_every=10", "train.log_every=1", "data.n_train=400",
         "data.n_eval=16"]


def poison_steps(monkeypatch, bad_steps):
    """Make the gradients of the given (1-based) steps NaN, as an overflow would."""
    real, calls = trainer.backward_heads, []

    def backward(model, *args, **kwargs):
        losses = real(model, *args, **kwargs)
        calls.append(1)
        if len(calls) in bad_steps:
            for p in model.parameters():
                p.grad.fill_(float("nan"))
        return losses

    monkeypatch.setattr(trainer, "backward_heads", backward)


def test_a_non_finite_step_is_skipped_and_counted(tmp_path, monkeypatch):
    poison_steps(monkeypatch, {4, 9})
    result = trainer.train(load_config(TINY, SMALL), tmp_path / "run", progress=False)
    assert result.nonfinite_steps == 2 and result.step == 20
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.eval_head_losses[0] < rows[0]["head_losses"][0] - 1  # it went on learning
    assert [r.get("nonfinite_steps", 0) for r in rows if r["step"] in (3, 4, 9, 20) and "loss" in r] == [0, 1, 2, 2]


def test_a_skipped_step_leaves_the_weights_as_they_were(tmp_path, monkeypatch):
    poison_steps(monkeypatch, {3})
    config = load_config(TINY, ["train.steps=3", "train.eval_every=1", "train.keep_checkpoints=0",
                                "data.n_train=400", "data.n_eval=16"])
    trainer.train(config, tmp_path / "run", progress=False)
    (_, two), (_, three) = step_dirs(tmp_path / "run")[1:]
    a, b = load_model(two)[0].state_dict(), load_model(three)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_too_many_bad_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    poison_steps(monkeypatch, set(range(12, 100)))
    out = tmp_path / "run"
    with pytest.raises(MtplabError, match=r"3 steps in a row .* step 14.*step-000010"):
        trainer.train(load_config(TINY, SMALL + ["train.max_nonfinite_steps=3"]), out, progress=False)
    step, weights, _, _ = load_latest(out)
    assert step == 10 and all(torch.isfinite(w).all() for w in weights.values())
    assert json.loads((out / "config.json").read_text())["step"] == 10


def test_sigterm_finishes_the_step_saves_and_returns(tmp_path, monkeypatch):
    real, calls = trainer.backward_heads, []

    def backward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of step 7
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "backward_heads", backward)
    out = tmp_path / "run"
    result = trainer.train(load_config(TINY, SMALL), out, progress=False)
    assert result.stopped_by == "SIGTERM" and result.step == 7
    assert [s for s, _ in step_dirs(out)] == [7]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again
    monkeypatch.setattr(trainer, "backward_heads", real)
    straight = trainer.train(load_config(TINY, SMALL), tmp_path / "straight", progress=False)
    resumed = trainer.train(load_config(TINY, SMALL), out, resume=True, progress=False)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
