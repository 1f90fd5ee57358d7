"""The GPU check, as one short script: training and decoding run on the device in bf16, and the
figures a note needs, measured side by side in one run.

1. Training throughput: a GPT-2-small-shaped model (12 layers, d_model 768, 4 parallel heads) on the
   built-in arithmetic problems, `train.dtype=bf16`, through mtplab's own training loop: tokens/s
   and MFU (model FLOPs of every head, x3 for the backward, over the device's peak bf16 FLOP/s).
2. The demo model trained on the device (the demo recipe, bf16 autocast), then decoded greedily in
   bf16: tokens/s plain, chain and tree at batch 1 and 16, their speed-ups over plain at the same
   batch, tau, and the share of outputs equal to batch-1 plain greedy's (in bf16 a forward over 4
   positions rounds differently from one over 1, so a near-tie can flip; fp32 on the CPU is where
   the tests hold outputs identical).

    python benchmarks/device_check.py [--device cuda] [--train-steps 60] [--peak-tflops 989]
    python benchmarks/device_check.py --device cpu --smoke     # the script itself, small, on a CPU

Nothing here needs ../shared. Prints one table per part and, with --json FILE, writes them too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mtplab.config import load_config
from mtplab.data.synthetic import make_problems
from mtplab.evaluation.speed import compare_decoders, format_decoders
from mtplab.inference.tree import DraftTree
from mtplab.models.summary import summarize
from mtplab.training.trainer import train

RECIPES = Path(__file__).resolve().parents[1] / "mtplab" / "recipes"
# dense bf16 tensor-core peaks (no sparsity), TFLOP/s: the datasheets'
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0}


def peak_flops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAKS.items() if key in name), None)


def training_throughput(device: torch.device, steps: int, smoke: bool, peak: float | None, out: Path) -> dict:
    shape = (["model.d_model=96", "model.n_layers=2", "model.n_heads=2", "train.batch_size=8"] if smoke else
             ["model.d_model=768", "model.n_layers=12", "model.n_heads=12", "train.batch_size=64"])
    config = load_config(RECIPES / "demo.toml", shape + [
        f"train.steps={steps}", f"train.device={device.type}", "train.dtype=bf16", "train.log_every=5",
        f"train.eval_every={10 * steps}", "train.warmup_steps=5", "data.n_train=4000", "data.n_eval=16"])
    result = train(config, out, progress=False)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in logged if r.get("tokens_per_s")][1:]  # the first window compiles/warms
    tokens_per_s = sum(rates) / max(len(rates), 1)
    flops = 3 * summarize(result.model.config, config.data.seq_len)["flops_per_token_all_heads"]
    return {"parameters": result.model.num_parameters(), "steps": steps, "tokens_per_s": tokens_per_s,
            "train_flops_per_token": flops, "mfu": tokens_per_s * flops / peak if peak else None}


def decoding(device: torch.device, smoke: bool, out: Path, max_new_tokens: int) -> tuple[dict, list[dict]]:
    overrides = [f"train.device={device.type}", "train.dtype=bf16"] + (["train.steps=40", "data.n_train=2000"]
                                                                      if smoke else [])
    config = load_config(RECIPES / "demo.toml", overrides)
    t0 = time.perf_counter()
    result = train(config, out, progress=False)
    info = {"train_seconds": round(time.perf_counter() - t0, 1)}
    model = result.model.eval().to(torch.bfloat16)
    tok = result.dataset.tokenizer
    prompts = [tok.encode_chat(p["question"]) for p in make_problems(32 if smoke else 64, seed=424_242,
                                                                    max_number=12)]
    rows = compare_decoders(model, prompts, max_new_tokens, tok.eos_id, tree=DraftTree.default(model.n_future - 1))
    return info, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak (default: by its name)")
    parser.add_argument("--smoke", action="store_true", help="small shapes: check the script on a CPU")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        fit = training_throughput(device, args.train_steps, args.smoke, peak_flops(device, args.peak_tflops),
                                  Path(tmp) / "throughput")
        info, rows = decoding(device, args.smoke, Path(tmp) / "demo", args.max_new_tokens)
    mfu = f"{fit['mfu']:.1%}" if fit["mfu"] is not None else "n/a (no peak known: --peak-tflops)"
    print(f"\ntraining, bf16: {fit['parameters'] / 1e6:.1f}M parameters, {fit['tokens_per_s']:,.0f} tokens/s, "
          f"{fit['train_flops_per_token'] / 1e9:.2f} GFLOP per token, MFU {mfu}")
    print(f"demo model trained on {name} in {info['train_seconds']} s; greedy decoding in bf16:")
    print(format_decoders(rows))
    print("(same: share of prompts whose tokens equal batch-1 plain's; bf16 rounding differs between shapes, "
          "so near-ties may flip)")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "training": fit, "demo": info, "decoding": rows},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
