"""What every importer shares: reading other projects' weight files without unpickling code, taking
their tensors one by one with shape checks, the key report, and finding a tokenizer.

A converter never loads partially. It asks `SourceWeights.take` for each tensor the mtplab model
needs (a missing or mis-shaped one is a one-line MtplabError), marks the tensors it knows to be
recomputable buffers as ignored, and `assemble` builds the model only when every model tensor has a
value of the right shape. What nothing took is reported as unused.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer

from ..config import ModelConfig
from ..errors import MtplabError
from ..models.checkpoint import load_state
from ..models.transformer import Transformer
from ..tokenizer import Tokenizer

# End-of-text tokens of the tokenizers these checkpoints come with, in the order they are tried:
# GPT-2's, Llama/Mistral's, Llama 3's, Gemma's, and nanochat's document delimiter.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|bos|>")


# -- reading files ----------------------------------------------------------------------------
def torch_load(path: Path, trust_pickle: bool | None = None) -> Any:
    """torch.load with weights_only=True: tensors, dicts, lists and numbers, never arbitrary
    objects (a pickle that needs them is refused rather than executed). Where a format offers
    --trust-pickle (`trust_pickle` not None), True loads the file as it is."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch's message carries terminal colours
        needed = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        why = f"it needs {needed.group(1)}" if needed else (text.strip().splitlines() or ["?"])[0]
        raise MtplabError(f"{path} is not a plain weights file: torch.load(weights_only=True) refused "
                          f"it ({why}); " + ("if you trust the file, pass --trust-pickle" if trust_pickle
                                            is not None else "mtplab does not unpickle arbitrary objects")) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MtplabError(f"{path} is unreadable (truncated or not a torch file?): {why}") from None


