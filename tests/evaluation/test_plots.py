"""The loss plots (evaluation/plots.py) and the metrics they read: a line a crash cut short is
skipped, a run without metrics yet reads as none, and every plot is a PNG written in one piece."""

import json

from mtplab.evaluation.plots import plot_epoch_losses, plot_losses, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def test_read_metrics_skips_a_cut_line_and_a_missing_file_is_empty(tmp_path):
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "eval_loss": 2.9}]
    assert read_metrics(write_metrics(tmp_path / "m.jsonl", rows, '{"step": 3, "lo')) == rows
    assert read_metrics(tmp_path / "none.jsonl") == []


def test_plots_are_pngs_with_and_without_held_out_points(tmp_path):
    train = [{"step": s, "head_losses": [4.0 - s / 10, 4.2 - s / 10]} for s in range(1, 6)]
    evals = [{"step": 5, "eval_head_losses": [3.6, 3.8]}]
    for name, rows in (("both", train + evals), ("train", train), ("empty", [])):
        metrics = write_metrics(tmp_path / f"{name}.jsonl", rows)
        plot_losses(metrics, tmp_path / f"{name}.png", title=name)
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG, name
    plot_epoch_losses({"train_loss": [5.0, 4.1, 3.7], "eval_loss": [5.1, 4.4, 4.0]}, tmp_path / "epochs.png")
    assert (tmp_path / "epochs.png").read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png") == ["both.png", "empty.png",
                                                                                 "epochs.png", "train.png"]
