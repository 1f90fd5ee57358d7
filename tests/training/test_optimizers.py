import pytest
import torch

from mtplab.config import load_config
from mtplab.models.transformer import Transformer
from mtplab.training import optimizers as opt
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


def _ill_conditioned(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Singular values over two decades, and the rows of the tall form (the columns of a wide
    matrix) scaled over a decade: the shape of a gradient whose output neurons differ in scale."""
    torch.manual_seed(seed)
    g = _matrix(rows, cols, torch.logspace(-2, 0, min(rows, cols)))
    scale = torch.logspace(-0.5, 0.5, max(rows, cols))[torch.randperm(max(rows, cols))]
    return g * (scale.unsqueeze(1) if rows >= cols else scale.unsqueeze(0))


def _spread(x: torch.Tensor, dim: int) -> float:
    norms = x.norm(dim=dim)
    return float(norms.std() / norms.mean())


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (64, 64)])
def test_accurate_polar_matches_the_svd_on_ill_conditioned_inputs(shape):
    g = _ill_conditioned(*shape)
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    assert (opt.polar(g).double() - u @ vh).abs().max() < 1e-3


@pytest.mark.parametrize("shape", [(352, 128), (128, 352)])
def test_aurora_is_the_polar_factor_of_the_row_scaled_update(shape):
    """Tall: polar(D G) for Aurora's final diagonal D; wide: the same through the transpose."""
    g = _ill_conditioned(*shape, seed=1)
    u, d = opt.aurora_polar(g, return_scaling=True)
    tall = g if shape[0] > shape[1] else g.T
    left, _, right = torch.linalg.svd((d * tall).double(), full_matrices=False)
    expected = left @ right
    assert (u.double() - (expected if shape[0] > shape[1] else expected.T)).abs().max() < 1e-3


@pytest.mark.parametrize("shape", [(352, 128), (128, 352)])
def test_aurora_update_is_orthogonal_and_balanced_where_the_old_one_was_not(shape):
    """The old rule (Muon's 5-step factor, then rescaling rows and re-orthogonalising) was not
    orthogonal (|U^T U - I| up to 0.35 here) and left wide matrices as Muon's (CV 0.38)."""
    rows, cols = shape
    scale = max(1.0, rows / cols) ** 0.5
    u = opt.orthogonal_update(_ill_conditioned(rows, cols, seed=2), "aurora") / scale
    tall = u if rows > cols else u.T  # orthonormal columns, balanced rows
    assert (tall.T @ tall - torch.eye(min(shape))).abs().max() < 1e-2
    # two re-estimates of D leave some spread on inputs this ill-conditioned (measured 0.027-0.029)
    assert _spread(tall, dim=1) < 0.04
    torch.manual_seed(3)  # rows of very unequal scale: Muon's rows spread (CV 0.39), Aurora's do not
    g = torch.randn(max(shape), min(shape)) * torch.linspace(0.1, 3, max(shape)).unsqueeze(1)
    g = g if rows > cols else g.T
    aurora, muon = opt.orthogonal_update(g, "aurora") / scale, opt.orthogonal_update(g, "muon") / scale
    dim = 1 if rows > cols else 0
    assert _spread(aurora, dim) < 0.03 and _spread(muon, dim) > 0.3  # measured 0.011 and 0.39


def test_aurora_square_is_the_plain_polar_factor_and_tall_updates_are_scaled():
    square = _ill_conditioned(48, 48)
    assert torch.equal(opt.orthogonal_update(square, "aurora"), opt.polar(square))
    tall = opt.orthogonal_update(_ill_conditioned(96, 32), "aurora")  # sqrt(rows/cols) = sqrt(3)
    assert torch.linalg.svdvals(tall) == pytest.approx(torch.full((32,), 3 ** 0.5), abs=1e-3)
    wide = opt.orthogonal_update(_ill_conditioned(32, 96), "aurora")  # no scale below 1
    assert torch.linalg.svdvals(wide) == pytest.approx(torch.ones(32), abs=1e-3)
    # tall Muon updates are scaled the same way
    muon = orthogonal_update(_matrix(96, 32, torch.logspace(-1, 0, 32)), "muon")
    assert torch.linalg.svdvals(muon).mean() == pytest.approx(3 ** 0.5, rel=0.15)


def test_aurora_step_is_nesterov_momentum_then_decay_then_the_update():
    torch.manual_seed(4)
    w0 = torch.randn(24, 8)
    grads = [torch.randn(24, 8) for _ in range(3)]
    w = torch.nn.Parameter(w0.clone())
    optimizer = MatrixOptimizer([{"params": [w], "kind": "aurora", "lr": 0.1, "weight_decay": 0.5}])
    expected, buf = w0.clone(), torch.zeros(24, 8)
    for g in grads:
        w.grad = g.clone()
        optimizer.step()
        buf = 0.95 * buf + g
        expected = expected * (1 - 0.1 * 0.5) - 0.1 * 3 ** 0.5 * opt.aurora_polar(g + 0.95 * buf)
    assert torch.allclose(w.detach(), expected, atol=1e-5)


def test_parameter_groups_and_learning_rates():
    cfg = load_config("recipes/aomts-100m-tiny.toml", ["train.optimizer=aurora", "train.lr=3e-4",
                                                        "train.matrix_lr=0.02"])
    cfg.model.vocab_size = 64
    model = Transformer(cfg.model)
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, MatrixOptimizer)
    kinds = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert kinds[id(model.wte.weight)]["kind"] == "adamw" and kinds[id(model.wte.weight)]["lr"] == 3e-4
    assert kinds[id(model.unembedding)]["kind"] == "adamw"  # tied: the embedding itself
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
