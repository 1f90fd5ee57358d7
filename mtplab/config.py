"""Typed configuration: model, tokenizer, data and training settings as dataclasses.

A recipe is a TOML file with one table per section; `--set section.key=value` overrides any field.
Unknown keys are errors that list the valid ones, so a typo never silently trains the wrong model.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

# A try block, not a version test: `mtplab export-hf` copies this file into HF remote code, and
# transformers' import check skips try blocks but would demand tomli even on Python 3.11+.
try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .architectures import CAUSAL, names, named
from .errors import MtplabError


class HasVocabSize(Protocol):
    """What vocabulary sizing reads of a tokenizer: a Tokenizer, or a TokenizerConfig (the size of
    the BPE a run trains)."""

    @property
    def vocab_size(self) -> int: ...


@dataclass
class ModelConfig:
    # model.arch: mtplab's causal decoder (every field below); another architecture has its own
    # subclass of this config (see architectures.py), written and read under the same keys
    arch: ClassVar[str] = CAUSAL
    vocab_multiple: ClassVar[int] = 64  # vocab_size = 0 is sized to the tokenizer, rounded up to this
    vocab_size: int = 0  # 0: take the tokenizer's size, rounded up to a multiple of 64
    # ids the tokenizer has; the rows from here to vocab_size are padding, whose logits are -inf
    # (never emitted, never scored). 0: all vocab_size rows (set from the tokenizer when trained)
    vocab_real: int = 0
    d_model: int = 128
    n_layers: int = 2  # shared trunk blocks
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (no GQA)
    d_ff: int = 0  # 0: 4*d_model, or 8/3*d_model rounded to 32 for swiglu
    max_seq_len: int = 256
    pos: str = "rope"  # rope | learned
    rope_base: float = 10000.0
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # gelu | swiglu | relu2
    bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    # Multi-token prediction: head k predicts token t+1+k from position t; head 0 is next-token.
    # parallel (Gloeckle et al.) | sequential (DeepSeek-V3) | medusa | slots (Monostep's chained
    # slot MLPs, reading the causal trunk's state at each position instead of a pooled summary)
    mtp: str = "parallel"
    n_future: int = 1  # number of heads, next-token head included
    head_layers: int = 1  # blocks in each parallel head (sequential modules have one)
    loss_weights: list[float] = field(default_factory=list)  # one per head; empty: see mtp_lambda
    mtp_lambda: float = 0.0  # >0: DeepSeek weights [1, lambda/D, ...]; 0 with no loss_weights: mean
    # nanochat's trunk features; the defaults are off, i.e. the plain pre-norm trunk.
    norm_affine: bool = True  # false: parameterless norms (no learnable gain)
    embed_norm: bool = False  # normalise the token embedding before the first block
    qk_norm: bool = False  # RMS-normalise q and k after RoPE, then scale each by qk_scale
    qk_scale: float = 1.0
    window_pattern: str = ""  # e.g. "SSSL", tiled over the trunk: S = window `window`, L = full;
    window: int = 0  # the short window (keys within `window` positions); the last layer is full
    value_embeds: bool = False  # ResFormer value embeddings on alternating layers (the last included)
    ve_gate_channels: int = 12  # gate = 3*sigmoid(W x[..., :channels]), one per kv head
    layer_lambdas: bool = False  # x <- resid_lambdas[i]*x + x0_lambdas[i]*x0 before block i
    smear: int = 0  # >0: a gate on the first `smear` dims mixes in the previous token's embedding
    backout: bool = False  # subtract backout_lambda * (stream at layer n_layers//2) at the end
    logit_softcap: float = 0.0  # >0: logits c*tanh(z/c)
    # Looped layers (the Nano Reasoning Model's): n_layers unique blocks = entry + loop_layers shared
    # + exit, the shared group runs n_think_loops times (changeable at inference, no new parameters).
    loop_layers: int = 0
    n_think_loops: int = 1
    low_rank: int = 0  # >0: every attention/MLP projection is factored as (out x r)(r x in)

    def __post_init__(self) -> None:
        choices = {"pos": ("rope", "learned"), "norm": ("rmsnorm", "layernorm"),
                   "mlp": ("gelu", "swiglu", "relu2"),
                   "mtp": ("parallel", "sequential", "medusa", "slots")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise MtplabError(f"model.{name} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise MtplabError(f"model.d_model ({self.d_model}) must be divisible by "
                              f"model.n_heads ({self.n_heads})")
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise MtplabError(f"model.n_heads ({self.n_heads}) must be a multiple of "
                              f"model.n_kv_heads ({self.n_kv_heads})")
        if self.pos == "rope" and self.head_dim % 2:
            raise MtplabError("RoPE needs an even head dimension (d_model / n_heads)")
        if self.vocab_real < 0 or (self.vocab_size and self.vocab_real > self.vocab_size):
            raise MtplabError(f"model.vocab_real ({self.vocab_real}) must be between 0 and "
                              f"model.vocab_size ({self.vocab_size})")
        if self.n_future < 1:
            raise MtplabError("model.n_future must be at least 1")
        if self.mtp == "parallel" and self.n_future > 1 and self.head_layers < 1:
            raise MtplabError("parallel heads need head_layers >= 1, else every head is the same")
        if self.window_pattern:
            if set(self.window_pattern.upper()) - set("SL"):
                raise MtplabError(f"model.window_pattern may only use the letters S and L, "
                                  f"got {self.window_pattern!r}")
            if "S" in self.window_pattern.upper() and self.window < 1:
                raise MtplabError("model.window_pattern has S layers: set model.window >= 1")
        if self.ve_gate_channels < 1 or self.ve_gate_channels > self.d_model:
            raise MtplabError("model.ve_gate_channels must be between 1 and d_model")
        if self.smear < 0 or self.smear > self.d_model:
            raise MtplabError(f"model.smear must be between 0 and d_model ({self.d_model})")
        if self.logit_softcap < 0 or self.low_rank < 0:
            raise MtplabError("model.logit_softcap and model.low_rank must be >= 0")
        if not 0 <= self.loop_layers <= self.n_layers:
            raise MtplabError(f"model.loop_layers must be between 0 and n_layers ({self.n_layers})")
        if self.n_think_loops < 1:
            raise MtplabError("model.n_think_loops must be at least 1")
        if self.loss_weights and len(self.loss_weights) != self.n_future:
            raise MtplabError(f"model.loss_weights has {len(self.loss_weights)} entries "
                              f"for {self.n_future} heads")

    @property
    def real_vocab_size(self) -> int:
        """The ids a decoder may emit: vocab_real, or every row when it is 0."""
        return self.vocab_real or self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def sized_for(self, tokenizer: HasVocabSize) -> "ModelConfig":
        """This config with its vocabulary sized to `tokenizer` (a Tokenizer, or a TokenizerConfig
        for the BPE a run will train): vocab_size = 0 becomes the tokenizer's size rounded up to
        vocab_multiple (64, or 1 for Monostep's exact 50262), and vocab_real = 0 the tokenizer's
        size, the real ids (the rows beyond are padding, never emitted). A set size that cannot
        hold the tokenizer is an error."""
        tokens = tokenizer.vocab_size
        vocab_size = self.vocab_size or self.vocab_multiple * -(-tokens // self.vocab_multiple)
        if tokens > vocab_size:
            raise MtplabError(f"tokenizer has {tokens} tokens but model.vocab_size is "
                              f"{vocab_size}: the vocabulary does not fit the model")
        vocab_real = self.vocab_real or tokens
        if not tokens <= vocab_real <= vocab_size:
            raise MtplabError(f"model.vocab_real is {vocab_real}: it must hold the tokenizer's {tokens} "
                              f"tokens and fit model.vocab_size ({vocab_size})")
        return replace(self, vocab_size=vocab_size, vocab_real=vocab_real)


@dataclass
class TokenizerConfig:
    path: str = ""  # tokenizer.json, or a directory with tokenizer.json or vocab.json + merges.txt
    vocab_size: int = 1024  # when training a byte-level BPE on the training corpus
    special_tokens: list[str] = field(default_factory=lambda: [
        "<pad>", "<empty>", "<system>", "<user>", "<assistant>"])
    eos: str = "<|endoftext|>"
    chat_template: str = "monostep"


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | jsonl | text
    path: str = ""  # jsonl file (question/answer) or text file(s), comma separated
    eval_path: str = ""  # held-out file; empty: split eval_fraction off the training data
    eval_fraction: float = 0.05
    # chat: loss on the answer only | lm: packed sequences | empty: lm for text, chat otherwise
    format: str = ""
    seq_len: int = 128
    n_train: int = 20000  # synthetic problems to generate
    n_eval: int = 500
    max_steps: int = 3  # synthetic: most arithmetic steps in a problem
    max_number: int = 50  # synthetic: largest starting amount or number added
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in ("synthetic", "jsonl", "text"):
            raise MtplabError(f"data.source must be synthetic, jsonl or text, got {self.source!r}")
        if self.format not in ("", "chat", "lm"):
            raise MtplabError(f"data.format must be chat or lm, got {self.format!r}")
        if self.source == "text" and self.format == "chat":  # plain text has no question/answer turns
            raise MtplabError("data.format = chat needs question/answer data: set data.format = lm "
                              "for data.source = text")
        # the unset format is filled in here, once, so that every reader and config.json see it
        self.format = self.format or ("lm" if self.source == "text" else "chat")


@dataclass
class TrainConfig:
    steps: int = 1000
    # passes over the training samples, for an architecture that trains by epochs (Monostep: its
    # (prefix, next block) samples, train.steps unused); the causal loop counts train.steps
    epochs: int = 0
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.0
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.1  # wsd: final fraction of steps that decays linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 8
    log_every: int = 10
    seed: int = 1337
    freeze_trunk: bool = False  # train only the heads (Medusa-1 style)
    init_from: str = ""  # start from this checkpoint's tokenizer and weights; new heads start fresh
    grad_checkpointing: bool = False  # recompute each block in backward: less activation memory
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto (bf16 autocast on a GPU that has it) | fp32 | bf16
    time_limit: float = 0.0  # seconds of training after which the run ends as if done (0: off)
    keep_checkpoints: int = 2  # step directories kept under checkpoints/ (0: all)
    max_nonfinite_steps: int = 10  # consecutive skipped non-finite steps before the run gives up
    parallel: str = "ddp"  # under torchrun: ddp (replicas, gradients summed) | fsdp (FSDP2 shards)
    # Optimizer: adamw everywhere, or muon | aurora for hidden matrices (at matrix_lr) + AdamW (at lr)
    optimizer: str = "adamw"
    matrix_lr: float = 0.02
    momentum: float = 0.95  # muon / aurora Nesterov momentum
    # Token Superposition Training: the first tst_fraction of steps read bags of tst_bag tokens
    tst_bag: int = 0  # 0: off; s >= 2 tokens averaged into each position during phase 1
    tst_fraction: float = 0.3
    tst_reset_optimizer: bool = False  # ablation: fresh optimizer state and LR schedule in phase 2
    label_smoothing: float = 0.0  # training loss only (the NRM: 0.05); eval losses stay plain CE
    ignore_pad: bool = False  # labels equal to the tokenizer's pad id are not scored (as in the NRM)

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise MtplabError(f"train.schedule must be cosine, wsd or constant, got {self.schedule!r}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise MtplabError(f"train.dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise MtplabError(f"train.parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.optimizer not in ("adamw", "muon", "aurora"):
            raise MtplabError(f"train.optimizer must be adamw, muon or aurora, got {self.optimizer!r}")
        if self.tst_bag < 0 or self.tst_bag == 1:
            raise MtplabError(f"train.tst_bag must be 0 (off) or >= 2, got {self.tst_bag}")
        if not 0.0 < self.tst_fraction < 1.0:
            raise MtplabError(f"train.tst_fraction must be between 0 and 1, got {self.tst_fraction}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise MtplabError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.time_limit < 0:
            raise MtplabError(f"train.time_limit must be >= 0 seconds, got {self.time_limit}")
        if self.keep_checkpoints < 0 or self.max_nonfinite_steps < 1:
            raise MtplabError("train.keep_checkpoints must be >= 0 and train.max_nonfinite_steps >= 1")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise MtplabError("train.steps, train.batch_size and train.grad_accum must be >= 1")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model"] = model_config_to_dict(self.model)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> "Config":
        _reject_unknown(raw, [f.name for f in fields(cls)], where)
        sections = {}
        for f in fields(cls):
            section_type = typing.get_type_hints(cls)[f.name]
            part, place = raw.get(f.name, {}), f"{where}: [{f.name}]"
            sections[f.name] = (model_config_from_dict(part, place) if section_type is ModelConfig
                                else _build(section_type, part, place))
        return cls(**sections)


def _reject_unknown(raw: dict[str, Any], valid: list[str], where: str) -> None:
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise MtplabError(f"{where}: unknown key {', '.join(map(repr, unknown))}; "
                          f"valid keys: {', '.join(valid)}")


def _build(section_type: type, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise MtplabError(f"{where} must be a table of settings")
    hints = typing.get_type_hints(section_type)
    _reject_unknown(raw, [f.name for f in fields(section_type)], where)
    values = {key: _coerce(value, hints[key], f"{where} {key}") for key, value in raw.items()}
    try:
        return section_type(**values)
    except TypeError as exc:
        raise MtplabError(f"{where}: {exc}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a value against its field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise MtplabError(f"{where} must be a list, got {value!r}")
        (item_type,) = typing.get_args(hint)
        return [_coerce(v, item_type, where) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise MtplabError(f"{where} must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise MtplabError(f"{where} must be an integer, got {value!r}")
    if not isinstance(value, hint):
        raise MtplabError(f"{where} must be {hint.__name__}, got {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` -> (["train", "lr"], 0.001). Values are read as TOML, bare words as strings."""
    if "=" not in text:
        raise MtplabError(f"--set expects section.key=value, got {text!r}")
    key, raw_value = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise MtplabError(f"--set expects section.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw_value}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value
    return path, value


# The recipes shipped inside the package (the repository's recipes/ is a link to this folder), so
# that an installed mtplab finds them by name from any directory.
RECIPES = Path(__file__).parent / "recipes"


def packaged_recipes() -> dict[str, Path]:
    """Name -> file of every packaged recipe, sorted by name."""
    return {path.stem: path for path in sorted(RECIPES.glob("*.toml"), key=lambda p: p.stem)}


def find_recipe(recipe: str | Path) -> Path:
    """The recipe file `recipe` names: a path to a file wins; else a bare name (`tiny` or
    `tiny.toml`) is a packaged recipe. Anything else is an error that lists the packaged names."""
    path = Path(recipe)
    if path.is_file():
        return path
    packaged = packaged_recipes()
    name = path.name.removesuffix(".toml")
    if path.parent == Path(".") and name in packaged:
        return packaged[name]
    raise MtplabError(f"recipe not found: {recipe} (neither a file nor a packaged recipe; "
                      f"packaged recipes: {', '.join(packaged) or 'none'})")


def recipe_summary(path: Path) -> str:
    """What a recipe is: its first comment line (every packaged recipe opens with one)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            return line.strip().removeprefix("#").strip() if line.lstrip().startswith("#") else ""
    return ""


def check_think_loops(config: ModelConfig, loops: int, model: str) -> None:
    """Refuse a think-loop count at inference that would do nothing or cannot run: only a looped
    trunk (model.loop_layers > 0) has a shared group to repeat."""
    if not config.loop_layers:
        raise MtplabError(f"{model} has no looped layers (model.loop_layers = 0): think loops need a "
                          "looped trunk, e.g. one trained from recipe nrm-miniaxion-tiny")
    if loops < 1:
        raise MtplabError(f"think loops must be at least 1, got {loops}")


def load_config(recipe: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a TOML recipe (a file, or a packaged recipe by name; or start from defaults) and apply
    `section.key=value` overrides."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if recipe is not None:
        path = find_recipe(recipe)
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise MtplabError(f"{path} is not valid TOML: {exc}") from None
        where = str(path)
    for text in overrides:
        (section, key), value = parse_override(text)
        # an unknown name is the --set argument's fault, not the recipe's
        _reject_unknown({section: None}, [f.name for f in fields(Config)], f"--set {text}: section")
        _reject_unknown({key: None}, _section_keys(section), f"--set {text}: [{section}]")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise MtplabError(f"--set {text}: {section} is not a section")
        raw[section][key] = value
    return Config.from_dict(raw, where)


def _section_keys(section: str) -> list[str]:
    """The keys a recipe's [section] may hold; [model]: arch, and every architecture's fields."""
    section_type = typing.get_type_hints(Config)[section]
    keys = [f.name for f in fields(section_type)]
    if section_type is ModelConfig:
        keys = ["arch", *keys]
        for name in names()[1:]:
            keys += [f.name for f in fields(named(name).config) if f.name not in keys]
    return keys


def model_config_class(arch: str) -> type[ModelConfig]:
    """The config class of model.arch = `arch`: ModelConfig, or a registered architecture's."""
    if arch not in names():
        raise MtplabError(f"model.arch must be one of {', '.join(names())}, got {arch!r}")
    other = named(arch)
    return ModelConfig if other is None else other.config


def model_config_from_dict(raw: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """A [model] table or config.json's model section; its `arch` (default causal) picks the class."""
    if not isinstance(raw, dict):
        raise MtplabError(f"{where} must be a table of settings")
    raw = dict(raw)
    cls = model_config_class(_coerce(raw.pop("arch", CAUSAL), str, f"{where} arch"))
    if cls is ModelConfig:  # mtplab 0.1.0 wrote Monostep's empty_token (-1) into every model's config
        raw.pop("empty_token", None)
    return _build(cls, raw, where)


def model_config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """What config.json holds: the architecture's name, then every field."""
    return {"arch": config.arch, **asdict(config)}


__all__ = ["Config", "ModelConfig", "TokenizerConfig", "DataConfig", "TrainConfig",
           "load_config", "parse_override", "model_config_from_dict", "model_config_to_dict",
           "model_config_class", "packaged_recipes", "find_recipe",
           "recipe_summary", "check_think_loops"]
