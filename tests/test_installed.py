"""mtplab as a user installs it: the wheel `pip install .` builds from this checkout (not editable),
installed into a folder of its own and run as its console script from a directory outside the
repository, so that only what the package ships can answer (recipes by name, the version)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from mtplab import __version__
from mtplab.config import tomllib
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """run(*argv) -> CompletedProcess: the installed console script in a fresh working directory."""
    if importlib.util.find_spec("setuptools") is None:  # an offline build needs the backend here
        pytest.skip("setuptools is not installed in this environment: no offline wheel build")
    base = tmp_path_factory.mktemp("installed")
    source = base / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "mtplab", source / "mtplab", ignore=shutil.ignore_patterns("__pycache__"))
    def pip(*argv):
        done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *argv],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(base / "wheel"), str(source))
    (wheel,) = (base / "wheel").glob("mtplab-*.whl")
    pip("install", "--no-deps", "--no-index", "--target", str(base / "site"), str(wheel))
    script = base / "site" / "bin" / "mtplab"
    cwd = base / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(base / "site"), "OMP_NUM_THREADS": "1"}

    def run(*argv):
        return subprocess.run([str(script), *argv], cwd=cwd, env=env, capture_output=True, text=True)
    run.site, run.cwd = base / "site", cwd
    return run


def test_the_installed_package_finds_its_recipes_by_name_from_anywhere(installed):
    listed = installed("recipes", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert {"tiny", "gelu-d12", "nrm-miniaxion"} <= set(rows)
    for row in rows.values():  # the installed copies, not the repository's files
        assert row["path"].startswith(str(installed.site / "mtplab" / "recipes")), row["path"]
    info = installed("info", "gelu-d12", "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["parameters"] == 261_096_338
    version = installed("--version")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version.returncode == 0 and version.stdout == f"mtplab {project}\n" and project == __version__
    wrong = installed("train", "--recipe", "tinyy", "--out", "runs/t")
    assert wrong.returncode == 2 and len(wrong.stderr.splitlines()) == 1
    assert "recipe not found: tinyy" in wrong.stderr and "gelu-d12, " in wrong.stderr
    assert (installed.site / "mtplab" / "serve" / "static" / "index.html").is_file()  # the chat page


def test_the_installed_package_trains_a_recipe_by_name(installed):
    trained = installed("train", "--recipe", "tiny", "--out", "runs/t", "--quiet", "--set", "train.steps=4",
                        "--set", "train.eval_every=4", "--set", "data.n_train=200", "--set", "data.n_eval=8")
    assert trained.returncode == 0, trained.stderr
    assert "trained to step 4" in trained.stdout
    config = json.loads((installed.cwd / "runs" / "t" / "config.json").read_text())
    assert config["mtplab_version"] == __version__ and config["model"]["d_model"] == 64  # tiny's
