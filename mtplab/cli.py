"""The `mtplab` command line: a thin layer over the Python API.

Bad input ends with one line on stderr and exit code 2; Ctrl-C with exit code 130.
"""

from __future__ import annotations

import argparse
import sys

from .errors import MtplabError


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtplab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a TOML recipe")
    p.add_argument("--recipe", required=True, help="TOML recipe, e.g. recipes/tiny.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value (repeatable), e.g. --set train.steps=200")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--device", default="cpu")
    _add_sampling(p)

    p = sub.add_parser("demo", help="train and evaluate on built-in arithmetic problems (minutes, CPU)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--quiet", action="store_true")
    return parser


def cmd_train(args) -> None:
    from . import train

    result = train(args.recipe, args.out, args.overrides, resume=args.resume, progress=not args.quiet)
    losses = ", ".join(f"head {k} {l:.3f}" for k, l in enumerate(result.eval_head_losses))
    print(f"trained to step {result.step} in {result.seconds:.1f} s; held-out loss: {losses}; "
          f"checkpoint: {result.out_dir}")


def cmd_generate(args) -> None:
    from .inference.generate import stream
    from .inference.sampling import SamplingParams
    from .interop.checkpoint import load_model

    model, tokenizer = load_model(args.checkpoint, args.device)
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    for delta, _ in stream(model, tokenizer, args.prompt, args.chat, args.max_new_tokens, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, args.overrides, progress=not args.quiet)


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "demo": cmd_demo}


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
