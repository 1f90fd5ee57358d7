"""The demo's figures over several training seeds: what `make demo` prints, as a range.

Runs `mtplab demo` (the same problems, tokenizer and held-out set) with `train.seed` = 0, 1, 2 …
and prints each run's figures and their spread, with the machine and date, as the README's demo
table quotes them. About four minutes per seed on a 2-core CPU.

    python benchmarks/demo_seeds.py [--seeds 3] [--out runs/demo-seeds]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from mtplab.demo import run_demo

def by_steps(summary: dict) -> dict:
    return {str(k): v for k, v in summary["held_out_accuracy_by_steps"].items()}


FIGURES = [  # (label, how to read it from demo.json, format)
    ("training steps (s)", lambda s: s["train_step_seconds"], "{:.0f}"),
    ("held-out loss head 0", lambda s: s["final_eval_loss_per_head"][0], "{:.3f}"),
    ("held-out loss head 3", lambda s: s["final_eval_loss_per_head"][-1], "{:.3f}"),
    ("exact match", lambda s: s["held_out_accuracy"], "{:.1%}"),
    ("1-step problems", lambda s: by_steps(s)["1"], "{:.1%}"),
    ("2-step problems", lambda s: by_steps(s)["2"], "{:.1%}"),
    ("3-step problems", lambda s: by_steps(s)["3"], "{:.1%}"),
    ("tokens per decoding forward", lambda s: s["tokens_per_forward"], "{:.2f}"),
    ("speculative / plain tokens/s", lambda s: s["speedup"], "{:.2f}x"),
    ("tree of 9 drafts: tokens per decoding forward", lambda s: s["tree_tokens_per_forward"], "{:.2f}"),
    ("tree of 9 drafts / plain tokens/s", lambda s: s["tree_speedup"], "{:.2f}x"),
    ("identical to plain greedy", lambda s: s["identical"], "{}"),
]


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"{time.strftime('%Y-%m-%d')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="runs/demo-seeds")
    args = parser.parse_args()
    runs = []
    for seed in range(args.seeds):
        print(f"== seed {seed} ==", flush=True)
        runs.append(run_demo(Path(args.out) / f"seed-{seed}", [f"train.seed={seed}"], progress=False,
                             say=lambda *_: None))
        print(json.dumps(runs[-1]), flush=True)
    print(f"\nmtplab demo over train.seed 0..{args.seeds - 1} ({machine()})\n")
    print(f"| figure | {' | '.join(f'seed {s}' for s in range(args.seeds))} | range |")
    print(f"|---|{'---|' * args.seeds}---|")
    for label, read, fmt in FIGURES:
        values = [read(r) for r in runs]
        spread = (fmt.format(min(values)) + " – " + fmt.format(max(values))
                  if not isinstance(values[0], bool) else str(all(values)).lower())
        print(f"| {label} | {' | '.join(fmt.format(v) for v in values)} | {spread} |")


if __name__ == "__main__":
    main()
