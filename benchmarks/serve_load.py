"""Load test: concurrent streaming chat clients against `mtplab serve` on loopback.

Starts `mtplab serve CHECKPOINT` in a subprocess on a free port (or uses --url), lets one client
answer alone for reference, then starts all clients at once with the `openai` client, streaming.
Prints errors, time to first token (p50/p99), end-to-end latency and aggregate tokens/s.

    python benchmarks/serve_load.py [CHECKPOINT] [--clients 64] [--max-tokens 64] [--max-active 16]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import time

import numpy as np
import openai

from mtplab.data.synthetic import make_problems


async def one_client(client: openai.AsyncOpenAI, model: str, question: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, tokens, tau = None, 0, 0.0
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                  max_tokens=max_tokens, temperature=0, stream=True)
    async for chunk in stream:
        ext = (chunk.model_extra or {}).get("mtplab") or {}
        if ext.get("tokens"):
            first = first or time.perf_counter()
            tokens += len(ext["tokens"])
            tau = ext["tau"]
    if first is None:
        raise RuntimeError("no token came back")
    return {"ttft": first - t0, "latency": time.perf_counter() - t0, "tokens": tokens, "tau": tau}


async def load(url: str, model: str, questions: list[str], max_tokens: int) -> tuple[list[dict], list[str], float]:
    client = openai.AsyncOpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_client(client, model, q, max_tokens) for q in questions),
                                   return_exceptions=True)
    wall = time.perf_counter() - t0
    await client.close()
    errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    return [r for r in results if isinstance(r, dict)], errors, wall


def start_server(checkpoint: str, clients: int, max_active: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "mtplab", "serve", checkpoint, "--port", "0",
                             "--max-queue", str(clients), "--max-active", str(max_active)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    banner = proc.stdout.readline()
    found = re.search(r"http://\S+:\d+/", banner)
    if not found:
        proc.kill()
        sys.exit(f"the server did not start: {banner!r}")
    return proc, found.group(0)


def report(name: str, results: list[dict], errors: list[str], wall: float) -> None:
    ttft = np.array([r["ttft"] for r in results]) * 1000
    latency = np.array([r["latency"] for r in results])
    tokens = sum(r["tokens"] for r in results)
    print(f"{name}: {len(results)} ok, {len(errors)} errors; TTFT p50 {np.percentile(ttft, 50):.0f} ms, "
          f"p99 {np.percentile(ttft, 99):.0f} ms; latency p50 {np.percentile(latency, 50):.2f} s, "
          f"p99 {np.percentile(latency, 99):.2f} s; {tokens} tokens in {wall:.2f} s = "
          f"{tokens / wall:.1f} tokens/s aggregate; mean tau {np.mean([r['tau'] for r in results]):.2f}")
    for e in errors[:5]:
        print("  error:", e)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default="runs/demo")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-active", type=int, default=16, help="the server's --max-active")
    parser.add_argument("--url", default=None, help="an already running server (e.g. http://127.0.0.1:8000/)")
    parser.add_argument("--model", default=None, help="model id (default: the server's)")
    args = parser.parse_args()
    proc = None
    if args.url is None:
        proc, url = start_server(args.checkpoint, args.clients, args.max_active)
    else:
        url = args.url.rstrip("/") + "/"
    try:
        model = args.model or openai.OpenAI(base_url=url + "v1", api_key="unused").models.list().data[0].id
        questions = [p["question"] for p in make_problems(args.clients, seed=515_151, max_number=20)]
        print(f"{url} model {model!r}: {args.clients} concurrent streaming clients, {args.max_tokens} "
              f"max tokens each, greedy\n")
        report("1 client alone", *asyncio.run(load(url, model, questions[:1], args.max_tokens)))
        results, errors, wall = asyncio.run(load(url, model, questions, args.max_tokens))
        report(f"{args.clients} clients at once", results, errors, wall)
        if errors:
            sys.exit(1)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=20)


if __name__ == "__main__":
    main()
