import json
import math

from mtplab.ablation import ROW_NAMES, run_ablation
from mtplab.cli import main

from tests.conftest import ROOT, TINY as TINY_RECIPE, shared_path

RECIPE = str(ROOT / "recipes" / "aomts-100m-tiny.toml")

TINY = ["--set", "data.n_train=300", "--set", "data.n_eval=40", "--set", "train.eval_batches=1",
        "--set", "train.batch_size=4", "--set", "tokenizer.vocab_size=300", "--quiet"]


def uniform_loss(run_dir):
    """ln(real vocabulary): the held-out loss of a model that has learned nothing."""
    return math.log(json.loads((run_dir / "config.json").read_text())["model"]["vocab_real"])


def test_ablate_writes_the_table_json_and_plot_with_nine_rows(tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(["ablate", RECIPE, "--out", str(out), "--steps", "5", *TINY]) == 0
    report = json.loads((out / "ablation.json").read_text())
    assert sorted(r["row"] for r in report["rows"]) == sorted(ROW_NAMES) and len(ROW_NAMES) == 9
    losses = [r["val_loss"] for r in report["rows"]]
    # a fresh model (init_std 0.02) starts at the uniform loss over the real vocabulary: every row
    # has learned something in 5 steps; the report lists the rows best first
    assert max(losses) < uniform_loss(out / "base-0mtp") and losses == sorted(losses)
    assert {r["row"]: r["tst_bag"] for r in report["rows"]}["tst-2mtp"] == 6
    table = (out / "ablation.md").read_text()
    assert table.count("\n| ") == 10 + 4 and "2.2047" in table  # header + nine rows (seed numbers beside),
    # then the TST - base gaps: header + three pairs
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "val CE (nats)" in capsys.readouterr().out
    loss = {r["row"]: r["val_loss"] for r in report["rows"]}
    assert report["noise"] == round(abs(loss["base-0mtp"] - loss["base-0mtp-seed2"]), 4)
    for o in report["orderings"]:
        assert o["within_noise"] == (abs(o["margin"]) <= report["noise"])
        assert o["reproduced"] == (loss[o["lower"]] < loss[o["higher"]])
    gaps = report["tst_gaps"]
    assert gaps["steps"][-1] == 5 and [g["tst"] for g in gaps["pairs"]] == ["tst-0mtp", "tst-1mtp", "tst-2mtp"]
    curve = {r["row"]: dict(r["curve"]) for r in report["rows"]}
    assert gaps["pairs"][1]["gaps"][-1] == round(curve["tst-1mtp"][5] - curve["base-1mtp"][5], 4)
    assert "TST minus the same run without it" in table and "Run-to-run noise" in table
    for name in ROW_NAMES:  # every row is an ordinary run directory
        assert (out / name / "model.safetensors").exists()

    # a second invocation skips the finished rows and reports the same numbers
    again = run_ablation(RECIPE, out, steps=5, rows="base-0mtp,tst-1mtp",
                         overrides=[s for s in TINY[:-1] if s != "--set"], progress=False)
    assert [r["status"] for r in again["rows"]] == ["skipped (finished)"] * 2
    before = {r["row"]: r["val_loss"] for r in report["rows"]}
    assert all(r["val_loss"] == before[r["row"]] for r in again["rows"])


def test_ablate_resumes_an_unfinished_row(tmp_path):
    overrides = [s for s in TINY[:-1] if s != "--set"]
    out = tmp_path / "abl"
    run_ablation(RECIPE, out, steps=2, rows="tst-0mtp", overrides=overrides,
                 progress=False)
    report = run_ablation(RECIPE, out, steps=4, rows="tst-0mtp",
                          overrides=overrides, progress=False)
    assert report["rows"][0]["status"] == "resumed" and report["rows"][0]["curve"][-1][0] == 4


def test_ablate_on_a_text_file_the_test_writes(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"The {w} sat on the mat number {i}. It was a {w} day.\n"
                              for i in range(400) for w in ("cat", "dog", "sunny")))
    report = run_ablation(RECIPE, tmp_path / "abl", steps=3,
                          rows="base-0mtp,tst-1mtp", data=str(corpus),
                          overrides=[s for s in TINY[:-1] if s != "--set"], progress=False)
    assert len(report["rows"]) == 2 and report["data"] == str(corpus)
    assert report["orderings"][0]["lower"] == "tst-1mtp"


