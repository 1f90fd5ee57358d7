"""The `mtplab` command line: a thin layer over the Python API.

Bad input ends with one line on stderr and exit code 2; Ctrl-C with exit code 130.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections import Counter

from .architectures import architecture_of, registered
from .errors import MtplabError
from .version import __version__


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _add_think_loops(p: argparse.ArgumentParser) -> None:
    p.add_argument("--think-loops", type=int, default=None, metavar="N",
                   help="looped trunks: run the shared layers N times (same weights; default: as trained)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtplab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mtplab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_arguments(sub.add_parser("train", help="train a model from a TOML recipe"))
    _generate_arguments(sub.add_parser("generate", help="generate text from a checkpoint"))
    _chat_arguments(sub.add_parser("chat", help="talk to a checkpoint in the terminal (streams the answer)"))
    _serve_arguments(sub.add_parser("serve", help="OpenAI-compatible API and a chat page that shows drafted tokens"))
    _bench_arguments(sub.add_parser("bench", help="decode the same prompts plain and speculative; compare speed"))
    _calibrate_arguments(sub.add_parser("calibrate", help="choose the draft tree that decodes fastest on this machine; "
                                                          "store it with the checkpoint (--tree auto)"))
    _distill_arguments(sub.add_parser("distill", help="train the draft heads on the model's own answers "
                                                      "(self-distillation: more drafts accepted, head 0 unchanged)"))
    _eval_arguments(sub.add_parser("eval", help="score a checkpoint: GSM8K exact match, loss per head, perplexity"))
    _info_arguments(sub.add_parser("info", help="architecture summary: parameters by part, FLOPs per token"))
    _recipes_arguments(sub.add_parser("recipes", help="the packaged recipes: what each reproduces, parameters, "
                                                      "how to train it"))
    _ablate_arguments(sub.add_parser("ablate", help="AOMTS's nine-run table: TST x MTP heads, reset, cosine"))
    _export_hf_arguments(sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face transformers model "
                                                          "(GPT-2 / Llama natively, else with remote code)"))
    _convert_arguments(sub.add_parser("convert", help="import a GPT-2 / Llama (HF), GELU_GPT (gelu-d12) or "
                                                      "nanochat checkpoint"))
    _export_arguments(sub.add_parser("export", help="write a checkpoint in a published model's own format "
                                                    "(monostep: Monostep's bundle)"))
    _demo_arguments(sub.add_parser("demo", help="train and evaluate on built-in arithmetic problems (minutes, CPU)"))
    return parser


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True,
                   help="a TOML file or a packaged recipe's name (`mtplab recipes` lists them), e.g. tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value (repeatable), e.g. --set train.steps=200")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt")
    which.add_argument("--prompts", metavar="FILE",
                       help="many prompts, decoded in batches: a text file (one prompt per line) or a "
                            "jsonl ({\"question\": ...} in the chat template, or {\"prompt\": ...}); "
                            "writes one jsonl row per prompt: prompt, text, tokens, tau")
    p.add_argument("--batch-size", type=int, default=16, help="--prompts: rows decoded together")
    p.add_argument("--out", default=None, metavar="FILE.jsonl", help="--prompts: write the rows here "
                                                                     "(default: stdout)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt(s) in the chat template")
    p.add_argument("--device", default="cpu")
    p.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=None,
                   help="draft with the extra heads, verify with head 0 (default: on with >1 head)")
    p.add_argument("--n-draft", type=int, default=None, help="draft tokens per step (<= heads - 1)")
    p.add_argument("--tree", nargs="?", const="auto", default=None, metavar="TREE",
                   help="verify a tree of drafts each step: 'auto' (the default with no value: the tree "
                        "`mtplab calibrate` stored, else 'default'), 'default', 'chain', or rank paths "
                        "such as '0 1 0.0 0.1' (node r1.r2: head 1's rank-r1 token, then head 2's rank r2)")
    p.add_argument("--show-drafts", action="store_true",
                   help="mark accepted draft tokens and print speculation stats")
    _add_think_loops(p)
    _add_sampling(p)


def _chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=None)
    _add_think_loops(p)
    _add_sampling(p)


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    p.add_argument("--port", type=int, default=8000, help="0: any free port")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    p.add_argument("--model-name", default=None, help="the model's id in the API (default: directory name)")
    p.add_argument("--max-batch", "--max-active", dest="max_batch", type=int, default=None,
                   help="requests decoded together in one batch (1: one forward per request in turn; "
                        "default: as many as --kv-memory holds, at most 64)")
    p.add_argument("--kv-memory", type=int, default=1024, metavar="MIB",
                   help="KV cache the default --max-batch may fill (MiB)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 429")
    # what one client may cost (mtplab/serve/limits.py); the defaults protect a laptop
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (1 MiB)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longer prompts get 400 (default: the context window less one)")
    p.add_argument("--header-timeout", type=float, default=5.0,
                   help="seconds a client has to send a request's headers, then 408 and closed")
    p.add_argument("--body-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's body, then 408 and closed")
    p.add_argument("--keep-alive", type=float, default=5.0, help="seconds an idle connection stays open")
    p.add_argument("--max-connections", type=int, default=256, help="open connections; more get 503")
    p.add_argument("--device", default="cpu")
    p.add_argument("--think-loops", type=int, default=None, metavar="N",
                   help="looped trunks: the default think loops (a request may set its own: think_loops)")
    p.add_argument("--tree", nargs="?", const="auto", default=None, metavar="TREE",
                   help="requests verify a tree of drafts each step unless they send \"speculative\": "
                        "\"chain\" or \"off\"; TREE as generate's: 'auto' (the default with no value: the "
                        "tree `mtplab calibrate` stored, else 'default'), 'default', 'chain' or rank paths")


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--prompts", help="text file, one prompt per line (.jsonl: \"question\" rows in chat format, "
                                      "or \"prompt\" rows; as generate --prompts reads them)")
    p.add_argument("--chat", action="store_true", help="wrap text-file prompts in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--n-draft", type=int, default=None)
    p.add_argument("--tree", default="auto", metavar="TREE",
                   help="the tree decoded beside plain and chain ('auto': the calibrated one, else "
                        "'default'; 'chain' or rank paths)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="also decode the prompts N rows at a time, plain and speculative (throughput)")
    p.add_argument("--think-loops", default=None, metavar="N[,N...]",
                   help="looped trunks: compare these think-loop counts side by side instead (FLOPs, "
                        "tokens/s plain and speculative)")
    p.add_argument("--data", default=None, help="with --think-loops: also the held-out loss on this "
                                                "file at each count (as `mtplab eval --task loss`)")
    p.add_argument("--limit", type=int, default=None, help="--data: its first N examples (text: N windows)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True,
                   help="held-out prompts, as generate --prompts reads them: a text file (one per line) or "
                        "jsonl (\"question\": chat format, or \"prompt\")")
    p.add_argument("--chat", action="store_true", help="wrap text-file prompts in the chat template")
    p.add_argument("--limit", type=int, default=256, help="prompts measured (the file's first N)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--nodes", type=int, default=32, help="the largest tree tried")
    p.add_argument("--batch-size", type=int, default=1,
                   help="rows decoding together when steps are timed (the best tree depends on it)")
    p.add_argument("--dry-run", action="store_true", help="print the comparison, store nothing")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def _distill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="the new checkpoint directory (the original is kept)")
    p.add_argument("--data", default=None,
                   help="prompts, as generate --prompts reads them: jsonl (question: chat format; prompt) "
                        "or a text file, one per line (default: built-in arithmetic questions, the demo's kind)")
    p.add_argument("--chat", action="store_true", help="wrap text-file prompts in the chat template")
    p.add_argument("--limit", type=int, default=1000, help="prompts used (the file's first N)")
    p.add_argument("--held-out", type=int, default=32,
                   help="of those, the last N are not trained on: tau before and after is measured on them")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16, help="answers per training step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-new-tokens", type=int, default=96, help="longest answer generated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--task", required=True, choices=["gsm8k", "loss", "ppl"])
    p.add_argument("--data", required=True, help="jsonl (question/answer) or, for loss/ppl, a text file")
    p.add_argument("--limit", type=int, default=None, help="first N examples only")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16,
                   help="gsm8k: questions decoded together (the answers do not depend on it)")
    p.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=None,
                   help="gsm8k: decode speculatively (default: on with >1 head; the answers are the same)")
    p.add_argument("--out", default=None, help="gsm8k: per-example jsonl (default CHECKPOINT/eval_gsm8k.jsonl)")
    p.add_argument("--long-examples", choices=["window", "truncate", "skip"], default="window",
                   help="loss on a jsonl: examples longer than the context are scored with a sliding "
                        "window (default, as ppl), cut from the left, or skipped")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a recipe (a .toml file or a packaged recipe's name) or a checkpoint directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value (a checkpoint: model.* only, e.g. model.n_think_loops=4)")
    p.add_argument("--json", action="store_true")


def _recipes_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON list")


def _ablate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a TOML file or a packaged recipe's name, e.g. aomts-ablation")
    p.add_argument("--out", required=True, help="directory: one run per row, ablation.md/.json, plot")
    p.add_argument("--steps", type=int, default=None, help="steps per row (default: the recipe's)")
    p.add_argument("--rows", default=None, help="comma-separated row names (default: all nine)")
    p.add_argument("--data", default=None, help="text corpus to train on (default: the recipe's data)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--quiet", action="store_true")


def _export_hf_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--format", choices=["native", "remote", "auto"], default="auto",
                   help="native: GPT2LMHeadModel / LlamaForCausalLM + the heads beside them, no remote "
                        "code; remote: mtplab's code (any trunk); auto (default): native if the trunk fits")
    p.add_argument("--out", required=True, help="directory to write (built beside it, then renamed)")
    p.add_argument("--deepseek-layout", action="store_true",
                   help="sequential heads: store the MTP modules DeepSeek-V3 style, model.layers.{n+j}")
    p.add_argument("--force", action="store_true", help="replace --out if it is not empty")


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", metavar="FORMAT", help="gpt2 | gelu-d12 | nanochat | monostep | hf")
    p.add_argument("source", help="the checkpoint directory (or file) to read")
    p.add_argument("--out", required=True, help="mtplab checkpoint directory to write")
    p.add_argument("--heads", type=int, default=None,
                   help="gpt2: parallel heads (1 keeps GPT-2; the MTP GPT-2: 4 = trunk 0-8, "
                        "heads 9,10,11,11)")
    p.add_argument("--head-blocks", default=None, metavar="B,B,...",
                   help="gpt2: the source block each head starts from, e.g. 9,10,11,11")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json or a directory with one (default: beside the checkpoint)")
    p.add_argument("--eos", default=None, help="end-of-text token (default: the tokenizer's usual one)")
    p.add_argument("--rope-base", type=float, default=None,
                   help="gelu-d12, nanochat: RoPE base (default: the config's, else 100000)")
    p.add_argument("--step", type=int, default=None, help="nanochat: model_<step>.pt (default: highest)")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=[a.name for a in registered() if a.export])
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="the file to write, e.g. monostep_bundle.pt")


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--distill-steps", type=int, default=80,
                   help="self-distill the draft heads for N steps after training (0: not at all)")
    p.add_argument("--quiet", action="store_true")


def cmd_train(args) -> None:
    from . import train

    result = train(args.recipe, args.out, args.overrides, resume=args.resume, progress=not args.quiet)
    if not result.main:  # another rank of a torchrun job: rank 0 reports
        return
    if result.stopped_by:
        print(f"mtplab: stopped by {result.stopped_by} at step {result.step}; checkpoint saved in "
              f"{result.out_dir}; continue with the same command plus --resume", file=sys.stderr)
        signum = getattr(signal.Signals, result.stopped_by, signal.SIGTERM)
        raise SystemExit(128 + signum)
    if result.nonfinite_steps:
        print(f"mtplab: {result.nonfinite_steps} step(s) skipped for a non-finite loss or gradient",
              file=sys.stderr)
    losses = ", ".join(f"head {k} {l:.3f}" for k, l in enumerate(result.eval_head_losses))
    start = f"from step {result.resumed_from} " if result.resumed_from is not None else ""
    limit = " (train.time_limit reached)" if result.time_limited else ""
    side = result.seconds - result.train_seconds
    print(f"trained {start}to step {result.step} in {result.train_seconds:.1f} s of training steps{limit}, "
          f"plus {side:.1f} s evaluating and saving; held-out loss: {losses}; checkpoint: {result.out_dir}")


def check_batch_size(value: int | None) -> None:
    if value is not None and value < 1:
        raise MtplabError(f"--batch-size must be >= 1, got {value}")


def set_think_loops(model, loops: int | None, checkpoint: str) -> None:
    """--think-loops: a looped trunk runs its shared layers `loops` times; the weights stay."""
    from .config import check_think_loops

    if loops is not None:
        check_think_loops(model.config, loops, checkpoint)
        model.n_think_loops = loops


def parse_loop_counts(text: str) -> list[int]:
    """bench's `--think-loops 1,2,4` -> [1, 2, 4]."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise MtplabError(f"--think-loops expects N or N,N,... (whole numbers), got {text!r}") from None
    if len(set(counts)) != len(counts):
        raise MtplabError(f"--think-loops lists a count twice: {text!r}")
    return counts


