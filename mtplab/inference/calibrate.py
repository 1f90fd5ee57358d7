"""`mtplab calibrate`: the draft tree that decodes fastest on this machine, chosen from measurements.

A bigger tree accepts more tokens per forward but makes every forward dearer, so the tree is sized
for tokens per second, not for tau (Sequoia's hardware-aware view of Medusa's static trees):

1. **How often each node would be accepted.** Held-out prompts are continued greedily, and each
   whole sequence goes through every head once. At each position of a continuation, the rank of the
   token actually decoded k + 1 places ahead among head k's logits gives a rank path (head 1's rank,
   head 2's, ... up to the first rank past `max_rank`). A tree node is accepted at a position exactly
   when the position's rank path starts with the node's path, so P(node) is the share of positions
   whose path does, and a tree's expected tokens per decoding forward is 1 + the sum of its nodes'
   P. The best tree of n nodes holds the n most frequent paths; a path is never more frequent than
   its parent, so those n paths form a tree.
2. **What a step costs.** The engine decodes the prompts at the batch size the tree is for, once
   plain and once per candidate tree (the best tree of each size and the chains), and each
   candidate's decoding steps are timed.

The candidate with the most expected tokens per second wins (a chain when trees do not pay on this
machine), and `draft_tree.json` beside the checkpoint's weights records it with the measurements;
`--tree auto` (generate, bench) decodes with it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from ..atomic import atomic_write_text
from ..errors import MtplabError
from ..models.transformer import Transformer
from .decode import decode_batch
from .engine import Engine, Request
from .tree import DraftTree

TREE_FILE = "draft_tree.json"
SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # tree sizes tried (up to --nodes)


def check_calibratable(model) -> int:
    """The model's draft depth; an error for models whose heads cannot verify a static tree."""
    heads = getattr(model, "heads", None)
    if heads is None or model.n_future < 2:
        raise MtplabError("calibrate needs a model with draft heads")
    if heads.drafter(model, 1, 8) is not None:
        raise MtplabError("calibrate picks a static tree for heads that all read one position (parallel, "
                          "medusa, slots); sequential heads draft depth after depth and decode with a chain")
    return model.n_future - 1


@torch.no_grad()
def rank_paths(model: Transformer, sequences: list[tuple[list[int], list[int]]], depth: int,
               max_rank: int = 8) -> tuple[Counter, int]:
    """Over every position of the continuations that has `depth` decoded tokens after the next
    one: how many positions' rank paths start with each path, and how many positions there were.
    `sequences`: (prompt, greedy continuation) pairs."""
    counts, positions = Counter(), 0
    window = model.config.max_seq_len
    for prompt, continuation in sequences:
        ids = (prompt + continuation)[-window:]
        first = max(0, len(ids) - len(continuation) - 1)  # the prompt's last position: the first draft
        last = len(ids) - 2 - depth  # head `depth` at t predicts ids[t + 1 + depth]
        if last < first:
            continue
        logits = model(torch.tensor([ids], device=model.device), n_heads=depth + 1)  # (1+depth) x [1, T, V]
        for t in range(first, last + 1):
            positions += 1
            path: tuple[int, ...] = ()
            for k in range(1, depth + 1):
                row = logits[k][0, t].float()
                rank = int((row > row[ids[t + 1 + k]]).sum())
                if rank >= max_rank:
                    break
                path += (rank,)
                counts[path] += 1
    return counts, positions


def best_tree(counts: Counter, n: int) -> DraftTree | None:
    """The n most frequent paths (ties: shallower, then lower ranks first), None when none was seen."""
    paths = sorted(counts, key=lambda p: (-counts[p], len(p), p))[:n]
    return DraftTree(tuple(paths)) if paths else None


def expected_tokens_per_forward(tree: DraftTree, counts: Counter, positions: int) -> float:
    return 1.0 + sum(counts[p] for p in tree.paths) / max(positions, 1)


@torch.no_grad()
def step_seconds(model: Transformer, prompts: list[list[int]], batch_size: int,
                 trees: dict[str, DraftTree | None], max_new_tokens: int, passes: int = 3) -> dict[str, float]:
    """Per tree (None: plain decoding), the lower quartile of the times of one decoding step with
    `batch_size` rows decoding to the token limit (so the batch stays full). Other work on the
    machine only ever adds time, hence a low quantile; the trees take turns, pass after pass, so a
    machine whose speed drifts slows them alike."""
    times: dict[str, list[float]] = {name: [] for name in trees}
    for r in range(passes + 1):  # the first pass warms up
        for name, tree in trees.items():
            n_draft = tree.depth if tree is not None else 0
            engine = Engine(model, max_batch=batch_size, n_draft=n_draft, tree=tree)
            for i in range(batch_size):
                engine.submit(Request(prompts[(r * batch_size + i) % len(prompts)], max_new_tokens,
                                      n_draft=n_draft))
            engine.step()  # the prefill
            while engine.busy:
                t0 = time.perf_counter()
                engine.step()
                if r:
                    times[name].append(time.perf_counter() - t0)
    return {name: statistics.quantiles(ts, n=4)[0] if len(ts) > 1 else ts[0] for name, ts in times.items()}


