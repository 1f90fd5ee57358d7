"""Load test: concurrent streaming chat clients against `mtplab serve --max-batch 1` and a batched one.

Runs the same load twice, one server after the other on a free loopback port: `mtplab serve
CHECKPOINT --max-batch 1` (one forward per request in turn) and the default (continuous
batching, as many rows as the default KV-cache budget holds; or `--max-batch N`). Each load is
CLIENTS streaming chat clients started at once with the `openai` client,
greedy, fixed questions and max_tokens, after one warm-up request. Prints a table (errors, time to
first token p50/p99, latency, aggregate tokens/s) and the ratios, and checks every answer's text is
the same from both servers and from `mtplab generate --prompts` (exit 1 on an error or mismatch).

    python benchmarks/serve_load.py [CHECKPOINT] [--clients 64] [--max-tokens 64] [--max-batch N]

CHECKPOINT defaults to runs/demo (`mtplab demo` writes it); without one, recipes/tiny.toml is
trained into a temporary directory first (seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openai

from mtplab.data.synthetic import make_problems

ROOT = Path(__file__).resolve().parent.parent


async def one_client(client: openai.AsyncOpenAI, model: str, question: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, tokens, tau, text = None, 0, 0.0, []
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                  max_tokens=max_tokens, temperature=0, stream=True)
    async for chunk in stream:
        ext = (chunk.model_extra or {}).get("mtplab") or {}
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
        if ext.get("tokens"):
            first = first or time.perf_counter()
            tokens += len(ext["tokens"])
            tau = ext["tau"]
    if first is None:
        raise RuntimeError("no token came back")
    return {"ttft": first - t0, "latency": time.perf_counter() - t0, "tokens": tokens, "tau": tau,
            "text": "".join(text)}


async def load(url: str, model: str, questions: list[str], max_tokens: int) -> tuple[list, float]:
    """Every client's result (a dict, or the exception it raised), in question order; wall seconds."""
    client = openai.AsyncOpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_client(client, model, q, max_tokens) for q in questions),
                                   return_exceptions=True)
    wall = time.perf_counter() - t0
    await client.close()
    return results, wall


