"""Do the extra heads help the next-token head? Gloeckle et al.'s question, on the demo's recipe.

Trains the demo recipe twice per seed, with its 4 parallel heads and with 1 head (`model.n_future`
4 vs 1), at equal steps on the same problems, tokenizer and held-out set, and prints head 0's
held-out next-token loss side by side with the paired difference per seed. About three minutes per
run on a 2-core CPU.

    python benchmarks/heads_vs_one.py [--seeds 3] [--out runs/heads-vs-one] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

from mtplab.config import load_config
from mtplab.demo import RECIPES
from mtplab.training.trainer import train

HEADS = (4, 1)


def held_out_next_token_loss(out: Path, n_future: int, seed: int, overrides: list[str]) -> float:
    weights = [] if n_future == 4 else [f"model.loss_weights=[{', '.join(['1.0'] * n_future)}]"]  # one per head
    config = load_config(RECIPES / "demo.toml",
                         [*overrides, f"model.n_future={n_future}", *weights, f"train.seed={seed}"])
    result = train(config, out, progress=False)
    return result.eval_head_losses[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="runs/heads-vs-one")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override applied to every run")
    args = parser.parse_args()
    losses = {n: [] for n in HEADS}
    for seed in range(args.seeds):
        for n in HEADS:
            start = time.perf_counter()
            losses[n].append(held_out_next_token_loss(Path(args.out) / f"heads-{n}-seed-{seed}", n, seed,
                                                      args.set))
            print(f"seed {seed}, {n} head(s): head-0 held-out loss {losses[n][-1]:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    steps = load_config(RECIPES / "demo.toml", args.set).train.steps
    print(f"\nhead 0's held-out next-token loss (nats/token), demo recipe, {steps} steps "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')})\n")
    print("| seed | 4 heads | 1 head | 4 − 1 |")
    print("|---|---|---|---|")
    gaps = [four - one for four, one in zip(losses[4], losses[1])]
    for seed, (four, one, gap) in enumerate(zip(losses[4], losses[1], gaps)):
        print(f"| {seed} | {four:.4f} | {one:.4f} | {gap:+.4f} |")
    print(f"| mean | {statistics.mean(losses[4]):.4f} | {statistics.mean(losses[1]):.4f} | "
          f"{statistics.mean(gaps):+.4f} |")


if __name__ == "__main__":
    main()
