"""`mtplab bench --think-loops 1,2,4`: one looped model, the same weights, decoded at several think-loop
counts side by side: FLOPs per token (as `mtplab info` counts them), tokens/s plain and speculative,
whether speculation still reproduces plain decoding, and (with a data file) the held-out loss."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from ..inference.generate import generate_ids, generate_speculative
from ..inference.speculative import SpeculativeStats
from ..models.summary import summarize
from ..models.transformer import Transformer


def compare_think_loops(model: Transformer, prompts: list[list[int]], counts: list[int],
                        max_new_tokens: int = 128, eos_id: int | None = None, n_draft: int | None = None,
                        loss: Callable[[Transformer], float] | None = None) -> dict:
    """Greedy decoding of every prompt at each think-loop count in `counts` (plain, then speculative
    when the model has extra heads), after one warm-up at that count; `loss(model)`, when given, is
    measured at each count too. The model's own count is restored afterwards."""
    trained = model.n_think_loops
    rows = []
    try:
        for loops in counts:
            model.n_think_loops = loops  # each decode lays out its KV cache for this count
            flops = summarize(dataclasses.replace(model.config, n_think_loops=loops))
            generate_ids(model, prompts[0], 8, eos_id=eos_id)
            t0 = time.perf_counter()
            plain = [generate_ids(model, p, max_new_tokens, eos_id=eos_id) for p in prompts]
            seconds = time.perf_counter() - t0
            tokens = sum(map(len, plain))
            row = {"think_loops": loops, "flops_per_token": flops["flops_per_token_next_token"],
                   "tokens": tokens, "plain_tokens_per_s": tokens / max(seconds, 1e-9)}
            if model.n_future > 1:
                list(generate_speculative(model, prompts[0], 8, eos_id=eos_id, n_draft=n_draft))
                stats = SpeculativeStats()
                spec = [[t for e in generate_speculative(model, p, max_new_tokens, eos_id=eos_id,
                                                         n_draft=n_draft, stats=stats) for t in e.tokens]
                        for p in prompts]
                row.update(speculative_tokens_per_s=stats.tokens_per_second,
                           tokens_per_forward=stats.tokens_per_forward, identical=spec == plain)
            if loss is not None:
                row["loss"] = loss(model)
            rows.append(row)
    finally:
        model.n_think_loops = trained
    return {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "heads": model.n_future,
            "trained_think_loops": trained, "rows": rows}


def format_think_loops(result: dict) -> str:
    """One line per think-loop count; `-` where a column does not apply (one head, no data)."""
    lines = [f"same weights at each think-loop count (trained with {result['trained_think_loops']}); "
             "FLOPs per token at full context, as `mtplab info` counts them",
             f"{'loops':>5} {'FLOPs/token':>12} {'tokens':>6} {'plain tok/s':>11} {'spec tok/s':>10} "
             f"{'tau':>5} {'same':>5} {'loss':>7}"]
    for r in result["rows"]:
        spec = "identical" in r
        lines.append(f"{r['think_loops']:>5} {r['flops_per_token']:>12,} {r['tokens']:>6} "
                     f"{r['plain_tokens_per_s']:>11.1f} "
                     + (f"{r['speculative_tokens_per_s']:>10.1f} {r['tokens_per_forward']:>5.2f} "
                        f"{str(r['identical']).lower():>5} " if spec else f"{'-':>10} {'-':>5} {'-':>5} ")
                     + (f"{r['loss']:>7.4f}" if "loss" in r else f"{'-':>7}"))
    return "\n".join(lines)
