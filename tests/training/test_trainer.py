import json
import re
import time

import pytest
import torch
from safetensors.torch import load_file

import mtplab
from mtplab.config import load_config
from mtplab.errors import MtplabError
from mtplab.training import trainer
from tests.conftest import TINY

SMALL = ["train.steps=20", "train.eval_every=10", "train.log_every=5", "data.n_train=400",
         "data.n_eval=16"]


def test_tiny_loss_falls_below_threshold(tiny_run):
    out, result = tiny_run
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "head_losses" in r)
    assert first["head_losses"][0] > 4.5  # ~ln(vocab) at the start
    assert result.eval_head_losses[0] < 3.3  # after 60 steps, a few seconds
    assert len(result.eval_head_losses) == 2
    for name in ["config.json", "model.safetensors", "tokenizer.json", "loss.png"]:
        assert (out / name).is_file(), name
    newest = out / "checkpoints" / "step-000060"
    assert (newest / "trainer_state.pt").is_file()
    assert (newest / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_save_then_load_gives_identical_logits(tiny_run):
    out, result = tiny_run
    model, tokenizer = mtplab.load(out)
    ids = torch.tensor([tokenizer.encode(tokenizer.chat_prompt("Ava has 3 apples."))])
    with torch.no_grad():
        for a, b in zip(result.model.eval()(ids), model(ids)):
            assert torch.equal(a, b)


def test_resume_continues_to_bit_identical_weights(tmp_path, monkeypatch, capfd):
    config = load_config(TINY, SMALL)
    trainer.train(config, tmp_path / "straight", progress=False)

    real_save = trainer.save_step

    def save_then_die(*args):
        real_save(*args)
        raise KeyboardInterrupt  # killed right after the step-10 checkpoint

    monkeypatch.setattr(trainer, "save_step", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(load_config(TINY, SMALL), tmp_path / "resumed", progress=False)
    monkeypatch.setattr(trainer, "save_step", real_save)
    assert json.loads((tmp_path / "resumed" / "config.json").read_text())["step"] == 10

    capfd.readouterr()
    result = trainer.train(load_config(TINY, SMALL), tmp_path / "resumed", resume=True, progress=False)
    assert result.step == 20 and result.resumed_from == 10
    assert "mtplab: resuming from step 10 (" in capfd.readouterr().err  # says where it continues
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(l) for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "head_losses" in r]
    assert steps == [5, 10, 15, 20]  # nothing logged twice across the restart


def test_refuses_to_overwrite_a_run_or_resume_nothing(tmp_path, tiny_run):
    out, _ = tiny_run
    with pytest.raises(MtplabError, match="--resume"):
        trainer.train(load_config(TINY, SMALL), out, progress=False)
    with pytest.raises(MtplabError, match="cannot resume"):
        trainer.train(load_config(TINY, SMALL), tmp_path / "empty", resume=True, progress=False)


def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capfd):
    straight = trainer.train(load_config(TINY, SMALL), tmp_path / "straight", progress=False)
    out = tmp_path / "run"
    trainer.train(load_config(TINY, SMALL), out, progress=False)
    newest = out / "checkpoints" / "step-000020" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # a disk that lost the end of the file
    result = trainer.train(load_config(TINY, SMALL), out, resume=True, progress=False)
    err = capfd.readouterr().err
    assert f"mtplab: skipping {newest.parent}: " in err  # the damaged step, named
    assert re.search(r"mtplab: resuming from step (\d+) ", err).group(1) != "20"  # and an older one used
    assert result.step == 20
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, result.model.state_dict()[k]), k


def test_weights_and_trainer_state_from_different_steps_are_not_resumed(tmp_path):
    out = tmp_path / "run"
    trainer.train(load_config(TINY, SMALL + ["train.keep_checkpoints=1"]), out, progress=False)
    path = out / "checkpoints" / "step-000020" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    state["step"] = 10
    torch.save(state, path)
    with pytest.raises(MtplabError, match="no checkpoint .* reads back"):
        trainer.train(load_config(TINY, SMALL), out, resume=True, progress=False)


def test_medusa_1_on_a_trained_base_keeps_the_base_and_trains_the_heads(tmp_path):
    base = trainer.train(load_config(TINY, SMALL + ["model.n_future=1", "model.head_layers=0"]),
                         tmp_path / "base", progress=False)
    config = load_config(TINY, SMALL + ["model.mtp=medusa", "model.n_future=3", "train.freeze_trunk=true",
                                        f"train.init_from={tmp_path / 'base'}"])
    result = trainer.train(config, tmp_path / "medusa", progress=False)
    before, after = base.model.state_dict(), result.model.state_dict()
    for name, value in before.items():
        assert torch.equal(value, after[name]), name  # the base model is untouched
    assert result.eval_head_losses[0] == pytest.approx(base.eval_head_losses[0])
    assert after["heads.blocks.0.weight"].abs().sum() > 0  # the heads left their zero start
    assert (tmp_path / "medusa" / "tokenizer.json").read_bytes() == (tmp_path / "base" / "tokenizer.json").read_bytes()


def test_init_from_refuses_to_drop_weights(tmp_path, tiny_run):
    out, _ = tiny_run  # parallel heads: their blocks have no place in a Medusa model
    config = load_config(TINY, SMALL + ["model.mtp=medusa", f"train.init_from={out}"])
    with pytest.raises(MtplabError, match="weights it would drop: heads.heads.0.0"):
        trainer.train(config, tmp_path / "m", progress=False)


def test_time_limit_ends_the_run_as_if_finished(tmp_path, capsys):
    from mtplab.cli import main

    out = tmp_path / "timed"
    code = main(["train", "--recipe", str(TINY), "--out", str(out), "--quiet", "--set", "train.steps=1000000",
                 "--set", "train.eval_every=1000000", "--set", "train.time_limit=1.5"] +
                [a for s in SMALL[2:] for a in ("--set", s)])
    assert code == 0
    assert "train.time_limit reached" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert 0 < config["step"] < 1_000_000
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == config["step"] and "eval_loss" in rows[-1]  # evaluated at the end
    with pytest.raises(MtplabError, match="time_limit"):
        load_config(TINY, ["train.time_limit=-1"])


def test_time_limit_counts_training_steps_not_evaluations(tmp_path, monkeypatch):
    real, evals = trainer.evaluate_heads, []

    def slow_evaluation(*args):
        evals.append(1)
        time.sleep(0.4)
        return real(*args)

    monkeypatch.setattr(trainer, "evaluate_heads", slow_evaluation)
    config = load_config(TINY, SMALL[2:] + ["train.steps=1000000", "train.eval_every=2", "train.time_limit=1.0"])
    result = trainer.train(config, tmp_path / "timed", progress=False)
    assert result.time_limited and len(evals) >= 3
    assert result.train_seconds >= 1.0  # the limit is training time: 0.4 s per evaluation on top
    assert result.seconds - result.train_seconds >= 0.4 * len(evals)


def test_a_run_that_fails_before_saving_leaves_no_directory(tmp_path):
    out = tmp_path / "runs" / "failed"
    config = load_config(TINY, SMALL + [f"train.init_from={tmp_path / 'missing'}"])
    with pytest.raises(MtplabError, match="no checkpoint directory"):
        trainer.train(config, out, progress=False)
    assert not out.exists()
    out.mkdir(parents=True)  # a directory that was there before stays (and what is in it)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MtplabError):
        trainer.train(load_config(TINY, SMALL + [f"train.init_from={tmp_path / 'missing'}"]), out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
