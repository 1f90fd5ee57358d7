"""Seed 000 three ways, at equal wall-clock on this machine: the faithful Monostep (pooled encoder,
one (prefix, block) sample per row), the same slots on mtplab's causal trunk (every block start of a
sequence in one pass), and that trunk with 4 parallel one-block heads.

Each run is `mtplab train` on GSM8K's train split with train.time_limit = --budget seconds (the run
ends there as if finished: evaluated and saved). Then all three are scored on GSM8K test questions with
seed 000's metric (mean cross-entropy of the next 4-token block from every block start, <empty>
unscored; see mtplab/monostep/metric.py), and decode the same questions greedily.

    python benchmarks/seed000_comparison.py --budget 600 --out runs/seed000-comparison
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtplab.monostep.data import BlockBatches  # noqa: E402
from mtplab.data.pipeline import chat_pairs  # noqa: E402
from mtplab.data.qa import load_qa_jsonl  # noqa: E402
from mtplab.monostep.metric import causal_block_loss, monostep_block_loss  # noqa: E402
from mtplab.evaluation.exact_match import is_correct  # noqa: E402
from mtplab.inference.decode import decode  # noqa: E402
from mtplab.inference.speculative import SpeculativeStats  # noqa: E402
from mtplab.models.checkpoint import load_model  # noqa: E402
from mtplab.monostep.model import Monostep  # noqa: E402

SYSTEMS = {  # name: (run directory, recipe, overrides)
    "monostep (faithful)": ("monostep", "monostep-gsm8k.toml", []),
    "causal + 4 slots": ("slots", "slots-gsm8k.toml", []),
    "causal + 4 parallel heads": ("parallel", "slots-gsm8k.toml", ["model.mtp=parallel", "model.head_layers=1"]),
}
SLOTS = 4


def train_for(budget: float, recipe: str, overrides: list[str], out: Path, data: dict) -> None:
    """`mtplab train` with train.time_limit = budget: the run evaluates and saves when time is up."""
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time
    sets = [f"data.path={data['train']}", f"data.eval_path={data['test']}", f"tokenizer.path={data['tokenizer']}",
            "train.steps=1000000", "train.epochs=1000", "train.eval_every=1000000", "train.eval_batches=1",
            f"train.time_limit={budget}"]
    cmd = [sys.executable, "-m", "mtplab", "train", "--recipe", str(ROOT / "recipes" / recipe), "--out", str(out),
           "--quiet"] + [a for s in sets + overrides for a in ("--set", s)]
    subprocess.run(cmd, cwd=ROOT, check=True)


def trained_steps(out: Path) -> int:
    return json.loads((out / "config.json").read_text())["step"]


@torch.no_grad()
def decode_questions(model, tokenizer, questions: list[dict], max_new_tokens: int) -> dict:
    tokens = decoded = forwards = correct = 0
    t0 = time.perf_counter()
    for ex in questions:
        stats = SpeculativeStats()
        out, events = [], 0
        for event in decode(model, tokenizer.encode_chat(ex["question"]), max_new_tokens, eos_id=tokenizer.eos_id,
                            stats=stats):
            out += event.tokens
            events += 1
        tokens += len(out)
        if isinstance(model, Monostep):  # one forward per block, each reading the whole context
            decoded, forwards = decoded + len(out), forwards + events
        else:  # tau: per decoding forward, the prompt's forward apart
            decoded, forwards = decoded + stats.decoded, forwards + stats.forwards
        correct += is_correct(tokenizer.decode(out), ex["answer"])
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": tokens / seconds, "tokens_per_forward": decoded / max(forwards, 1),
            "accuracy": correct / len(questions)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=600, help="training seconds per system")
    parser.add_argument("--out", default="runs/seed000-comparison")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--eval-limit", type=int, default=200, help="GSM8K test examples scored")
    parser.add_argument("--decode-limit", type=int, default=20, help="test questions decoded")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--skip-training", default="", metavar="NAMES",
                        help="comma-separated run directories (monostep, slots, parallel) to score as they are")
    args = parser.parse_args()
    data_dir = Path(args.data)
    data = {"train": data_dir / "gsm8k" / "train.jsonl", "test": data_dir / "gsm8k" / "test.jsonl",
            "tokenizer": data_dir / "tokenizers" / "gpt2"}
    missing = [str(p) for p in data.values() if not p.exists()]
    if missing:
        sys.exit(f"missing: {', '.join(missing)} (pass --data DIR with gsm8k/ and tokenizers/gpt2/)")
    out = Path(args.out)
    train_examples = load_qa_jsonl(data["train"])
    test_examples = load_qa_jsonl(data["test"])
    rows = []
    for name, (directory, recipe, overrides) in SYSTEMS.items():
        run = out / directory
        if directory not in args.skip_training.split(","):
            train_for(args.budget, recipe, overrides, run, data)
        model, tokenizer = load_model(run)
        model.eval()
        pairs = chat_pairs(test_examples[:args.eval_limit], tokenizer)
        steps = trained_steps(run)
        if isinstance(model, Monostep):
            blocks = BlockBatches(pairs, SLOTS, 16, tokenizer.pad_id, model.config.empty_token, model.config.max_seq_len)
            loss = monostep_block_loss(model, blocks)
            samples = steps * 16
        else:
            loss = causal_block_loss(model, pairs, SLOTS)
            train_pairs = chat_pairs(train_examples, tokenizer)
            per_example = sum(math.ceil(len(a) / SLOTS) for _, a in train_pairs) / len(train_pairs)
            samples = steps * 16 * per_example  # block starts trained per step
        speed = decode_questions(model, tokenizer, test_examples[:args.decode_limit], args.max_new_tokens)
        rows.append({"system": name, "parameters": model.num_parameters(), "steps": steps,
                     "samples_per_s": samples / args.budget, "block_loss": loss["loss"],
                     "slot_losses": loss["slot_losses"], **speed})
        print(json.dumps(rows[-1]), flush=True)
    (out / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nGSM8K, {args.budget:.0f} s of training each on this machine; block loss on the first "
          f"{args.eval_limit} test examples, decoding on {args.decode_limit} test questions\n")
    print("| system | parameters | steps | (prefix, block) samples/s | block loss | slot losses | "
          "decode tokens/s | tokens/forward | accuracy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['parameters']:,} | {r['steps']:,} | {r['samples_per_s']:,.0f} | "
              f"{r['block_loss']:.3f} | {' / '.join(f'{x:.2f}' for x in r['slot_losses'])} | "
              f"{r['tokens_per_s']:,.0f} | {r['tokens_per_forward']:.2f} | {r['accuracy']:.1%} |")


if __name__ == "__main__":
    main()
