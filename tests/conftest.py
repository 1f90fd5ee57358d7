from pathlib import Path

import pytest
import torch

from mtplab.cli import main
from mtplab.config import ModelConfig, load_config
from mtplab.models.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY = ROOT / "recipes" / "tiny.toml"
QUESTION = "Ava has 3 apples. Then Ava buys 2 more apples. How many apples does Ava have now?"


def shared_path(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test when this checkout has none beside it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is not beside this checkout)")
    return path


def run_cli(capsys, *argv):
    """`mtplab *argv` in this process: (exit code, stdout, stderr)."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, pattern):
    """What every bad input must give: exit code 2 and one `mtplab: error:` line naming `pattern`."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtplab: error:") and pattern in lines[0], err
    assert "Traceback" not in err


# Trunk features, one at a time and combined, on a model small enough to build per test case
FEATURE_BASE = dict(vocab_size=61, d_model=32, n_layers=4, n_heads=4, max_seq_len=64)
NANOCHAT = dict(norm_affine=False, embed_norm=True, rope_base=1e5, qk_norm=True, qk_scale=1.2,
                window_pattern="SSSL", window=5, value_embeds=True, ve_gate_channels=12,
                layer_lambdas=True, smear=8, backout=True, logit_softcap=15.0, head_layers=0)
LOOPED = dict(n_layers=5, loop_layers=2, n_think_loops=3, low_rank=4, n_kv_heads=2, mlp="swiglu")
FEATURES = {
    "plain": {},
    "parameterless-norm": dict(norm_affine=False, embed_norm=True),
    "qk-norm": dict(qk_norm=True, qk_scale=1.2, rope_base=1e5),
    "windows": dict(window_pattern="SSSL", window=5),
    "value-embeds": dict(value_embeds=True, ve_gate_channels=12, n_kv_heads=2),
    "lambdas": dict(layer_lambdas=True),
    "smear": dict(smear=8),
    "backout": dict(backout=True),
    "softcap": dict(logit_softcap=3.0),
    "relu2": dict(mlp="relu2"),
    "nanochat": NANOCHAT,
    "looped": LOOPED,
    "looped-low-rank-gqa-windows": {**LOOPED, "window_pattern": "SL", "window": 4},
    "everything": {**NANOCHAT, **LOOPED},
    "nanochat-parallel-heads": {**NANOCHAT, "head_layers": 1, "n_future": 3},
    "looped-sequential-heads": {**LOOPED, "mtp": "sequential", "n_future": 2},
}


def feature_model(seed=0, **overrides) -> Transformer:
    """A random FEATURE_BASE model with `overrides` (usually one of FEATURES), in eval mode."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**FEATURE_BASE, **overrides})).eval()
    with torch.no_grad():  # scalars start at neutral values; move them so every path shows
        for name, p in model.named_parameters():
            if p.dim() < 2:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    return load_config(TINY)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A checkpoint trained once from recipes/tiny.toml (a few seconds), shared by read-only tests."""
    import mtplab

    out = tmp_path_factory.mktemp("tiny") / "run"
    result = mtplab.train(TINY, out, progress=False)
    return out, result


def pytest_report_header(config):
    try:
        import transformers
    except ImportError:
        return "transformers: not installed (the HF tests skip)"
    return f"transformers {transformers.__version__} ({Path(transformers.__file__).parent})"