def tensor_dict(obj: Any, where: str | Path) -> dict[str, torch.Tensor]:
    """A {name: tensor} state dict, or a clear error naming what the file holds instead."""
    if not isinstance(obj, dict) or not obj:
        raise MtplabError(f"{where} holds {type(obj).__name__}, not a dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise MtplabError(f"{where}: not a dict of tensors ({bad[0]!r} is "
                          f"{type(obj[bad[0]]).__name__})")
    return obj


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MtplabError(f"{path} is unreadable (truncated or corrupt?): {exc}") from None


def read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of an HF-style directory: model.safetensors, its sharded index, or
    pytorch_model.bin. Returns them and the file (or index) they came from."""
    single = directory / "model.safetensors"
    if single.is_file():
        return read_safetensors(single), single
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise MtplabError(f"{index} has no weight_map")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(directory / shard))
        return tensors, index
    binary = directory / "pytorch_model.bin"
    if binary.is_file():
        return tensor_dict(torch_load(binary), binary), binary
    raise MtplabError(f"{directory} has no model.safetensors or pytorch_model.bin")


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MtplabError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(value, dict):
        raise MtplabError(f"{path} does not hold a JSON object")
    return value


def config_int(config: dict[str, Any], key: str, where: str | Path) -> int:
    """A positive integer setting of a source config (layers, heads, widths)."""
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MtplabError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


# -- what a converter receives and returns ----------------------------------------------------
@dataclass
class ConvertOptions:
    """The format-specific options of `mtplab convert`; None means not given. Each format declares
    which of them it reads (convert.formats()), and any other given option is an error."""
    heads: int | None = None  # gpt2: number of parallel heads
    head_blocks: list[int] | None = None  # gpt2: the source block each head starts as
    tokenizer: str | None = None  # a tokenizer.json or a directory with tokenizer files
    eos: str | None = None  # the end-of-text token, when the tokenizer's is not a usual one
    rope_base: float | None = None  # nanochat family: RoPE base (default 100000)
    step: int | None = None  # nanochat: which model_<step>.pt (default: the highest)
    trust_pickle: bool | None = None  # monostep's bundle: unpickle its arbitrary objects (trusted files only)


@dataclass
class Converted:
    model: torch.nn.Module
    tokenizer: Tokenizer
    report: KeyReport
    notes: list[str] = field(default_factory=list)  # how the source was mapped, in words
    source: dict[str, Any] = field(default_factory=dict)  # recorded in config.json
    run: dict[str, Any] = field(default_factory=dict)  # more of config.json's run section
    trainer_state: dict | None = None  # written as trainer_state.pt (e.g. a bundle's optimizer)
    files: dict[str, str] = field(default_factory=dict)  # more text files for the directory


# -- taking tensors ---------------------------------------------------------------------------
@dataclass
class KeyReport:
    unused: list[str] = field(default_factory=list)  # source tensors nothing read
    ignored: dict[str, str] = field(default_factory=dict)  # source key -> why it needs no place
    missing: list[str] = field(default_factory=list)  # model tensors without a source value

    def summary(self) -> str:
        """'unused: a, b; missing: none; ignored: h.{i}.attn.bias x12 (recomputed buffer)'"""
        parts = [f"unused: {', '.join(self.unused) or 'none'}",
                 f"missing: {', '.join(self.missing) or 'none'}"]
        if self.ignored:
            groups: dict[tuple[str, str], int] = {}
            for key, why in self.ignored.items():
                pattern = re.sub(r"\.\d+\.", ".{i}.", key)
                groups[(pattern, why)] = groups.get((pattern, why), 0) + 1
            parts.append("ignored: " + ", ".join(
                f"{pattern}{f' x{n}' if n > 1 else ''} ({why})" for (pattern, why), n in groups.items()))
        return "; ".join(parts)


class SourceWeights:
    """A source state dict that remembers which tensors were taken or deliberately ignored."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: str | Path):
        self.tensors = tensors
        self.where = str(where)
        self.taken: set[str] = set()
        self.ignored: dict[str, str] = {}

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...] | None:
        t = self.tensors.get(name)
        return None if t is None else tuple(t.shape)

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor `name` as float32, which must have exactly `shape`."""
        if name not in self.tensors:
            raise MtplabError(f"{self.where}: missing required weight {name}")
        tensor = self.tensors[name]
        if tuple(tensor.shape) != tuple(shape):
            raise MtplabError(f"{self.where}: {name} has shape {tuple(tensor.shape)}, "
                              f"expected {tuple(shape)}")
        self.taken.add(name)
        return tensor.detach().to(torch.float32)

    def ignore(self, name: str, why: str) -> None:
        """A source tensor that needs no place in the model (a buffer mtplab recomputes)."""
        self.ignored[name] = why

    def report(self) -> KeyReport:
        unused = sorted(k for k in self.tensors if k not in self.taken and k not in self.ignored)
        return KeyReport(unused=unused, ignored=dict(sorted(self.ignored.items())))


def assemble(config: ModelConfig, weights: dict[str, torch.Tensor], where: str | Path) -> Transformer:
    """Build the mtplab model and load `weights` into it, all of them or nothing: a model tensor
    without a value, a value the model has no place for (a converter mapping a tensor to a name
    this model does not have: never dropped) or one with the wrong shape is an error naming it
    (the checkpoint module's strict `load_state`)."""
    model = Transformer(config)
    load_state(model, {k: v.contiguous() for k, v in weights.items()}, where)
    return model.eval()


# -- tokenizers -------------------------------------------------------------------------------
TOKENIZER_HINT = ("pass --tokenizer PATH (a tokenizer.json, or a directory holding one or GPT-2's "
                  "vocab.json + merges.txt)")


def has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (
        (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file())


def load_tokenizer(explicit: str | None, search: list[Path], eos: str | None,
                   model_vocab: int, what: str) -> tuple[Tokenizer, Path]:
    """The tokenizer named by --tokenizer, else the first directory in `search` that holds one.
    Its end-of-text token is --eos or the first of EOS_CANDIDATES it has; no token is added, so
    the ids stay the ones the weights were trained on."""
    if explicit:
        path = Path(explicit)
        if not path.exists():
            raise MtplabError(f"--tokenizer {path}: no such file or directory")
    else:
        found = [d for d in search if d.is_dir() and has_tokenizer(d)]
        if not found:
            pickles = [d / "tokenizer.pkl" for d in search if (d / "tokenizer.pkl").is_file()]
            seen = ", ".join(str(d) for d in dict.fromkeys(search))
            extra = (f" ({pickles[0]} is a tiktoken pickle, which mtplab does not unpickle)"
                     if pickles else "")
            raise MtplabError(f"no tokenizer for {what} in {seen}{extra}: {TOKENIZER_HINT}")
        path = found[0]
    vocab = _tokenizer_vocab(path)
    if eos is not None and eos not in vocab:
        raise MtplabError(f"--eos {eos!r} is not a token of {path}")
    eos = eos or next((t for t in EOS_CANDIDATES if t in vocab), None)
    if eos is None:
        raise MtplabError(f"{path}: the tokenizer has none of the end-of-text tokens "
                          f"{', '.join(EOS_CANDIDATES)}: pass --eos TOKEN")
    tokenizer = Tokenizer.from_path(path, eos=eos)
    if tokenizer.vocab_size > model_vocab:
        raise MtplabError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                          f"{what} vocabulary holds {model_vocab}: wrong tokenizer?")
    return tokenizer, path


def _tokenizer_vocab(path: Path) -> dict[str, int]:
    """Token -> id as the files have it (added tokens included), before mtplab adds anything."""
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if path.is_dir():
        if not has_tokenizer(path):
            raise MtplabError(f"no tokenizer at {path}: expected tokenizer.json or vocab.json + merges.txt")
        return read_json(path / "vocab.json")
    try:
        return HFTokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as exc:  # tokenizers raises plain Exception on bad files
        raise MtplabError(f"cannot read tokenizer {path}: {exc}") from None
