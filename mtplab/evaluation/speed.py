"""Decoding speed: the same prompts decoded plain and speculative, side by side, greedy."""

from __future__ import annotations

import time

from ..inference.generate import generate_ids
from ..inference.speculative import SpeculativeStats, generate_speculative
from ..models.transformer import Transformer


def bench_decoding(model: Transformer, prompts: list[list[int]], max_new_tokens: int = 128,
                   eos_id: int | None = None, n_draft: int | None = None) -> dict:
    """Greedy plain vs speculative decoding of each prompt, alternating, after one warm-up of each."""
    generate_ids(model, prompts[0], 8, eos_id=eos_id)
    list(generate_speculative(model, prompts[0], 8, eos_id=eos_id, n_draft=n_draft))
    stats = SpeculativeStats()
    rows, plain_s, plain_tokens, identical = [], 0.0, 0, True
    for prompt in prompts:
        t0 = time.perf_counter()
        plain = generate_ids(model, prompt, max_new_tokens, eos_id=eos_id)
        t1 = time.perf_counter()
        before = (stats.forwards, stats.seconds)
        spec = [t for e in generate_speculative(model, prompt, max_new_tokens, eos_id=eos_id,
                                                n_draft=n_draft, stats=stats) for t in e.tokens]
        forwards, spec_s = stats.forwards - before[0], stats.seconds - before[1]
        plain_s += t1 - t0
        plain_tokens += len(plain)
        identical &= plain == spec
        rows.append({"tokens": len(plain), "plain_tokens_per_s": len(plain) / (t1 - t0),
                     "speculative_tokens_per_s": len(spec) / max(spec_s, 1e-9),
                     "tokens_per_forward": len(spec) / max(forwards, 1), "identical": plain == spec})
    plain_rate = plain_tokens / max(plain_s, 1e-9)
    return {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "heads": model.n_future,
            "plain_tokens_per_s": plain_rate, "speculative_tokens_per_s": stats.tokens_per_second,
            "speedup": stats.tokens_per_second / max(plain_rate, 1e-9),
            "tokens_per_forward": stats.tokens_per_forward,
            "acceptance_by_position": stats.acceptance_by_position,
            "identical": bool(identical), "rows": rows}


def format_bench(result: dict) -> str:
    lines = [f"{'prompt':>6} {'tokens':>6} {'plain tok/s':>11} {'spec tok/s':>10} {'speed-up':>8} "
             f"{'tau':>5} {'same':>5}"]
    for i, r in enumerate(result["rows"]):
        lines.append(f"{i:>6} {r['tokens']:>6} {r['plain_tokens_per_s']:>11.1f} "
                     f"{r['speculative_tokens_per_s']:>10.1f} "
                     f"{r['speculative_tokens_per_s'] / max(r['plain_tokens_per_s'], 1e-9):>7.2f}x "
                     f"{r['tokens_per_forward']:>5.2f} {str(r['identical']).lower():>5}")
    acc = " ".join(f"{a:.2f}" for a in result["acceptance_by_position"])
    lines.append(f"{'all':>6} {sum(r['tokens'] for r in result['rows']):>6} "
                 f"{result['plain_tokens_per_s']:>11.1f} {result['speculative_tokens_per_s']:>10.1f} "
                 f"{result['speedup']:>7.2f}x {result['tokens_per_forward']:>5.2f} "
                 f"{str(result['identical']).lower():>5}")
    lines.append(f"acceptance by draft position: {acc}")
    return "\n".join(lines)
