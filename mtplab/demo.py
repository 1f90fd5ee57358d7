"""`mtplab demo`: the whole job on the embedded default, on a laptop CPU, in minutes.

Generates arithmetic word problems, trains a byte-level BPE and a small model with four parallel
heads, saves the checkpoint and loss plot, then answers held-out problems and reports accuracy.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .atomic import atomic_write_text
from .config import load_config
from .errors import MtplabError
from .evaluation.exact_match import evaluate_answers
from .evaluation.speed import bench_decoding
from .inference.decode import generate
from .data.synthetic import make_problems
from .inference.tree import DraftTree
from .models.checkpoint import read_config, save_checkpoint
from .training.run import pick_device
from .training.self_distill import distill_heads
from .training.trainer import train

RECIPES = Path(__file__).parent / "recipes"


def _fresh_dir(out: Path) -> None:
    """Reuse a previous demo's directory, but never wipe a directory that is not an mtplab run."""
    if out.exists():
        if any(out.iterdir()) and not (out / "config.json").is_file():
            raise MtplabError(f"{out} exists and is not an mtplab run; choose another --out")
        shutil.rmtree(out)


def run_demo(out_dir: str | Path = "runs/demo", overrides: list[str] = (), progress: bool = True,
             n_answer: int | None = None, say=print, distill_steps: int = 80, distill_prompts: int = 1000) -> dict:
    """Train, answer the held-out problems, then (distill_steps > 0) self-distill the draft heads on
    the model's own answers to `distill_prompts` new questions, and measure decoding speed."""
    start = time.perf_counter()
    out = Path(out_dir)
    config = load_config(RECIPES / "demo.toml", list(overrides))
    _fresh_dir(out)
    c = config
    device = "a GPU" if pick_device(c.train.device).type == "cuda" else "the CPU"
    say(f"mtplab demo: {c.data.n_train:,} made-up arithmetic word problems (1 to {c.data.max_steps} steps "
        f"each); training a model with {c.model.n_future} {c.model.mtp} heads on {device}: {c.train.steps} "
        f"steps of {c.train.batch_size} problems")
    result = train(config, out, progress=progress)
    model, tokenizer = result.model.eval(), result.dataset.tokenizer
    train_seconds = time.perf_counter() - start

    problems = result.dataset.eval_examples[:n_answer]
    report = evaluate_answers(model, tokenizer, problems, max_new_tokens=96, progress=progress)
    atomic_write_text(out / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in report.pop("rows")))
    summary = {
        "parameters": model.num_parameters(),
        "train_seconds": round(train_seconds, 1),  # data, tokenizer, training steps and evaluations
        "train_step_seconds": round(result.train_seconds, 1),  # the training steps alone
        "final_train_loss_per_head": [round(x, 4) for x in result.head_losses],
        "final_eval_loss_per_head": [round(x, 4) for x in result.eval_head_losses],
        "held_out_accuracy": report["accuracy"],
        "held_out_accuracy_by_steps": report["accuracy_by_steps"],
        "held_out_problems": report["n"],
    }
    prompts = [tokenizer.encode_chat(p["question"]) for p in problems[:16]]
    if distill_steps > 0:  # the heads learn head 0's own answers: more drafts pass, answers unchanged
        before = bench_decoding(model, prompts, max_new_tokens=96, eos_id=tokenizer.eos_id)
        questions = make_problems(distill_prompts, seed=31_337, max_steps=c.data.max_steps,
                                  max_number=c.data.max_number)
        say(f"self-distilling the draft heads on the model's own answers to {len(questions):,} new questions")
        distilled = distill_heads(model, [tokenizer.encode_chat(q["question"]) for q in questions],
                                  tokenizer.eos_id, steps=distill_steps, progress=progress)
        run = dict(read_config(out).get("run") or {})
        run["self_distill"] = {"steps": distill_steps, "prompts": len(questions)}
        # the top-level files become the distilled model; checkpoints/step-N keeps the trained one
        save_checkpoint(out, model, tokenizer, run, step=result.step)
        summary.update({"distill_seconds": round(distilled.generate_seconds + distilled.train_seconds, 1),
                        "tokens_per_forward_before_distill": before["tokens_per_forward"],
                        "speedup_before_distill": before["speedup"]})
    tree = DraftTree.default(model.n_future - 1)
    speed = bench_decoding(model, prompts, max_new_tokens=96, eos_id=tokenizer.eos_id, tree=tree)
    summary.update({k: speed[k] for k in ("plain_tokens_per_s", "speculative_tokens_per_s", "speedup",
                                          "tokens_per_forward", "acceptance_by_position", "identical",
                                          "tree", "tree_speedup", "tree_tokens_per_forward", "tree_identical")})
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=2) + "\n")

    say("")
    say(f"model: {summary['parameters'] / 1e6:.2f}M parameters, {result.train_seconds:.0f} s of training steps "
        f"({train_seconds:.0f} s with the data, the tokenizer and the held-out losses)")
    for k, (tr, ev) in enumerate(zip(result.head_losses, result.eval_head_losses)):
        say(f"  head {k} (predicts t+{k + 1}): train loss {tr:.3f}, held-out loss {ev:.3f}")
    say(f"held-out exact-match accuracy: {report['accuracy']:.1%} of {report['n']} problems")
    for steps, acc in report["accuracy_by_steps"].items():
        say(f"  {steps}-step problems: {acc:.1%}")
    acc = " ".join(f"{a:.2f}" for a in speed["acceptance_by_position"])
    say(f"speculative decoding with the {model.n_future - 1} extra heads: {speed['speedup']:.2f}x tokens/s "
        f"({speed['speculative_tokens_per_s']:.0f} vs {speed['plain_tokens_per_s']:.0f} plain), "
        f"{speed['tokens_per_forward']:.2f} tokens per decoding forward, acceptance by draft position {acc}, "
        f"output identical to plain greedy: {str(speed['identical']).lower()}")
    if distill_steps > 0:
        say(f"  the draft heads self-distilled ({summary['distill_seconds']:.0f} s): tau "
            f"{summary['tokens_per_forward_before_distill']:.2f} -> {speed['tokens_per_forward']:.2f}, speed-up "
            f"{summary['speedup_before_distill']:.2f}x -> {speed['speedup']:.2f}x (mtplab distill does this for any checkpoint)")
    say(f"  with a tree of {tree.size} drafts instead of the chain: {speed['tree_speedup']:.2f}x tokens/s, "
        f"{speed['tree_tokens_per_forward']:.2f} tokens per decoding forward, identical: "
        f"{str(speed['tree_identical']).lower()} (mtplab calibrate picks the faster one for a machine)")
    sample = problems[0]
    say(f"\nexample  Q: {sample['question']}")
    say("         A: " + generate(model, tokenizer, sample["question"], chat=True,
                                  max_new_tokens=96).replace("\n", "\n            "))
    say(f"\ncheckpoint, loss plot and per-problem answers in {out}/ "
        f"(total {summary['wall_seconds']:.0f} s)")
    say(f"try: mtplab generate {out} --chat --prompt \"Ava has 12 apples. Then Ava buys 5 more "
        "apples. How many apples does Ava have now?\"")
    return summary
