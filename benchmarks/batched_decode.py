"""Batched decoding: plain and speculative at batch 1 / 4 / 16 / 64, side by side in one run.

Two models: a trained checkpoint (default: the demo's, `mtplab demo` writes runs/demo) and a random
GPT-2-124M-shaped one (12 layers, d_model 768, 12 heads, vocab 50304, 4 parallel heads; random
weights: it shows what batching does to a model of that size, not what trained heads draft -- its
tau only reflects random heads repeating head 0's repetitive output; short prompts and few tokens,
it is slow on a CPU). Every batch
size decodes the same prompts greedily (one engine, `batch` rows at a time, prefill included in the
time); the table gives tokens/s, the ratio to batch-1 plain, tau (tokens per forward) and whether
every prompt's tokens equal batch-1 plain's. Then `mtplab eval --task gsm8k`'s answering, batched
(speculative and plain) against batch 1: the time and whether the per-example rows are identical.

    python benchmarks/batched_decode.py [CHECKPOINT] [--prompts 64] [--max-new-tokens 64]
        [--batches 1,4,16,64] [--gpt2-prompts 64] [--gpt2-tokens 8] [--no-gpt2]
        [--eval 64] [--eval-data ../shared/data/gsm8k/test.jsonl] [--eval-batch 16] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import mtplab
from mtplab.config import ModelConfig
from mtplab.data.qa import load_qa_jsonl
from mtplab.data.synthetic import make_problems
from mtplab.evaluation.exact_match import evaluate_answers
from mtplab.inference.decode import decode_batch
from mtplab.models.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def gpt2_shaped(max_seq_len: int = 128) -> Transformer:
    """GPT-2 124M's trunk (learned positions, LayerNorm, GELU, biases) with 4 parallel heads, random."""
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=50304, d_model=768, n_layers=12, n_heads=12,
                                   max_seq_len=max_seq_len, pos="learned", norm="layernorm", mlp="gelu",
                                   bias=True, n_future=4, mtp="parallel")).eval()


def measure(model, prompts, max_new_tokens, eos_id, batches) -> list[dict]:
    """One row per (mode, batch): tokens/s, ratio to batch-1 plain, tau, same tokens as batch-1 plain."""
    list(decode_batch(model, prompts[:2], 4, eos_id=eos_id, batch_size=2, speculative=True))  # warm-up
    rows, base, reference = [], None, None
    for speculative in (False, True):
        for batch in batches:
            t0 = time.perf_counter()
            done = list(decode_batch(model, prompts, max_new_tokens, eos_id=eos_id, batch_size=batch,
                                     speculative=speculative))
            seconds = time.perf_counter() - t0
            tokens = sum(c.tokens for c in done)
            ids = [c.ids for c in done]
            rate = tokens / seconds
            if base is None:
                base, reference = rate, ids
            rows.append({"mode": "speculative" if speculative else "plain", "batch": batch, "tokens": tokens,
                         "seconds": seconds, "tokens_per_s": rate, "vs_b1_plain": rate / base,
                         "tau": sum(c.stats.decoded for c in done) / max(sum(c.stats.forwards for c in done), 1),
                         "same": ids == reference})
            print(f"  {rows[-1]['mode']:>11} batch {batch:>3}: {rate:8.1f} tok/s", flush=True)
    return rows


def table(name: str, rows: list[dict]) -> str:
    lines = [f"{name}", f"{'mode':>11} {'batch':>5} {'tokens':>6} {'s':>7} {'tok/s':>8} {'x b1 plain':>10} "
                        f"{'tau':>5} {'same':>5}"]
    for r in rows:
        lines.append(f"{r['mode']:>11} {r['batch']:>5} {r['tokens']:>6} {r['seconds']:>7.2f} "
                     f"{r['tokens_per_s']:>8.1f} {r['vs_b1_plain']:>9.2f}x {r['tau']:>5.2f} "
                     f"{str(r['same']).lower():>5}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default="runs/demo")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--no-gpt2", dest="gpt2", action="store_false")
    parser.add_argument("--gpt2-prompts", type=int, default=64)
    parser.add_argument("--gpt2-prompt-len", type=int, default=16)
    parser.add_argument("--gpt2-tokens", type=int, default=8)
    parser.add_argument("--eval", type=int, default=64, help="GSM8K questions to answer (0: skip)")
    parser.add_argument("--eval-data", default=str(GSM8K) if GSM8K.exists() else None,
                        help="question/answer jsonl (default: ../shared/data/gsm8k/test.jsonl, else "
                             "built-in arithmetic problems)")
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=256, help="mtplab eval's --max-new-tokens")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    out = []

    model, tokenizer = mtplab.load(args.checkpoint)
    prompts = [tokenizer.encode_chat(p["question"])
               for p in make_problems(args.prompts, seed=424_242, max_number=20)]
    name = (f"{args.checkpoint}: {model.num_parameters() / 1e6:.2f}M parameters, {model.n_future} heads, "
            f"{len(prompts)} prompts x <= {args.max_new_tokens} tokens, greedy, "
            f"{torch.get_num_threads()} threads")
    print(name, flush=True)
    out.append(table(name, measure(model, prompts, args.max_new_tokens, tokenizer.eos_id, batches)))

    if args.gpt2:
        big = gpt2_shaped()
        gen = torch.Generator().manual_seed(5)
        big_prompts = torch.randint(0, 50304, (args.gpt2_prompts, args.gpt2_prompt_len), generator=gen).tolist()
        name = (f"random GPT-2-124M-shaped, 4 parallel heads: {big.num_parameters() / 1e6:.1f}M parameters, "
                f"{len(big_prompts)} prompts of {args.gpt2_prompt_len} tokens x {args.gpt2_tokens} tokens "
                f"(random weights: tau says nothing about trained heads)")
        print(name, flush=True)
        out.append(table(name, measure(big, big_prompts, args.gpt2_tokens, None, batches)))
        del big

    if args.eval:
        examples = (load_qa_jsonl(args.eval_data, args.eval) if args.eval_data else
                    [{"question": p["question"], "answer": p["answer"]}
                     for p in make_problems(args.eval, seed=11, max_number=20)])
        lines = [f"mtplab eval --task gsm8k on {len(examples)} questions of "
                 f"{args.eval_data or 'built-in problems'} (--max-new-tokens {args.eval_tokens})",
                 f"{'run':>32} {'s':>7} {'x batch 1':>9} {'same rows':>9}"]
        runs = [(1, None, "batch 1 (default decoding)"),
                (args.eval_batch, True, f"--batch-size {args.eval_batch} --speculative"),
                (args.eval_batch, False, f"--batch-size {args.eval_batch} --no-speculative")]
        first = None
        for batch, speculative, label in runs:
            t0 = time.perf_counter()
            rows = evaluate_answers(model, tokenizer, examples, args.eval_tokens, batch_size=batch,
                                    speculative=speculative)["rows"]
            seconds = time.perf_counter() - t0
            first = first or (seconds, rows)
            print(f"  eval {label}: {seconds:.1f} s", flush=True)
            lines.append(f"{label:>32} {seconds:>7.1f} {first[0] / seconds:>8.2f}x "
                         f"{str(rows == first[1]).lower():>9}")
        out.append("\n".join(lines))
    print("\n" + "\n\n".join(out))


if __name__ == "__main__":
    main()
