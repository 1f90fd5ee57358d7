"""Decoding speed: the same prompts decoded plain and speculative, side by side."""

from __future__ import annotations

import dataclasses
import time

from ..inference.decode import decode_batch
from ..inference.generate import generate_ids, generate_speculative
from ..inference.sampling import SamplingParams
from ..inference.speculative import SpeculativeStats
from ..models.transformer import Transformer


def bench_batched(model: Transformer, prompts: list[list[int]], max_new_tokens: int = 128,
                  eos_id: int | None = None, n_draft: int | None = None, batch_size: int = 16) -> dict:
    """Greedy decoding of all `prompts`, `batch_size` rows at a time, plain then speculative:
    aggregate tokens/s (prefill included), tau, and each prompt's tokens."""
    out = {"batch_size": batch_size}
    for name, speculative in (("plain", False), ("speculative", True)):
        t0 = time.perf_counter()
        done = list(decode_batch(model, prompts, max_new_tokens, eos_id=eos_id, batch_size=batch_size,
                                 speculative=speculative, n_draft=n_draft))
        seconds = time.perf_counter() - t0
        tokens = sum(c.tokens for c in done)
        out[f"{name}_tokens_per_s"] = tokens / max(seconds, 1e-9)
        decoded, forwards = sum(c.stats.decoded for c in done), sum(c.stats.forwards for c in done)
        out[f"{name}_tokens_per_forward"] = decoded / max(forwards, 1)  # tau: per decoding forward
        out[f"{name}_ids"] = [c.ids for c in done]
    return out


def compare_decoders(model: Transformer, prompts: list[list[int]], max_new_tokens: int = 128,
                     eos_id: int | None = None, params: SamplingParams = SamplingParams(), tree=None,
                     batches: tuple[int, ...] = (1, 16), rounds: int = 1) -> list[dict]:
    """Plain, chain and (with `tree`) tree decoding of all `prompts` at each batch size, in `rounds`
    that alternate the decoders (sampling: round r seeds every prompt with params.seed + r). One row
    per (batch, decoder): tokens/s (prefill included), the speed-up over plain at that batch, tau,
    and `same`, the share of prompts whose first-round tokens equal batch-1 plain's (greedy: 1.0
    up to rounding)."""
    modes = [("plain", False, None), ("chain", True, None)] + ([("tree", True, tree)] if tree is not None else [])
    for _, speculative, use_tree in modes:  # warm-up: first calls, allocator, kernels
        list(decode_batch(model, prompts[:2], 8, params, eos_id, batch_size=2, speculative=speculative, tree=use_tree))
    rows, reference = [], None
    for batch in batches:
        total = {name: [0, 0.0, 0, 0] for name, _, _ in modes}  # tokens, seconds, decoded, forwards
        same = {}
        for r in range(rounds):
            round_params = params if params.greedy else dataclasses.replace(params, seed=(params.seed or 0) + r)
            for name, speculative, use_tree in modes:
                t0 = time.perf_counter()
                done = list(decode_batch(model, prompts, max_new_tokens, round_params, eos_id, batch_size=batch,
                                         speculative=speculative, tree=use_tree))
                t = total[name]
                t[0] += sum(c.tokens for c in done)
                t[1] += time.perf_counter() - t0
                t[2] += sum(c.stats.decoded for c in done)
                t[3] += sum(c.stats.forwards for c in done)
                if r == 0:
                    ids = [c.ids for c in done]
                    reference = reference or ids
                    same[name] = sum(a == b for a, b in zip(ids, reference)) / len(ids)
        base = total["plain"][0] / max(total["plain"][1], 1e-9)
        for name, _, _ in modes:
            tokens, seconds, decoded, forwards = total[name]
            rate = tokens / max(seconds, 1e-9)
            rows.append({"batch": batch, "mode": name, "tokens_per_s": rate, "speedup": rate / base,
                         "tau": decoded / max(forwards, 1), "same": same[name]})
    return rows


def format_decoders(rows: list[dict]) -> str:
    """`compare_decoders`' rows as a table."""
    lines = [f"{'batch':>5} {'mode':>5} {'tok/s':>9} {'x plain':>8} {'tau':>5} {'same':>5}"]
    lines += [f"{r['batch']:>5} {r['mode']:>5} {r['tokens_per_s']:>9.1f} {r['speedup']:>7.2f}x {r['tau']:>5.2f} "
              f"{r['same']:>5.0%}" for r in rows]
    return "\n".join(lines)


