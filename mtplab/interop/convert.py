"""`mtplab convert FORMAT SOURCE --out CKPT`: other projects' checkpoints as mtplab checkpoints.

FORMATS maps a format name to its converter and the format-specific options it reads. A converter
takes (source path, ConvertOptions) and returns a `Converted` (model, tokenizer, key report, notes);
this module checks the options, runs it and writes the checkpoint. To add a format: write
`convert_<name>(source, options) -> Converted` in its own module (sources.py has the shared pieces:
file reading, `SourceWeights`, `assemble`, `load_tokenizer`), add its options to ConvertOptions and
the `convert` parser in cli.py if it has new ones, and register it below. A registered
architecture (architectures.py) brings its own format under its name (e.g. monostep's bundle).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

from ..architectures import registered
from ..errors import MtplabError
from ..models.checkpoint import CHECKPOINTS, TRAINER_STATE, save_checkpoint
from .gpt2 import convert_gpt2
from .hf_native import convert_hf
from .nanochat import convert_gelu_d12, convert_nanochat
from .sources import ConvertOptions, Converted


@dataclass(frozen=True)
class Format:
    convert: Callable[[Path, ConvertOptions], Converted]
    options: frozenset[str]  # the ConvertOptions fields this format reads
    what: str


FORMATS: dict[str, Format] = {
    "gpt2": Format(convert_gpt2, frozenset({"heads", "head_blocks", "tokenizer", "eos"}),
                   "HF GPT-2 directory -> the MTP GPT-2's trunk + parallel heads"),
    "gelu-d12": Format(convert_gelu_d12, frozenset({"tokenizer", "eos", "rope_base"}),
                       "GELU_GPT (gelu-d12) .pt or HF directory -> nanochat-feature trunk"),
    "nanochat": Format(convert_nanochat, frozenset({"tokenizer", "eos", "rope_base", "step"}),
                       "nanochat model_<step>.pt + meta_<step>.json -> nanochat-feature trunk"),
    "hf": Format(convert_hf, frozenset({"tokenizer", "eos"}),
                 "HF GPT-2 / Llama directory (with a native export's mtp_heads: every head) -> mtplab"),
}


def option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def formats() -> dict[str, Format]:
    """Every format: mtplab's own and the registered architectures', before hf (the generic one)."""
    own = dict(FORMATS)
    hf = own.pop("hf")
    brought = {a.name: Format(a.convert, a.convert_options, a.convert_what) for a in registered() if a.convert}
    return {**own, **brought, "hf": hf}


def check_options(fmt: str, options: ConvertOptions) -> Format:
    known = formats()
    if fmt not in known:
        raise MtplabError(f"unknown format {fmt!r}; known: {', '.join(known)}")
    spec = known[fmt]
    given = [f.name for f in fields(options) if getattr(options, f.name) is not None]
    wrong = [name for name in given if name not in spec.options]
    if wrong:
        accepted = ", ".join(option_flag(n) for n in sorted(spec.options)) or "none"
        raise MtplabError(f"{option_flag(wrong[0])} does not apply to {fmt} (its options: {accepted})")
    return spec


def check_out(out: Path) -> None:
    """Refuse an --out that would mix a conversion into something else before doing any work."""
    if out.exists() and not out.is_dir():
        raise MtplabError(f"--out {out} is a file")
    if out.is_dir() and ((out / TRAINER_STATE).exists() or (out / CHECKPOINTS).exists()):
        raise MtplabError(f"--out {out} holds a training run: choose another directory")


def convert(fmt: str, source: str | Path, out: str | Path,
            options: ConvertOptions | None = None) -> Converted:
    """Convert `source` (format `fmt`) and write the mtplab checkpoint directory `out`."""
    options = options or ConvertOptions()
    spec = check_options(fmt, options)
    source, out = Path(source), Path(out)
    if not source.exists():
        raise MtplabError(f"{source}: no such file or directory")
    check_out(out)
    converted = spec.convert(source, options)
    config = converted.model.config
    if not config.vocab_real:  # a source without its own (GPT-2, Llama): the tokenizer's ids are the real ones
        config.vocab_real = converted.tokenizer.vocab_size
    converted.source = {"format": fmt, "path": str(source.resolve()), **converted.source}
    # a new --out appears whole or not at all; an existing one has each file replaced atomically
    save_checkpoint(out, converted.model, converted.tokenizer, {"converted_from": converted.source, **converted.run},
                    converted.trainer_state, files=converted.files)
    return converted


def parse_blocks(text: str) -> list[int]:
    """'9,10,11,11' -> [9, 10, 11, 11]."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise MtplabError(f"--head-blocks expects comma-separated block numbers, got {text!r}") from None


__all__ = ["FORMATS", "formats", "Format", "ConvertOptions", "Converted", "convert", "parse_blocks"]
