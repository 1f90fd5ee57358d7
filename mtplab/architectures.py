"""The architectures besides mtplab's causal decoder, and how the rest of mtplab reaches them.

mtplab's own stages (models/, training/, inference/, evaluation/, interop/, serve/) implement the
causal decoder. Another architecture lives in its own package and registers one `Architecture`:
its name (`model.arch` in recipes and config.json), its config class and one hook per stage. Each
stage asks `architecture_of(model_or_config)`: None means the causal decoder (the stage's own code runs), an
Architecture means the stage dispatches to its hook, or refuses with a message naming it (e.g. no
speculation, no transformers export). mtplab/__init__.py imports the architectures it ships, so
that they are registered before any stage asks; a hook imports its package's stage module on use.

Nothing but the standard library here: config.py reads `model.arch` through this module, and the
HF remote-code export copies config.py with what it imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

CAUSAL = "causal"  # mtplab's decoder: the stages' own code, no registration


@dataclass(frozen=True)
class Architecture:
    name: str  # model.arch
    label: str  # how messages name it ("a Monostep model ...")
    config: type  # its config class: a ModelConfig subclass whose `arch` is `name`
    decoding: str  # how it decodes, for the refusals of speculation ("decodes in blocks")
    export_hint: str  # what to do instead of `mtplab export-hf`, which it has no causal LM for
    build: Callable[[Any], Any]  # config -> nn.Module
    summarize: Callable[[Any, int], dict]  # (config, context) -> `mtplab info`'s summary
    describe: Callable[[dict, Any], str]  # (summary, config) -> its text
    train: Callable[..., Any]  # (Config, out_dir, resume, progress) -> TrainResult
    decode: Callable[..., Any]  # (model, prompt ids, max_new_tokens, params, eos_id) -> Events
    evaluate: Callable[..., tuple[dict, str]]  # (model, tokenizer, task, examples or text, limit)
    convert: Callable[..., Any] | None = None  # `mtplab convert NAME`: (source, ConvertOptions) -> Converted
    convert_options: frozenset[str] = field(default_factory=frozenset)  # ConvertOptions fields it reads
    convert_what: str = ""  # the format in words
    export: Callable[..., Any] | None = None  # `mtplab export NAME`: (checkpoint, out) -> path written
    exported: str = ""  # what `export` writes, in words ("wrote {exported} {path}")


_REGISTERED: dict[str, Architecture] = {}


def register(architecture: Architecture) -> Architecture:
    _REGISTERED[architecture.name] = architecture
    return architecture


def registered() -> list[Architecture]:
    return list(_REGISTERED.values())


def names() -> list[str]:
    """Every value model.arch may take, the causal decoder's first."""
    return [CAUSAL, *_REGISTERED]


def named(name: str) -> Architecture | None:
    """The registered architecture `name`, None for the causal decoder (KeyError for neither)."""
    return None if name == CAUSAL else _REGISTERED[name]


def architecture_of(model_or_config: Any) -> Architecture | None:
    """The architecture of a model (or of its config); None for the causal decoder."""
    config = getattr(model_or_config, "config", model_or_config)
    return _REGISTERED.get(getattr(config, "arch", CAUSAL))