def bench_decoding(model: Transformer, prompts: list[list[int]], max_new_tokens: int = 128,
                   eos_id: int | None = None, n_draft: int | None = None,
                   batch_size: int | None = None, tree=None) -> dict:
    """Greedy plain vs speculative decoding of each prompt, alternating, after one warm-up of each;
    tau (tokens per forward), the speed-up and their ratio (how much of tau becomes speed). With
    `tree` (inference/tree.py), each prompt is also decoded with that tree of drafts (`tree_*`
    keys; `chain_*` repeat the chain's). With `batch_size`, the prompts are also decoded that many
    rows at a time, plain and speculative."""
    generate_ids(model, prompts[0], 8, eos_id=eos_id)
    list(generate_speculative(model, prompts[0], 8, eos_id=eos_id, n_draft=n_draft))
    stats, tree_stats, tree_identical = SpeculativeStats(), SpeculativeStats(), True
    if tree is not None:
        list(generate_speculative(model, prompts[0], 8, eos_id=eos_id, n_draft=n_draft, tree=tree))
    rows, plain_s, plain_tokens, identical, plain_ids = [], 0.0, 0, True, []
    for prompt in prompts:
        t0 = time.perf_counter()
        plain = generate_ids(model, prompt, max_new_tokens, eos_id=eos_id)
        t1 = time.perf_counter()
        before = (stats.forwards, stats.decoded, stats.seconds)
        spec = [t for e in generate_speculative(model, prompt, max_new_tokens, eos_id=eos_id,
                                                n_draft=n_draft, stats=stats) for t in e.tokens]
        forwards, decoded = stats.forwards - before[0], stats.decoded - before[1]
        spec_s = stats.seconds - before[2]
        plain_s += t1 - t0
        plain_tokens += len(plain)
        identical &= plain == spec
        rows.append({"tokens": len(plain), "plain_tokens_per_s": len(plain) / (t1 - t0),
                     "speculative_tokens_per_s": len(spec) / max(spec_s, 1e-9),
                     "tokens_per_forward": decoded / max(forwards, 1), "identical": plain == spec})
        plain_ids.append(plain)
        if tree is not None:
            tree_spec = [t for e in generate_speculative(model, prompt, max_new_tokens, eos_id=eos_id,
                                                         n_draft=n_draft, stats=tree_stats, tree=tree)
                         for t in e.tokens]
            tree_identical &= tree_spec == plain
    plain_rate = plain_tokens / max(plain_s, 1e-9)
    speedup = stats.tokens_per_second / max(plain_rate, 1e-9)
    result = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "heads": model.n_future,
              "plain_tokens_per_s": plain_rate, "speculative_tokens_per_s": stats.tokens_per_second,
              "speedup": speedup, "tokens_per_forward": stats.tokens_per_forward,
              "speedup_per_tau": speedup / max(stats.tokens_per_forward, 1e-9),
              "acceptance_by_position": stats.acceptance_by_position,
              "identical": bool(identical), "rows": rows}
    if tree is not None:
        result.update({"chain_speedup": speedup, "chain_tokens_per_forward": stats.tokens_per_forward,
                       "tree": str(tree), "tree_nodes": tree.size,
                       "tree_tokens_per_s": tree_stats.tokens_per_second,
                       "tree_speedup": tree_stats.tokens_per_second / max(plain_rate, 1e-9),
                       "tree_tokens_per_forward": tree_stats.tokens_per_forward,
                       "tree_acceptance_by_depth": tree_stats.acceptance_by_position,
                       "tree_identical": bool(tree_identical)})
    if batch_size is not None:
        b = bench_batched(model, prompts, max_new_tokens, eos_id, n_draft, batch_size)
        same = [b.pop("plain_ids"), b.pop("speculative_ids")] == [plain_ids, plain_ids]
        result["batched"] = {**b, "plain_vs_batch1_plain": b["plain_tokens_per_s"] / max(plain_rate, 1e-9),
                             "speculative_vs_batch1_plain":
                                 b["speculative_tokens_per_s"] / max(plain_rate, 1e-9),
                             "identical": bool(same)}
    return result


def format_bench(result: dict) -> str:
    """The table: per prompt and overall, tokens/s plain and speculative, the speed-up, tau and
    speed-up / tau; then the acceptance by draft position (and the batched line, when measured)."""
    lines = [f"{'prompt':>6} {'tokens':>6} {'plain tok/s':>11} {'spec tok/s':>10} {'speed-up':>8} "
             f"{'tau':>5} {'up/tau':>6} {'same':>5}"]
    for i, r in enumerate(result["rows"]):
        up = r['speculative_tokens_per_s'] / max(r['plain_tokens_per_s'], 1e-9)
        lines.append(f"{i:>6} {r['tokens']:>6} {r['plain_tokens_per_s']:>11.1f} "
                     f"{r['speculative_tokens_per_s']:>10.1f} {up:>7.2f}x "
                     f"{r['tokens_per_forward']:>5.2f} {up / max(r['tokens_per_forward'], 1e-9):>6.2f} "
                     f"{str(r['identical']).lower():>5}")
    acc = " ".join(f"{a:.2f}" for a in result["acceptance_by_position"])
    lines.append(f"{'all':>6} {sum(r['tokens'] for r in result['rows']):>6} "
                 f"{result['plain_tokens_per_s']:>11.1f} {result['speculative_tokens_per_s']:>10.1f} "
                 f"{result['speedup']:>7.2f}x {result['tokens_per_forward']:>5.2f} "
                 f"{result['speedup_per_tau']:>6.2f} {str(result['identical']).lower():>5}")
    lines.append(f"acceptance by draft position: {acc}")
    if "tree" in result:
        depth = " ".join(f"{a:.2f}" for a in result["tree_acceptance_by_depth"])
        lines.append(f"tree of {result['tree_nodes']} drafts ({result['tree']}): "
                     f"{result['tree_tokens_per_s']:.1f} tok/s, {result['tree_speedup']:.2f}x plain "
                     f"(chain {result['chain_speedup']:.2f}x), tau {result['tree_tokens_per_forward']:.2f} "
                     f"(chain {result['chain_tokens_per_forward']:.2f}), acceptance by depth {depth}, "
                     f"same: {str(result['tree_identical']).lower()}")
    b = result.get("batched")
    if b:
        lines.append(f"batch {b['batch_size']}: plain {b['plain_tokens_per_s']:.1f} tok/s "
                     f"({b['plain_vs_batch1_plain']:.2f}x batch-1 plain), speculative "
                     f"{b['speculative_tokens_per_s']:.1f} tok/s ({b['speculative_vs_batch1_plain']:.2f}x, "
                     f"tau {b['speculative_tokens_per_forward']:.2f}); same tokens as batch 1: "
                     f"{str(b['identical']).lower()}")
    return "\n".join(lines)
