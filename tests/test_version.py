"""One version number: version.py's, which the package, the CLI and pyproject.toml all carry."""

import re

import mtplab
from mtplab import version
from mtplab.config import tomllib
from tests.conftest import ROOT


def test_the_package_and_pyproject_carry_version_py_s_number():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version.__version__ == mtplab.__version__ == project
    assert re.fullmatch(r"\d+\.\d+\.\d+", project)  # a plain release number: what the wheel is named by
