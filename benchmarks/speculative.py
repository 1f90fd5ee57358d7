"""Speculative vs plain decoding of one checkpoint (default: the demo's), side by side.

Greedy: both decoders run on the same prompts in the same process, alternating; the table gives
tokens/s of each, the speed-up, tokens per forward (tau) and whether the outputs are identical.
Sampling (`--temperature`, default 0.7 with top-p 0.9): plain, chain and tree decoding of the same
prompts at batch 1 and 16, each prompt with its own seed, in rounds that alternate the three; the
outputs differ draw by draw (that the distribution is head 0's is what the tests prove), so the
table gives tokens/s, the speed-up over plain sampling at the same batch and tau.

    python benchmarks/speculative.py [CHECKPOINT] [--prompts N] [--max-new-tokens N] [--threads N]
                                     [--device cuda] [--dtype bf16] [--temperature 0.7] [--top-p 0.9]
                                     [--tree default] [--rounds 3]
"""

from __future__ import annotations

import argparse

import torch

import mtplab
from mtplab.data.synthetic import make_problems
from mtplab.evaluation.speed import bench_decoding, compare_decoders, format_bench, format_decoders
from mtplab.inference.calibrate import tree_option
from mtplab.inference.sampling import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default="runs/demo")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights and KV cache")
    parser.add_argument("--temperature", type=float, default=0.7, help="the sampling table's (0: skip it)")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--tree", default="auto", help="the sampling table's tree ('auto': the calibrated one)")
    parser.add_argument("--rounds", type=int, default=3, help="sampling: alternating rounds per mode")
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
    if args.temperature > 0:
        tree = tree_option(args.tree, model, args.checkpoint)
        rows = compare_decoders(model, prompts, args.max_new_tokens, tokenizer.eos_id,
                                SamplingParams(args.temperature, top_p=args.top_p), tree, rounds=args.rounds)
        print(f"\nsampling at temperature {args.temperature}, top-p {args.top_p} ({args.rounds} rounds; "
              f"tree: {tree.size} nodes; same: share of outputs equal to batch-1 plain's, by chance)")
        print(format_decoders(rows))

if __name__ == "__main__":
    main()