def test_ablate_on_wikitext2(tmp_path):
    path = shared_path("wikitext-2-raw", "wiki.test.raw")
    report = run_ablation(RECIPE, tmp_path / "abl", steps=2, rows="tst-1mtp",
                          data=str(path), overrides=[s for s in TINY[:-1] if s != "--set"],
                          progress=False)
    assert report["rows"][0]["val_loss"] < uniform_loss(tmp_path / "abl" / "tst-1mtp")


def test_ablate_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["ablate", RECIPE, "--out", str(tmp_path / "a"),
                 "--rows", "nope", "--quiet"]) == 2
    assert "unknown ablation row nope" in capsys.readouterr().err
    assert main(["ablate", str(TINY_RECIPE), "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "data.format" in capsys.readouterr().err


def test_ablate_that_fails_leaves_no_directory_it_made(tmp_path, capsys):
    out = tmp_path / "runs" / "ablation"
    assert main(["ablate", RECIPE, "--out", str(out), "--data", str(tmp_path / "missing.txt"), "--quiet"]) == 2
    assert "text file not found" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()  # a directory that was there before is left alone
    assert main(["ablate", RECIPE, "--out", str(out), "--data", str(tmp_path / "missing.txt"), "--quiet"]) == 2
    assert out.is_dir()


def _screen(stream: str) -> list[str]:
    """What a terminal shows after `stream`: carriage returns, newlines and cursor-up (ESC[A)
    move the cursor, other characters overwrite; other escape sequences are dropped."""
    import re

    lines, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[A|\x1b\[[0-9;]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", stream):
        if token == "\x1b[A":
            row = max(0, row - 1)
        elif token.startswith("\x1b"):
            continue
        elif token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token):]
            col += len(token)
    return [line.rstrip() for line in lines if line.strip()]


def test_ablate_rows_steps_and_set_apply_to_every_selected_row_and_the_bars_stay_tidy(tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["ablate", RECIPE, "--out", str(out), "--rows", "tst-1mtp,base-0mtp", "--steps", "4",
            "--set", "train.lr=0.002", *TINY[:-1]]  # with the progress bars
    assert main(args) == 0
    report = json.loads((out / "ablation.json").read_text())
    assert sorted(r["row"] for r in report["rows"]) == ["base-0mtp", "tst-1mtp"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["base-0mtp", "tst-1mtp"]
    for name, bag in (("tst-1mtp", 6), ("base-0mtp", 0)):
        config = json.loads((out / name / "config.json").read_text())["run"]
        assert config["train"]["steps"] == 4 and config["train"]["lr"] == 0.002  # --steps, --set
        assert config["train"]["batch_size"] == 4 and config["train"]["tst_bag"] == bag
    screen = _screen(capsys.readouterr().err)
    # what stays on the terminal: one line per finished row, then the bar over the rows; the
    # rows' step bars clear themselves
    assert len(screen) == 3, screen
    assert screen[0].startswith("tst-1mtp: val CE ") and screen[1].startswith("base-0mtp: val CE ")
    assert screen[2].startswith("ablation: 100%") and "2/2" in screen[2]
    # a re-run skips both rows and says so
    assert main(args) == 0
    screen = _screen(capsys.readouterr().err)
    assert [line.split(", ")[-1] for line in screen[:2]] == ["skipped (finished)"] * 2


def test_ablate_unknown_row_or_a_set_of_what_the_rows_set_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(["ablate", RECIPE, "--out", str(out), "--rows", "tst-1mtp,tst-3mtp", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown ablation row tst-3mtp; rows: tst-1mtp, tst-0mtp" in err
    assert main(["ablate", RECIPE, "--out", str(out), "--set", "model.n_future=3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "every ablation row sets model.n_future itself" in err
    assert not out.exists()


def test_ablate_on_a_corpus_too_small_for_the_tst_phase_says_how_many_tokens_it_needs(tmp_path, capsys):
    corpus = tmp_path / "small.txt"
    corpus.write_text("".join(f"The cat number {i} sat on the mat.\n" for i in range(60)))
    out = tmp_path / "abl"
    argv = ["ablate", RECIPE, "--out", str(out), "--data", str(corpus), "--steps", "4", *TINY]
    assert main(argv + ["--rows", "tst-1mtp"]) == 2
    err = capsys.readouterr().err
    # tst-1mtp: 2 heads, bag 6, seq_len 128: windows of 6 x 129 + 1 = 775 tokens, 4 to a batch
    assert err.count("\n") == 1 and "too few for the TST phase: it needs at least 3,097" in err
    assert "training split has " in err and not out.exists()
    assert main(argv + ["--rows", "base-0mtp", "--set", "data.seq_len=32"]) == 0  # no TST: trains
