"""Training throughput at 1, 2, ... torchrun processes on the same recipe and global batch.

Each process count trains the recipe for a few steps (one after the other, so they never share
the CPU); the table gives tokens/s over the steps after the first log window, the speed-up over one
process, and whether the losses agree. On a CPU, one process uses every core and N processes one
core count / N each, so the comparison is at equal hardware.

    python benchmarks/distributed.py [--recipe recipes/demo.toml] [--steps 30] [--nproc 1,2]
                                     [--parallel ddp|fsdp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, args, out: Path) -> tuple[float, list[dict]]:
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc)), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "mtplab", "train", "--recipe", args.recipe, "--out", str(out), "--quiet",
           "--set", f"train.steps={args.steps}", "--set", "train.log_every=5",
           "--set", f"train.eval_every={args.steps}", "--set", f"train.parallel={args.parallel}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-2000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return time.perf_counter() - start, [r for r in rows if "tokens_per_s" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.toml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nproc", default="1,2")
    parser.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"])
    args = parser.parse_args()
    print(f"{args.recipe}, {args.steps} steps, same global batch, {args.parallel}, {os.cpu_count()} cores\n")
    print(f"{'processes':>9} {'threads each':>12} {'tokens/s':>10} {'speed-up':>8} {'wall s':>7} "
          f"{'final loss':>10}")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.nproc.split(",")]:
            wall, rows = run(n, args, Path(tmp) / f"n{n}")
            rate = sum(r["tokens_per_s"] for r in rows[1:]) / max(len(rows) - 1, 1)
            base = base or rate
            threads = max(1, (os.cpu_count() or 1) // n)
            print(f"{n:>9} {threads:>12} {rate:>10,.0f} {rate / base:>7.2f}x {wall:>7.1f} "
                  f"{rows[-1]['loss']:>10.5f}")


if __name__ == "__main__":
    main()