def calibrate(model: Transformer, prompts: list[list[int]], eos_id: int | None, max_nodes: int = 32,
              batch_size: int = 1, max_new_tokens: int = 64, max_rank: int = 8, progress=print) -> dict:
    """Measure, compare and choose (see the module's docstring): the report `draft_tree.json` holds."""
    depth = check_calibratable(model)
    if max_nodes < 1:
        raise MtplabError(f"--nodes must be >= 1, got {max_nodes}")
    if batch_size < 1:
        raise MtplabError(f"--batch-size must be >= 1, got {batch_size}")
    if not prompts:
        raise MtplabError("calibrate needs at least one prompt")
    progress(f"continuing {len(prompts)} prompts greedily ({max_new_tokens} new tokens at most)")
    done = list(decode_batch(model, prompts, max_new_tokens, eos_id=eos_id, speculative=False))
    counts, positions = rank_paths(model, [(c.prompt_ids, c.ids) for c in done], depth, max_rank)
    if not positions:
        raise MtplabError(f"the continuations are too short to measure {depth} draft heads: use more or "
                          "longer prompts, or a larger --max-new-tokens")
    candidates = {f"chain {d}": DraftTree.chain(d) for d in range(1, depth + 1)}
    for n in sorted({s for s in SIZES if s <= max_nodes} | {max_nodes}):
        tree = best_tree(counts, n)
        if tree is not None and tree not in candidates.values():
            candidates[f"tree {tree.size}"] = tree
    progress(f"timing plain decoding and {len(candidates)} trees at batch {batch_size}")
    seconds = step_seconds(model, [c.prompt_ids for c in done], batch_size, {"plain": None, **candidates},
                           max_new_tokens)
    plain = seconds["plain"]
    rows = []
    for name, tree in candidates.items():
        tau = expected_tokens_per_forward(tree, counts, positions)
        rows.append({"candidate": name, "nodes": tree.size, "depth": tree.depth, "tree": str(tree),
                     "expected_tokens_per_forward": round(tau, 4), "step_ms": round(seconds[name] * 1e3, 4),
                     "expected_speedup": round(tau * plain / seconds[name], 4)})
    best = max(rows, key=lambda r: r["expected_speedup"])
    return {"tree": best["tree"], "chosen": best["candidate"], "expected_speedup": best["expected_speedup"],
            "expected_tokens_per_forward": best["expected_tokens_per_forward"],
            "batch_size": batch_size, "plain_step_ms": round(plain * 1e3, 4), "positions": positions,
            "prompts": len(prompts), "max_rank": max_rank,
            "chain_reach_by_depth": [round(counts[(0,) * d] / positions, 4) for d in range(1, depth + 1)],
            "candidates": rows,
            "measured_on": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                           f"{model.device}, load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d')}"}


def format_report(report: dict) -> str:
    lines = [f"{report['positions']} positions of {report['prompts']} greedy continuations; the chain "
             f"reaches depth 1, 2, ... {' '.join(f'{a:.2f}' for a in report['chain_reach_by_depth'])}; batch "
             f"{report['batch_size']}, plain step {report['plain_step_ms']:.2f} ms ({report['measured_on']})",
             f"{'candidate':>10} {'nodes':>5} {'tau':>6} {'step ms':>8} {'x plain':>8}"]
    for r in report["candidates"]:
        mark = "  <- chosen" if r["candidate"] == report["chosen"] else ""
        lines.append(f"{r['candidate']:>10} {r['nodes']:>5} {r['expected_tokens_per_forward']:>6.2f} "
                     f"{r['step_ms']:>8.2f} {r['expected_speedup']:>7.2f}x{mark}")
    lines.append(f"tree: {report['tree']}")
    return "\n".join(lines)


def save_calibration(directory: str | Path, report: dict) -> Path:
    path = Path(directory) / TREE_FILE
    atomic_write_text(path, json.dumps(report, indent=1) + "\n")
    return path


def calibrated_tree(directory: str | Path) -> DraftTree | None:
    """The tree `mtplab calibrate` stored with a checkpoint, None when it has none."""
    path = Path(directory) / TREE_FILE
    if not path.is_file():
        return None
    try:
        return DraftTree.parse(json.loads(path.read_text())["tree"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise MtplabError(f"{path}: not a calibration file (rerun mtplab calibrate)") from None


def tree_option(text: str, model, checkpoint: str | Path) -> DraftTree:
    """A `--tree` value's tree for `model` (generate, bench, serve): 'auto' is the tree calibrate
    stored with the checkpoint, else 'default'; 'default', 'chain' or rank paths as DraftTree.named.
    A tree that does not fit the model's heads is an error."""
    if getattr(model, "heads", None) is None or model.n_future < 2:
        raise MtplabError("--tree needs a model with draft heads")
    tree = (calibrated_tree(checkpoint) if text == "auto" else None) or DraftTree.named(
        "default" if text == "auto" else text, model.n_future - 1)
    if tree.depth > model.n_future - 1:
        raise MtplabError(f"the tree {text!r} is {tree.depth} deep; the model has {model.n_future - 1} "
                          "draft heads")
    return tree
