from pathlib import Path

import pytest
import torch

from mtplab.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY = ROOT / "recipes" / "tiny.toml"


def shared_path(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test when this checkout has none beside it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is not beside this checkout)")
    return path


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