def load_prompt_file(path: str, tokenizer, chat: bool) -> tuple[list[str], list[list[int]]]:
    """`generate --prompts`: the prompts of a text file (one per non-blank line; `chat` wraps them
    in the template) or a jsonl file (`question`: chat template; `prompt`: as `chat` says), as
    texts and token ids. Errors name the file, and the line where there is one."""
    import json
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise MtplabError(f"prompts file not found: {path}")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise MtplabError(f"{path}: not UTF-8 text") from None
    texts, ids = [], []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not path.endswith(".jsonl"):
            texts.append(line)
            ids.append(tokenizer.encode(tokenizer.chat_prompt(line) if chat else line))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MtplabError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        key = next((k for k in ("question", "prompt") if isinstance(row, dict) and k in row), None)
        if key is None or not isinstance(row[key], str) or not row[key].strip():
            raise MtplabError(f'{path}:{lineno}: expected a non-empty string field "question" or "prompt"')
        text = row[key]
        texts.append(text)
        ids.append(tokenizer.encode(tokenizer.chat_prompt(text) if key == "question" or chat else text))
    if not texts:
        raise MtplabError(f"{path}: no prompts")
    return texts, ids


def generate_many(args, model, tokenizer, params) -> None:
    """`generate --prompts`: one jsonl row per prompt, in input order, to stdout or --out."""
    import json
    import time
    from pathlib import Path

    from .inference.decode import decode_batch
    from .atomic import atomic_write_text

    texts, ids = load_prompt_file(args.prompts, tokenizer, args.chat)
    t0 = time.perf_counter()
    rows, tokens, decoded, forwards = [], 0, 0, 0
    for c in decode_batch(model, ids, args.max_new_tokens, params, tokenizer.eos_id, args.batch_size,
                          args.speculative, args.n_draft, tokenizer, progress=True, desc="generating",
                          tree=draft_tree(args.tree, model, args.checkpoint)):
        line = json.dumps({"prompt": texts[c.index], "text": c.text, "tokens": c.tokens,
                           "tau": round(c.tau, 4)})
        tokens, decoded, forwards = tokens + c.tokens, decoded + c.stats.decoded, forwards + c.stats.forwards
        if args.out is None:
            print(line, flush=True)
        else:
            rows.append(line + "\n")
    if args.out is not None:
        atomic_write_text(Path(args.out), "".join(rows))
        seconds = time.perf_counter() - t0
        print(f"wrote {len(rows)} rows to {args.out}: {tokens} tokens in {seconds:.1f} s "
              f"({tokens / max(seconds, 1e-9):.1f} tokens/s, batch {args.batch_size}), "
              f"{decoded / max(forwards, 1):.2f} tokens per decoding forward")


