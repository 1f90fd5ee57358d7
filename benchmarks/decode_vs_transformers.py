"""mtplab plain KV-cache decoding vs HF transformers `GPT2LMHeadModel.generate()`.

Identical random GPT-2 weights are copied into an mtplab model (learned positions, LayerNorm,
GELU-tanh, biases, tied embeddings; GPT-2's last block becomes the 1-block head 0). Batch 1, fp32,
greedy, 256 new tokens, both measured in this run, alternating, best of `--repeats`.
Also reports tokens/s as a fraction of the memory-bandwidth bound (bandwidth / weight bytes), with
the bandwidth measured here by a large tensor copy.

    python benchmarks/decode_vs_transformers.py [--repeats 3] [--new-tokens 256]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mtplab.inference.generate import generate_ids
from mtplab.interop.gpt2 import mtplab_from_gpt2  # what `mtplab convert gpt2 --heads 1` does

SIZES = {"gpt2-small-4x256": dict(n_layer=4, n_embd=256, n_head=4),
         "gpt2-124M": dict(n_layer=12, n_embd=768, n_head=12)}


def measure_bandwidth() -> float:
    """Bytes/s of a 256 MiB copy (read + write), best of 5."""
    src = torch.empty(64 * 2**20, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--sizes", default=",".join(SIZES))
    args = parser.parse_args()
    torch.manual_seed(0)
    bandwidth = measure_bandwidth()
    print(f"threads: {torch.get_num_threads()}, measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s\n")
    print(f"{'model':<18} {'params':>8} {'HF tok/s':>9} {'mtplab tok/s':>12} {'ratio':>6} "
          f"{'bound tok/s':>11} {'mtplab/bound':>12} {'same':>5}")
    for name in args.sizes.split(","):
        config = GPT2Config(**SIZES[name], vocab_size=50257, n_positions=1024, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)
        hf = GPT2LMHeadModel(config).eval()
        ours = mtplab_from_gpt2(hf)
        prompt = torch.randint(0, 50257, (1, 16))
        n = args.new_tokens

        def run_hf(hf=hf, prompt=prompt, n=n):
            with torch.no_grad():
                return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   use_cache=True, pad_token_id=0)[0, 16:].tolist()

        def run_ours(ours=ours, prompt=prompt, n=n):
            return generate_ids(ours, prompt[0].tolist(), n)

        same = run_hf() == run_ours()
        t_hf, t_ours = best_time(run_hf, args.repeats), best_time(run_ours, args.repeats)
        params = sum(p.numel() for p in ours.parameters())
        bound = bandwidth / (params * 4)  # every weight read once per token
        print(f"{name:<18} {params / 1e6:>7.1f}M {n / t_hf:>9.1f} {n / t_ours:>12.1f} "
              f"{t_hf / t_ours:>5.2f}x {bound:>11.1f} {n / t_ours / bound:>11.0%} {str(same).lower():>5}")


if __name__ == "__main__":
    main()
