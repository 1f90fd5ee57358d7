"""The README's tour as `make tour` (benchmarks/tour.py) reads it: every command parses whole, and a
command the tour cannot run (a placeholder path, another machine) carries its `needs:` reason."""

import importlib.util
import sys

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("tour", ROOT / "benchmarks" / "tour.py")
tour = importlib.util.module_from_spec(spec)
sys.modules.setdefault("tour", tour)  # its dataclasses look their module up
spec.loader.exec_module(tour)


def test_the_tour_splits_into_whole_commands():
    block = ("mtplab a --x 1 \\\n    --y 2   # two lines\n# a comment line\n"
             "curl -d '{\n  \"k\": 1}'\ncat > f <<'YAML'\nkey: \"it's\"\nYAML\n"
             "mtplab b   # needs: a GPU, ~2 h\n")
    assert tour.split_commands(block) == ["mtplab a --x 1 \\\n    --y 2   # two lines",
                                          "curl -d '{\n  \"k\": 1}'", "cat > f <<'YAML'\nkey: \"it's\"\nYAML",
                                          "mtplab b   # needs: a GPU, ~2 h"]
    assert tour.reason("mtplab b   # needs: a GPU, ~2 h") == "a GPU, ~2 h"
    assert tour.reason("mtplab c   # ~15 s") == ""


def test_the_readme_tour_marks_what_it_cannot_run():
    commands = tour.parse((ROOT / "README.md").read_text())
    assert len(commands) > 50 and commands[0].text.startswith("pip install .")
    for c in commands:
        if any(p in c.text for p in ("path/to/", "~/.cache", ".example:")):
            assert c.skip, f"command {c.number} uses a placeholder and has no `needs:` comment: {c.first_line}"
    assert {"serve", "python", "transcript"} <= {c.kind for c in commands}