def draft_tree(text: str | None, model, checkpoint: str):
    """--tree's tree for `model` (None without the flag; see calibrate.tree_option)."""
    from .inference.calibrate import tree_option

    return None if text is None else tree_option(text, model, checkpoint)


def cmd_generate(args) -> None:
    from .inference.decode import TextDecoder, decode
    from .inference.sampling import SamplingParams
    from .inference.speculative import SpeculativeStats
    from .models.checkpoint import load_model

    check_batch_size(args.batch_size)
    if args.out is not None and args.prompts is None:
        raise MtplabError("--out goes with --prompts (a single --prompt prints its text)")
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    model, tokenizer = load_model(args.checkpoint, args.device)
    set_think_loops(model, args.think_loops, args.checkpoint)
    if args.prompts is not None:
        return generate_many(args, model, tokenizer, params)
    text = tokenizer.chat_prompt(args.prompt) if args.chat else args.prompt
    stats = SpeculativeStats()
    mark = ("\033[32;4m", "\033[0m") if sys.stdout.isatty() else ("[", "]")
    decoder = TextDecoder(tokenizer)
    branches = Counter()  # tree steps: the accepted branch (deepest accepted node) -> steps
    for event in decode(model, tokenizer.encode(text), args.max_new_tokens, params, tokenizer.eos_id,
                        args.speculative, args.n_draft, stats, draft_tree(args.tree, model, args.checkpoint)):
        if event.branch is not None:
            branches[".".join(map(str, event.branch)) or "none"] += 1
        for token, accepted in zip(event.tokens, event.accepted):
            piece = decoder.feed([token])
            sys.stdout.write(f"{mark[0]}{piece}{mark[1]}" if accepted and args.show_drafts and piece
                             else piece)
        sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")
    if args.show_drafts and stats.forwards:
        acc = " ".join(f"{a:.2f}" for a in stats.acceptance_by_position)
        print(f"{stats.tokens} tokens: the prompt's forward, then {stats.forwards} decoding forwards at "
              f"{stats.tokens_per_forward:.2f} tokens/forward (tau), {stats.tokens_per_second:.1f} tokens/s; "
              f"acceptance by draft position: {acc}", file=sys.stderr)
        if branches:
            taken = ", ".join(f"{b} x{n}" for b, n in branches.most_common())
            print(f"tree branches taken (the deepest accepted node, as ranks; none: no draft): {taken}",
                  file=sys.stderr)


