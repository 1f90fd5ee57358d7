"""Loss curves: a run's metrics.jsonl (one line per head, train and held-out), and the per-epoch
history of a Monostep run."""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_write


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return rows


def plot_losses(metrics_path: str | Path, png_path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "head_losses" in r]
    evals = [r for r in rows if "eval_head_losses" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    n_heads = len(train[0]["head_losses"]) if train else 0
    for k in range(n_heads):
        color = f"C{k}"
        ax.plot([r["step"] for r in train], [r["head_losses"][k] for r in train], color=color,
                alpha=0.6, label=f"head {k} (t+{k + 1}) train")
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_head_losses"][k] for r in evals], "o--",
                    color=color, label=f"head {k} held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "mtplab training loss")
    ax.grid(alpha=0.3)
    if n_heads:
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(Path(png_path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def plot_epoch_losses(history: dict, png_path: str | Path, title: str = "Monostep block loss") -> None:
    """history: {"train_loss": [...], "eval_loss": [...]}, one value per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = range(1, len(history["train_loss"]) + 1)
    ax.plot(epochs, history["train_loss"], "o-", label="train")
    ax.plot(epochs, history["eval_loss"], "o--", label="eval")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy over the slots (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(Path(png_path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
