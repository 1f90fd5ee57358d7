import pytest
import torch

from mtplab.config import load_config
from mtplab.models.transformer import Transformer
from mtplab.training.optimizers import MatrixOptimizer, make_optimizer, newton_schulz, orthogonal_update
from mtplab.training.schedules import lr_multiplier

# 5 quintic Newton–Schulz steps with (3.4445, -4.7750, 2.0315) leave the singular values in about
# [0.68, 1.2] (by design: speed over exactness) for inputs whose singular values span two decades;
# anything in this band counts as "orthogonalised".
BAND = (0.65, 1.25)


def _matrix(rows: int, cols: int, singular_values: torch.Tensor) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(rows, len(singular_values)))
    v, _ = torch.linalg.qr(torch.randn(cols, len(singular_values)))
    return u @ torch.diag(singular_values) @ v.T


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32)])
def test_muon_update_has_singular_values_near_one(shape):
    g = _matrix(*shape, torch.logspace(-2, 0, min(shape)))  # condition number 100
    s = torch.linalg.svdvals(newton_schulz(g))
    assert BAND[0] < float(s.min()) and float(s.max()) < BAND[1]


def test_aurora_balances_the_rows_of_tall_matrices_and_is_muon_on_square_ones():
    g = torch.randn(96, 32) * torch.linspace(0.01, 3, 96).unsqueeze(1)  # rows of very unequal scale
    muon, aurora = orthogonal_update(g, "muon"), orthogonal_update(g, "aurora")
    spread = lambda x: float(x.norm(dim=1).std() / x.norm(dim=1).mean())
    assert spread(aurora) < 0.5 * spread(muon)  # about 0.08 against 0.47
    square = torch.randn(32, 32)
    assert torch.equal(orthogonal_update(square, "aurora"), orthogonal_update(square, "muon"))
    # tall updates are scaled by sqrt(rows/cols) = sqrt(3)
    tall = orthogonal_update(_matrix(96, 32, torch.logspace(-1, 0, 32)), "muon")
    assert torch.linalg.svdvals(tall).mean() == pytest.approx(3 ** 0.5, rel=0.15)


def test_parameter_groups_and_learning_rates():
    cfg = load_config("recipes/aomts-100m-tiny.toml", ["train.optimizer=aurora", "train.lr=3e-4",
                                                        "train.matrix_lr=0.02"])
    cfg.model.vocab_size = 64
    model = Transformer(cfg.model)
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, MatrixOptimizer)
    kinds = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert kinds[id(model.wte.weight)]["kind"] == "adamw" and kinds[id(model.wte.weight)]["lr"] == 3e-4
    assert kinds[id(model.lm_head.weight)]["kind"] == "adamw"
    assert kinds[id(model.norm_f.weight)]["weight_decay"] == 0.0
    matrix = model.blocks[0].mlp.parameters().__next__()
    assert kinds[id(matrix)]["kind"] == "aurora" and kinds[id(matrix)]["base_lr"] == 0.02
    assert kinds[id(matrix)]["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_matrix_optimizer_lowers_a_loss():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 8) * 0.1)
    b = torch.nn.Parameter(torch.zeros(16))
    opt = MatrixOptimizer([{"params": [w], "kind": "muon", "lr": 0.05},
                           {"params": [b], "kind": "adamw", "lr": 0.05}])
    x = torch.randn(64, 8)
    target = x @ torch.randn(16, 8).T
    losses = []
    for _ in range(30):
        loss = ((x @ w.T + b - target) ** 2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.7 * losses[0]


def test_wsd_boundaries():
    total, warmup = 100, 10
    f = lambda s: lr_multiplier(s, total, warmup, "wsd", decay_fraction=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0  # warmup ends at the peak
    assert f(10) == 1.0 and f(89) == 1.0  # stable until the last 10%
    assert f(90) == pytest.approx(0.9) and f(99) == 0.0  # linear decay to 0 at the last step


def test_cosine_boundaries():
    f = lambda s: lr_multiplier(s, 100, 10, "cosine", min_ratio=0.0)
    assert f(9) == 1.0
    assert f(10) == pytest.approx(1.0, abs=2e-3)
    assert f(99) == pytest.approx(0.0, abs=1e-9)
    assert f(54) == pytest.approx(0.5, abs=0.02)  # halfway through the decay