def start_server(checkpoint: str, clients: int, max_batch: int | None) -> tuple[subprocess.Popen, str, str]:
    batch = [] if max_batch is None else ["--max-batch", str(max_batch)]  # None: the server's default
    proc = subprocess.Popen([sys.executable, "-m", "mtplab", "serve", checkpoint, "--port", "0",
                             "--max-queue", str(clients), *batch],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    banner = proc.stdout.readline()
    found = re.search(r"http://\S+:\d+/", banner)
    if not found:
        proc.kill()
        sys.exit(f"the server did not start: {banner!r}")
    rows = re.search(r"up to (\d+) requests", banner)
    return proc, found.group(0), rows.group(1) if rows else "?"


def run_server(checkpoint: str, max_batch: int | None, questions: list[str], max_tokens: int) -> dict:
    proc, url, rows = start_server(checkpoint, len(questions), max_batch)
    try:
        model = openai.OpenAI(base_url=url + "v1", api_key="unused").models.list().data[0].id
        asyncio.run(load(url, model, questions[:1], max_tokens))  # warm-up: the engine, the first forward
        results, wall = asyncio.run(load(url, model, questions, max_tokens))
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    ok = [r for r in results if isinstance(r, dict)]
    errors = [f"{type(r).__name__}: {r}" for r in results if not isinstance(r, dict)]
    ttft = np.array([r["ttft"] for r in ok] or [np.nan]) * 1000
    tokens = sum(r["tokens"] for r in ok)
    name = f"--max-batch {max_batch}" if max_batch else f"default ({rows} rows)"
    return {"name": name, "ok": len(ok), "errors": errors,
            "ttft_p50": np.percentile(ttft, 50), "ttft_p99": np.percentile(ttft, 99),
            "latency_p50": np.percentile([r["latency"] for r in ok] or [np.nan], 50),
            "latency_max": max([r["latency"] for r in ok] or [np.nan]), "tokens": tokens, "wall": wall,
            "tokens_per_s": tokens / wall, "tau": np.mean([r["tau"] for r in ok] or [np.nan]),
            "texts": [r["text"] if isinstance(r, dict) else None for r in results]}


def reference_texts(checkpoint: str, questions: list[str], max_tokens: int) -> list[str]:
    """`mtplab generate --prompts` over the same questions (chat template, greedy)."""
    with tempfile.TemporaryDirectory() as tmp:
        prompts, out = Path(tmp) / "questions.jsonl", Path(tmp) / "answers.jsonl"
        prompts.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))
        subprocess.run([sys.executable, "-m", "mtplab", "generate", checkpoint, "--prompts", str(prompts),
                        "--max-new-tokens", str(max_tokens), "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return [json.loads(line)["text"] for line in out.read_text().splitlines()]


def table(runs: list[dict]) -> str:
    head = (f"{'server':<20}{'ok':>4}{'errors':>8}{'TTFT p50':>11}{'TTFT p99':>11}{'latency p50':>13}"
            f"{'all done':>10}{'tokens':>8}{'tokens/s':>10}{'tau':>6}")
    lines = [head, "-" * len(head)]
    for r in runs:
        lines.append(f"{r['name']:<20}{r['ok']:>4}{len(r['errors']):>8}{r['ttft_p50']:>8.0f} ms"
                     f"{r['ttft_p99']:>8.0f} ms{r['latency_p50']:>11.2f} s{r['latency_max']:>8.2f} s"
                     f"{r['tokens']:>8}{r['tokens_per_s']:>10.1f}{r['tau']:>6.2f}")
    return "\n".join(lines)


def tiny_checkpoint(tmp: str) -> str:
    import mtplab

    out = Path(tmp) / "tiny"
    print(f"no checkpoint at runs/demo: training recipes/tiny.toml into {out} ...", flush=True)
    mtplab.train(ROOT / "recipes" / "tiny.toml", out, progress=False)
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default=None, help="default: runs/demo, else a tiny one")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=None,
                        help="the batched server's --max-batch (default: the server's own default)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = "runs/demo" if (Path("runs/demo") / "config.json").is_file() else tiny_checkpoint(tmp)
        questions = [p["question"] for p in make_problems(args.clients, seed=515_151, max_number=20)]
        print(f"{checkpoint}: {args.clients} concurrent streaming chat clients, {args.max_tokens} max tokens "
              f"each, greedy; one server at a time\n", flush=True)
        runs = [run_server(checkpoint, mb, questions, args.max_tokens) for mb in (1, args.max_batch)]
        expected = reference_texts(checkpoint, questions, args.max_tokens)
    one, batched = runs
    print(table(runs))
    print(f"\nbatched / one at a time: tokens/s {batched['tokens_per_s'] / one['tokens_per_s']:.2f}x, "
          f"TTFT p50 {batched['ttft_p50'] / one['ttft_p50']:.2f}x, p99 {batched['ttft_p99'] / one['ttft_p99']:.2f}x, "
          f"all answers done {batched['wall'] / one['wall']:.2f}x the time")
    between = [i for i in range(len(questions)) if one["texts"][i] != batched["texts"][i]]
    vs_cli = [(r["name"], i) for r in runs for i in range(len(questions)) if r["texts"][i] != expected[i]]
    print(f"texts: {len(questions) - len(between)}/{len(questions)} identical between the two servers; "
          f"{len(vs_cli)} differ from `mtplab generate`")
    for name, i in vs_cli[:5]:
        print(f"  mismatch ({name}) question {i}: {runs[0 if name == one['name'] else 1]['texts'][i]!r} "
              f"!= generate {expected[i]!r}")
    for r in runs:
        for e in r["errors"][:5]:
            print(f"  error ({r['name']}): {e}")
    if between or vs_cli or one["errors"] or batched["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