def cmd_chat(args) -> None:
    from .chat import run_chat
    from .inference.sampling import SamplingParams
    from .models.checkpoint import load_model

    model, tokenizer = load_model(args.checkpoint, args.device)
    set_think_loops(model, args.think_loops, args.checkpoint)
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    run_chat(model, tokenizer, params=params, max_new_tokens=args.max_new_tokens,
             speculative=args.speculative)


def cmd_serve(args) -> None:
    from .serve.limits import Limits
    from .serve.server import serve

    try:
        limits = Limits(args.max_body_bytes, args.max_prompt_tokens, args.header_timeout, args.body_timeout,
                        args.keep_alive, args.max_connections)
    except ValueError as exc:  # "max_body_bytes must be > 0, got 0" -> the flag's name
        raise MtplabError("--" + str(exc).replace("_", "-")) from None

    serve(args.checkpoint, args.host, args.port, args.api_key, args.model_name, args.max_queue,
          args.max_batch, args.device, limits=limits, think_loops=args.think_loops,
          kv_memory_mib=args.kv_memory, tree=args.tree)


def read_prompts(path: str | None, tokenizer, chat: bool) -> list[list[int]]:
    """Prompt token ids from a prompts file (as `generate --prompts` reads it), or built-in held-out
    arithmetic questions without one."""
    from .data.synthetic import make_problems

    if path is None:
        return [tokenizer.encode_chat(p["question"]) for p in make_problems(8, seed=987_654, max_number=20)]
    return load_prompt_file(path, tokenizer, chat)[1]


