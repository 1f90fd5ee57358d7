"""mtplab plain KV-cache decoding vs HF transformers `GPT2LMHeadModel.generate()`.

Identical random GPT-2 weights are copied into an mtplab model (learned positions, LayerNorm,
GELU-tanh, biases, tied embeddings; GPT-2's last block becomes the 1-block head 0). Batch 1, fp32,
greedy, 256 new tokens, both measured in this run, alternating, best of `--repeats`.
Also reports tokens/s against an upper bound for decoding one token at a time: each token reads
every weight it multiplies once (the unembedding included; one row of each embedding table), so
it takes at least weight bytes / read bandwidth when the weights do not fit the last-level cache,
and at least 2 x multiplied weights / matmul FLOP/s in any case. Both rates are measured here (a
sum over a 512 MiB tensor, a 2048^3 matmul), so no real run can beat the bound.

    python benchmarks/decode_vs_transformers.py [--repeats 3] [--new-tokens 256]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mtplab.inference.generate import generate_ids
from mtplab.interop.gpt2 import mtplab_from_gpt2  # what `mtplab convert gpt2 --heads 1` does

SIZES = {"gpt2-small-4x256": dict(n_layer=4, n_embd=256, n_head=4),
         "gpt2-124M": dict(n_layer=12, n_embd=768, n_head=12)}


def best_of(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_bandwidth() -> float:
    """Bytes/s read by a sum over 512 MiB (what decoding does with its weights: read, not write)."""
    src = torch.empty(128 * 2**20, dtype=torch.float32).uniform_()
    return src.numel() * 4 / best_of(src.sum)


def matmul_flops() -> float:
    """FLOP/s of a 2048^3 fp32 matmul: the most arithmetic this machine does per second."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / best_of(lambda: a @ b)


def last_level_cache() -> int:
    """Bytes of the largest CPU cache (sysfs), 0 when unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        sizes.append(int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text))
    return max(sizes, default=0)


def bound_tokens_per_s(model, bandwidth: float, flops: float, cache: int) -> tuple[float, str]:
    """The most tokens/s batch-1 decoding could reach, and which limit sets it."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}  # one row read
    multiplied = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in tables)
    multiplied += model.unembedding.numel() if id(model.unembedding) in tables else 0  # tied: read again
    compute = flops / (2 * multiplied)
    memory = bandwidth / (multiplied * 4) if multiplied * 4 > cache else float("inf")
    return (memory, "memory") if memory < compute else (compute, "compute")


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
    bandwidth, flops, cache = read_bandwidth(), matmul_flops(), last_level_cache()
    print(f"threads: {torch.get_num_threads()}, read bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"matmul {flops / 1e9:.0f} GFLOP/s, last-level cache {cache / 2**20:.0f} MiB "
          f"(measured {time.strftime('%Y-%m-%d')})\n")
    print(f"{'model':<18} {'params':>8} {'HF tok/s':>9} {'mtplab tok/s':>12} {'ratio':>6} "
          f"{'bound tok/s':>11} {'(limit)':>9} {'mtplab/bound':>12} {'same':>5}")
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
        bound, limit = bound_tokens_per_s(ours, bandwidth, flops, cache)
        print(f"{name:<18} {params / 1e6:>7.1f}M {n / t_hf:>9.1f} {n / t_ours:>12.1f} "
              f"{t_hf / t_ours:>5.2f}x {bound:>11.1f} {limit:>9} {n / t_ours / bound:>11.0%} "
              f"{str(same).lower():>5}")


if __name__ == "__main__":
    main()
