import shutil

import pytest
import torch
import torch.nn.functional as F

import mtplab
from mtplab.config import load_config
from mtplab.errors import MtplabError
from mtplab.models.checkpoint import load_latest, step_dirs
from mtplab.models.transformer import Transformer
from mtplab.training import tst

TINY_AOMTS = "recipes/aomts-100m-tiny.toml"


def test_bags_and_targets_on_a_hand_computed_example():
    # s = 3, T = 2 positions, 2 heads: a row needs (T+1)*s + 1 = 10 raw tokens
    assert tst.window_length(2, 3, 2) == 10
    raw = torch.arange(10).unsqueeze(0)
    assert tst.bags(raw, 3, 2).tolist() == [[[0, 1, 2], [3, 4, 5]]]
    main, shifted = tst.tst_targets(raw, 3, 2, 2)
    assert main.tolist() == [[[3, 4, 5], [6, 7, 8]]]  # position i -> raw [(i+1)s, (i+2)s)
    assert shifted.tolist() == [[[4, 5, 6], [7, 8, 9]]]  # MTP head 1: one raw token further


def test_bag_embedding_is_the_mean_and_compresses_the_length():
    config = load_config(TINY_AOMTS).model
    config.vocab_size = 64
    model = Transformer(config)
    raw = torch.randint(0, 64, (2, 18))
    ids = tst.bags(raw, 6, 3)
    emb = tst.bag_embeddings(model, ids)
    assert emb.shape == (2, 3, config.d_model)
    assert torch.allclose(emb[1, 2], model.wte.weight[raw[1, 12:18]].mean(0))


def test_multi_hot_loss_is_the_mean_of_the_s_cross_entropies():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5, 4))
    expected = sum(F.cross_entropy(logits.reshape(-1, 11), targets[..., j].reshape(-1), reduction="sum")
                   for j in range(4)) / 4
    assert torch.allclose(tst.multi_hot_loss(logits, targets), expected, atol=1e-5)


@pytest.mark.parametrize("mtp", ["sequential", "parallel"])
def test_backward_tst_gives_every_head_a_gradient(mtp):
    config = load_config(TINY_AOMTS).model
    config.vocab_size, config.mtp, config.n_future = 64, mtp, 3
    model = Transformer(config)
    raw = torch.randint(0, 64, (2, tst.window_length(8, 4, 3)))
    losses = tst.backward_tst(model, raw, 4, [1.0, 0.1, 0.1])
    assert len(losses) == 3 and all(2.0 < l < 6.0 for l in losses)  # near log(64) at init
    # the averaged bag embeddings backpropagate into the table, and every head's every tensor learns
    assert model.wte.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads.parameters())


def _config(tmp_path, *overrides):
    return load_config(TINY_AOMTS, ["train.steps=6", "train.eval_every=3", "train.eval_batches=1",
                                    "train.log_every=1", "train.tst_bag=4", "train.tst_fraction=0.5",
                                    "train.warmup_steps=2", "data.n_train=300", *overrides])


def _first_phase2_state(tmp_path, name, *overrides):
    """Optimizer state saved at the end of phase 1 (step 3) and after the first phase-2 step."""
    cfg = _config(tmp_path, "train.steps=4", "train.eval_every=1", "train.keep_checkpoints=0",
                  "train.tst_fraction=0.75", *overrides)
    mtplab.train(cfg, tmp_path / name, progress=False)
    dirs = dict(step_dirs(tmp_path / name))
    load = lambda step: torch.load(dirs[step] / "trainer_state.pt", weights_only=True)["optimizer"]
    return load(3), load(4)


@pytest.mark.parametrize("optimizer", ["adamw", "aurora"])
def test_phase_switch_keeps_optimizer_state_unless_reset(tmp_path, optimizer):
    key = "exp_avg" if optimizer == "adamw" else "momentum_buffer"
    before, kept = _first_phase2_state(tmp_path, "kept", f"train.optimizer={optimizer}")
    _, reset = _first_phase2_state(tmp_path, "reset", f"train.optimizer={optimizer}",
                                   "train.tst_reset_optimizer=true")
    for states in (before, kept, reset):
        assert states["state"]  # every run has optimizer state after its last step
    p0 = 0  # a matrix param under both optimizers (the first group holds matrices)
    if optimizer == "adamw":
        assert float(kept["state"][p0]["step"]) == 4 and float(reset["state"][p0]["step"]) == 1
    # kept momentum continues phase 1's (0.9 or 0.95 of it survives one step); reset forgets it
    m_before, m_kept, m_reset = (s["state"][p0][key] for s in (before, kept, reset))
    gap_kept = (m_kept - m_before).norm() / m_before.norm()
    gap_reset = (m_reset - m_before).norm() / m_before.norm()
    assert gap_kept < gap_reset


def test_tst_resume_is_bit_exact(tmp_path):
    """Stopped at the end of phase 1 and resumed: the same weights as one uninterrupted run."""
    cfg = _config(tmp_path, "train.optimizer=muon")
    whole = mtplab.train(cfg, tmp_path / "whole", progress=False)
    mtplab.train(cfg, tmp_path / "cut", progress=False)
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-000006")  # as if killed after step 3
    resumed = mtplab.train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert resumed.step == 6 and load_latest(tmp_path / "cut")[0] == 6
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tst_needs_packed_text(tmp_path):
    cfg = load_config("recipes/tiny.toml", ["train.tst_bag=4", "train.steps=2"])
    with pytest.raises(MtplabError, match="data.format"):
        mtplab.train(cfg, tmp_path / "x", progress=False)


def test_bad_tst_and_optimizer_settings_are_errors():
    with pytest.raises(MtplabError, match="tst_bag"):
        load_config(TINY_AOMTS, ["train.tst_bag=1"])
    with pytest.raises(MtplabError, match="optimizer"):
        load_config(TINY_AOMTS, ["train.optimizer=sgd"])
    with pytest.raises(MtplabError, match="tst_fraction"):
        load_config(TINY_AOMTS, ["train.tst_fraction=1.5"])