def cmd_calibrate(args) -> None:
    import json

    from .inference.calibrate import calibrate, format_report, save_calibration
    from .models.checkpoint import load_model

    if args.limit < 1:
        raise MtplabError(f"--limit must be >= 1, got {args.limit}")
    model, tokenizer = load_model(args.checkpoint)
    prompts = read_prompts(args.data, tokenizer, args.chat)[:args.limit]
    say = (lambda *_: None) if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    report = calibrate(model, prompts, tokenizer.eos_id, args.nodes, args.batch_size, args.max_new_tokens,
                       progress=say)
    print(json.dumps(report) if args.json else format_report(report), flush=True)
    if not args.dry_run:
        path = save_calibration(args.checkpoint, report)
        say(f"stored in {path}: generate --tree and bench use it")


def cmd_distill(args) -> None:
    import json
    from pathlib import Path

    from .data.synthetic import make_problems
    from .evaluation.speed import bench_decoding
    from .models.checkpoint import read_config, save_checkpoint, load_model
    from .training.self_distill import distill_heads

    out, source = Path(args.out), Path(args.checkpoint)
    if out.exists() and (out.resolve() == source.resolve() or any(out.iterdir())):
        raise MtplabError(f"{out} exists and is not empty; choose a new --out (the original checkpoint is kept)")
    for flag in ("limit", "steps", "batch_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise MtplabError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not args.lr > 0:
        raise MtplabError(f"--lr must be > 0, got {args.lr}")
    model, tokenizer = load_model(args.checkpoint)
    other = architecture_of(model)
    if other is not None:
        raise MtplabError(f"{args.checkpoint} is a {other.label} model: it {other.decoding}, with no draft heads")
    if model.n_future < 2:
        raise MtplabError(f"{args.checkpoint} has one head: there are no draft heads to distill")
    if args.data is None:
        prompts = [tokenizer.encode_chat(p["question"]) for p in make_problems(args.limit, seed=31_337, max_number=12)]
    else:
        prompts = load_prompt_file(args.data, tokenizer, args.chat)[1][:args.limit]
    if not 0 <= args.held_out < len(prompts):
        raise MtplabError(f"--held-out must be between 0 and {len(prompts) - 1} (there are {len(prompts)} prompts)")
    train_on, held = prompts[:len(prompts) - args.held_out], prompts[len(prompts) - args.held_out:]
    say = (lambda *_: None) if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    drafts = model.n_future - 1
    say(f"distilling the {drafts} draft head{'s' * (drafts > 1)} of {args.checkpoint} on its own greedy answers to "
        f"{len(train_on)} prompts ({len(held)} held out)")

    def measure() -> dict:
        r = bench_decoding(model, held, args.max_new_tokens, tokenizer.eos_id)
        return {k: r[k] for k in ("tokens_per_forward", "speedup", "acceptance_by_position", "identical")}

    before = measure() if held else None
    report = distill_heads(model, train_on, tokenizer.eos_id, args.steps, args.batch_size, args.lr,
                           args.max_new_tokens, args.seed, progress=not (args.quiet or args.json)).as_dict()
    result = {"checkpoint": args.checkpoint, "out": str(out), **report, "before": before,
              "after": measure() if held else None}
    run = dict(read_config(args.checkpoint).get("run") or {})
    run["self_distill"] = {"from": args.checkpoint, "steps": args.steps, "batch_size": args.batch_size,
                           "lr": args.lr, "prompts": len(train_on), "seed": args.seed}
    save_checkpoint(out, model, tokenizer, run, files={"distill.json": json.dumps(result, indent=2) + "\n"})
    if args.json:
        print(json.dumps(result))
        return
    print(f"answers: {report['answers']} ({report['answer_tokens']:,} tokens, {report['generate_seconds']:.0f} s); "
          f"{args.steps} steps in {report['train_seconds']:.0f} s, KL {report['first_loss']:.3f} -> "
          f"{report['last_loss']:.3f}")
    if held:
        b, a = result["before"], result["after"]
        accept = lambda r: " ".join(f"{x:.2f}" for x in r["acceptance_by_position"])  # noqa: E731
        print(f"held-out tau {b['tokens_per_forward']:.2f} -> {a['tokens_per_forward']:.2f}, speed-up over "
              f"plain {b['speedup']:.2f}x -> {a['speedup']:.2f}x, acceptance by draft position "
              f"{accept(b)} -> {accept(a)}; output identical to plain greedy: {str(a['identical']).lower()}")
    print(f"wrote {out} (head 0 unchanged; run `mtplab calibrate {out}` to re-pick its draft tree)")


def cmd_bench(args) -> None:
    import json

    from .evaluation.speed import bench_decoding, format_bench
    from .models.checkpoint import load_model

    check_batch_size(args.batch_size)
    model, tokenizer = load_model(args.checkpoint)
    if args.think_loops is not None:
        return bench_think_loops(args, model, tokenizer)
    if args.data is not None or args.limit is not None:
        raise MtplabError("--data and --limit go with --think-loops (the loss at each count)")
    other = architecture_of(model)
    if other is not None:
        raise MtplabError(f"{args.checkpoint} is a {other.label} model: it {other.decoding}, with nothing "
                          "to compare speculation against")
    if model.n_future < 2:
        raise MtplabError(f"{args.checkpoint} has one head: nothing to draft with")
    prompts = read_prompts(args.prompts, tokenizer, args.chat)
    result = bench_decoding(model, prompts, args.max_new_tokens, tokenizer.eos_id, args.n_draft,
                            args.batch_size, draft_tree(args.tree, model, args.checkpoint))
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    else:
        print(format_bench(result))


def bench_think_loops(args, model, tokenizer) -> None:
    """`bench --think-loops 1,2,4 [--data FILE]`: the loop counts side by side."""
    import json

    from .config import check_think_loops
    from .evaluation.tasks import evaluate_task
    from .evaluation.think_loops import compare_think_loops, format_think_loops

    counts = parse_loop_counts(args.think_loops)
    for loops in counts:
        check_think_loops(model.config, loops, args.checkpoint)
    if args.batch_size is not None:
        raise MtplabError("--batch-size does not go with --think-loops (its rows decode one at a time)")

    def loss(m) -> float:  # head 0's (next-token) mean cross-entropy, nats/token
        return evaluate_task(m, tokenizer, "loss", args.data, args.limit)[0]["head_losses"][0]

    result = compare_think_loops(model, read_prompts(args.prompts, tokenizer, args.chat), counts,
                                 args.max_new_tokens, tokenizer.eos_id, args.n_draft,
                                 loss if args.data is not None else None)
    print(json.dumps(result) if args.json else format_think_loops(result))


def cmd_eval(args) -> None:
    import json
    from pathlib import Path

    from .evaluation.tasks import evaluate_task
    from .models.checkpoint import load_model

    check_batch_size(args.batch_size)
    model, tokenizer = load_model(args.checkpoint)
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval_gsm8k.jsonl"
    result, summary = evaluate_task(model, tokenizer, args.task, args.data, args.limit,
                                    args.max_new_tokens, out, progress=True, batch_size=args.batch_size,
                                    speculative=args.speculative, long=args.long_examples)
    print(json.dumps(result) if args.json else summary)


def cmd_info(args) -> None:
    import json
    from pathlib import Path

    from .config import find_recipe, load_config, model_config_from_dict, parse_override
    from .models.checkpoint import read_config
    from .models.summary import card_parameters, format_summary, summarize

    if Path(args.source).is_dir():
        raw = read_config(args.source)["model"]
        for text in args.overrides:  # e.g. model.n_think_loops=4: what more think loops cost
            (section, key), value = parse_override(text)
            if section != "model":
                raise MtplabError(f"--set {text}: a checkpoint's summary takes model.* settings only")
            raw[key] = value
        config = model_config_from_dict(raw, f"{args.source}/config.json")
        card = None
    else:
        recipe = load_config(args.source, args.overrides)
        config = recipe.model.sized_for(recipe.tokenizer)  # as training sizes it from the tokenizer
        card = find_recipe(args.source).stem  # a recipe with a card: the card's count, explained
    summary = summarize(config)
    if card and (explained := card_parameters(card, summary, config)):
        summary["card"] = explained
    print(json.dumps({"mtplab_version": __version__, **summary}) if args.json
          else format_summary(summary, config))


# What trains a packaged recipe, where it is not `mtplab train --recipe NAME --out runs/NAME`.
TRAIN_COMMANDS = {"demo": "mtplab demo",  # trains demo.toml, then evaluates it
                  "aomts-ablation": "mtplab ablate aomts-ablation --out runs/ablation"}  # nine runs


def cmd_recipes(args) -> None:
    import json

    from .config import load_config, packaged_recipes, recipe_summary
    from .models.summary import summarize

    rows = []
    for name, path in packaged_recipes().items():
        recipe = load_config(path)
        rows.append({"name": name, "what": recipe_summary(path),
                     # sized to the tokenizer as `mtplab info` sizes it
                     "parameters": summarize(recipe.model.sized_for(recipe.tokenizer))["parameters"],
                     "train": TRAIN_COMMANDS.get(name, f"mtplab train --recipe {name} --out runs/{name}"),
                     "path": str(path)})
    if args.json:
        print(json.dumps(rows))
        return
    name_w = max(len(r["name"]) for r in rows)
    train_w = max(len(r["train"]) for r in rows)
    print(f"{'recipe':<{name_w}}  {'parameters':>11}  {'train it with':<{train_w}}  what it is")
    for r in rows:
        print(f"{r['name']:<{name_w}}  {r['parameters']:>11,}  {r['train']:<{train_w}}  {r['what']}")


def cmd_ablate(args) -> None:
    from .ablation import run_ablation

    report = run_ablation(args.recipe, args.out, args.steps, args.rows, args.data, args.overrides,
                          progress=not args.quiet)
    print(open(f"{args.out}/ablation.md").read(), end="")
    del report


def cmd_export_hf(args) -> None:
    from .interop.hf_export import export

    out, written = export(args.checkpoint, args.out, args.format, args.deepseek_layout, args.force)
    native = written == "native"
    print(f"exported {args.checkpoint} to {out} ({'native' if native else 'remote code'}); load it with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code={native is False})"
          + ("; `mtplab convert hf` reads it back, every head included" if native else ""))


def cmd_convert(args) -> None:
    from .interop.convert import ConvertOptions, convert, parse_blocks

    options = ConvertOptions(heads=args.heads, tokenizer=args.tokenizer, eos=args.eos,
                             rope_base=args.rope_base, step=args.step,
                             head_blocks=None if args.head_blocks is None else parse_blocks(args.head_blocks))
    result = convert(args.format, args.source, args.out, options)
    for note in result.notes:
        print(note)
    print(result.report.summary())
    model = result.model
    print(f"wrote {args.out}: {model.num_parameters():,} parameters, {model.n_future} head"
          f"{'s' if model.n_future > 1 else ''}")


def cmd_export(args) -> None:
    from .architectures import named

    export = named(args.format)
    out = export.export(args.checkpoint, args.out)
    print(f"wrote {export.exported} {out}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    if args.distill_steps < 0:
        raise MtplabError(f"--distill-steps must be >= 0, got {args.distill_steps}")
    run_demo(args.out, args.overrides, progress=not args.quiet, distill_steps=args.distill_steps)


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve,
            "bench": cmd_bench, "calibrate": cmd_calibrate, "eval": cmd_eval, "distill": cmd_distill, "info": cmd_info, "recipes": cmd_recipes,
            "demo": cmd_demo, "ablate": cmd_ablate, "export-hf": cmd_export_hf,
            "export": cmd_export, "convert": cmd_convert}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except MtplabError as exc:
        print(f"mtplab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nmtplab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
