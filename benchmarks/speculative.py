"""Speculative vs plain greedy decoding of one checkpoint (default: the demo's), side by side.

Both decoders run on the same prompts in the same process, alternating; the table gives tokens/s of
each, the speed-up, tokens per forward (tau) and whether the outputs are identical.

    python benchmarks/speculative.py [CHECKPOINT] [--prompts N] [--max-new-tokens N] [--threads N]
                                     [--device cuda] [--dtype bf16]
"""

from __future__ import annotations

import argparse

import torch

import mtplab
from mtplab.data.synthetic import make_problems
from mtplab.evaluation.speed import bench_decoding, format_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default="runs/demo")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights and KV cache")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = mtplab.load(args.checkpoint, args.device)
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    prompts = [tokenizer.encode_chat(p["question"])
               for p in make_problems(args.prompts, seed=424_242, max_number=20)]
    print(f"{args.checkpoint}: {model.num_parameters() / 1e6:.2f}M parameters, {model.n_future} heads, "
          f"{args.device} {args.dtype}, {torch.get_num_threads()} threads, batch 1, greedy\n")
    for n_draft in range(1, model.n_future):
        result = bench_decoding(model, prompts, args.max_new_tokens, tokenizer.eos_id, n_draft)
        print(f"-- {n_draft} draft token(s) per step --")
        print(format_bench(result).splitlines()[-2])
        print(format_bench(result).splitlines()[-1] + "\n")
    print(format_bench(result))


if __name__ == "__main__":
    main()
