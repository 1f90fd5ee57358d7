"""Recipe -> parameters (published vs built) -> tokens/s of one training step on this machine.

Parameters are counted on the meta device (no memory). The timing builds the real model (random
weights) and runs `backward_heads` (forward + backward of every head, no optimizer step) on a
[batch, seq] batch of random ids; the first step is a warm-up, the median of the next `--steps`.

    python benchmarks/recipes.py [--recipes gelu-d12,nrm-miniaxion] [--batch 1] [--seq 128]
                                 [--steps 2] [--threads 0] [--no-time]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from mtplab.config import load_config
from mtplab.models.summary import summarize
from mtplab.models.transformer import Transformer
from mtplab.training.losses import backward_heads, head_weights

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# what each seed's card says (nrm-miniaxion's card gives only its name, "0.9M")
PUBLISHED = {"gelu-d12": "261,096,338", "aomts-100m": "126,401,024 (tied matrix twice)",
             "nrm-miniaxion": "~0.9M (name)",
             "mtp-gpt2": "124M + 1 block"}


def train_step_tokens_per_s(config, batch: int, seq: int, steps: int) -> float:
    torch.manual_seed(0)
    model = Transformer(config).train()
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1))
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        backward_heads(model, ids[:, :-1], ids[:, 1:], head_weights(config))
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return batch * seq / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="gelu-d12,gelu-d12-tiny,nrm-miniaxion,nrm-miniaxion-tiny,"
                                             "aomts-100m,aomts-100m-tiny,mtp-gpt2,mtp-gpt2-tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-time", action="store_true", help="parameter counts only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"| recipe | published | built | train tokens/s (CPU, batch {args.batch} x {args.seq}) |")
    print("|---|---|---|---|")
    for name in args.recipes.split(","):
        config = load_config(RECIPES / f"{name}.toml").model
        if not config.vocab_size:
            config.vocab_size = load_config(RECIPES / f"{name}.toml").tokenizer.vocab_size
        built = summarize(config)["parameters"]
        speed = "-" if args.no_time else \
            f"{train_step_tokens_per_s(config, args.batch, min(args.seq, config.max_seq_len), args.steps):,.0f}"
        print(f"| {name} | {PUBLISHED.get(name, '-')} | {built:,} | {speed} |", flush=True)


if __name__ == "__main__":
    main()
