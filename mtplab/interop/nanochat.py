"""nanochat-family checkpoints -> mtplab's trunk with the nanochat features switched on.

Two layouts of the same network (the GELU d12 nanochat GPT's):
- GELU_GPT, the public PyTorch port behind gelu-d12: `wte.weight`, `blocks.{i}.attn.{c_q,c_k,c_v,
  c_proj,ve_gate}.weight`, `blocks.{i}.mlp.{c_fc,c_proj}.weight`, `resid_lambdas`, `x0_lambdas`,
  `smear_gate.weight`, `smear_lambda`, `backout_lambda`, `value_embeds.{i}.weight`, tied head. Its
  HF wrapper puts every key under `model.` beside a config.json; the bare module comes as a .pt
  holding {"config", "state_dict"}. Persistent RoPE tables (`cos`/`sin`, `rope_cos`/`rope_sin`) are
  checked against the RoPE base and ignored: mtplab recomputes them.
- nanochat itself: `model_<step>.pt` + `meta_<step>.json` (its `model_config`), the body under
  `transformer.wte` / `transformer.h.{i}`, an untied `lm_head.weight`, the rest as above.

How their forward maps onto mtplab's (the parity test in tests/interop re-derives it):
- RMSNorm without gain after the embedding, before each attention/MLP and at the end: norm_affine
  off, embed_norm on; eps 1e-6 in GELU_GPT, F.rms_norm's default (float32 machine epsilon) in nanochat.
- Both rotate q and k by -theta (y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos); mtplab by +theta.
  Negating the second half of every q and k head in c_q/c_k makes the two identical: with
  P = diag(1, -1) per pair, R(-theta) = P R(theta) P, and the scores q.k and the QK RMS-norm do not see
  the trailing P that q and k share.
- A sliding window of `left` keys back ((i - j) <= left, so left + 1 keys) is mtplab window left + 1;
  the short window is ceil(sequence_len / 4 / 128) * 128, the last layer is always full.
- Value embeddings, ve_gate (3*sigmoid over the first channels of the normed input), resid/x0
  lambdas, smear on the normed embedding, backout of block n_layer//2's output and the softcap of 15
  are mtplab's flags of the same names; smear_lambda and backout_lambda are [1] there, scalars here.
- Features whose weights a checkpoint lacks (older nanochat) stay off, which is what their neutral
  values compute.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import MtplabError
from ..models.layout import has_value_embed
from ..models.transformer import Transformer
from .sources import (ConvertOptions, Converted, KeyReport, SourceWeights, assemble, config_int,
                      load_tokenizer, read_json, read_weights, tensor_dict, torch_load)

DEFAULT_ROPE_BASE = 100000.0
QK_SCALE = 1.2
SOFTCAP = 15.0
ROPE_TABLE = re.compile(r"(.*\.)?(rope_)?(cos|sin)")


@dataclass(frozen=True)
class Layout:
    """Where one nanochat-family file keeps things; every key starts with `root`."""
    root: str  # "model." for GELU_GPT's HF wrapper, "" otherwise
    body: str  # "" (GELU_GPT) or "transformer." (nanochat): prefix of the embedding and the blocks
    blocks: str  # "blocks" | "h"

    def wte(self) -> str:
        return f"{self.root}{self.body}wte.weight"

    def block(self, i: int) -> str:
        return f"{self.root}{self.body}{self.blocks}.{i}."

    def top(self, name: str) -> str:  # lambdas, smear, backout, value_embeds, lm_head
        return f"{self.root}{name}"


@dataclass
class Arch:
    """What the source's config says (the tensors give the rest)."""
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    sequence_len: int
    vocab_size: int  # the tokenizer's; the tables may be padded beyond it
    window_pattern: str
    rope_base: float
    mlp: str  # gelu | relu2
    norm_eps: float
    tied: bool


def arch_from_config(raw: dict[str, Any], where: str | Path, *, window_pattern: str, mlp: str,
                     norm_eps: float, tied: bool, rope_base: float | None) -> Arch:
    n_head = config_int(raw, "n_head", where)
    arch = Arch(n_layer=config_int(raw, "n_layer", where), n_head=n_head,
                n_kv_head=config_int({"n_kv_head": raw.get("n_kv_head", n_head)}, "n_kv_head", where),
                n_embd=config_int(raw, "n_embd", where),
                sequence_len=config_int(raw, "sequence_len", where),
                vocab_size=config_int(raw, "vocab_size", where),
                window_pattern=str(raw.get("window_pattern", window_pattern)),
                rope_base=float(rope_base or raw.get("rope_base") or DEFAULT_ROPE_BASE),
                mlp=str(raw.get("mlp", mlp)), norm_eps=norm_eps, tied=tied)
    if arch.mlp not in ("gelu", "relu2"):
        raise MtplabError(f"{where}: mlp {arch.mlp!r} is not gelu or relu2")
    if set(arch.window_pattern.upper()) - set("SL") or not arch.window_pattern:
        raise MtplabError(f"{where}: window_pattern {arch.window_pattern!r} may only use S and L")
    if arch.n_embd % arch.n_head or arch.n_head % arch.n_kv_head:
        raise MtplabError(f"{where}: n_embd {arch.n_embd}, n_head {arch.n_head} and n_kv_head "
                          f"{arch.n_kv_head} do not divide")
    return arch


def short_window(sequence_len: int) -> int:
    """nanochat's S window in keys back: a quarter of the context, rounded up to 128."""
    return -(-sequence_len // 4 // 128) * 128


def rope_flip(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[n_heads*hd, d] q or k projection: negate the second half of every head's rows (see above)."""
    heads = weight.reshape(n_heads, 2, -1, weight.size(-1)).clone()  # [H, 2, hd/2, d]
    heads[:, 1] *= -1
    return heads.reshape_as(weight)


def check_rope_table(src: SourceWeights, key: str, arch: Arch) -> None:
    """A stored RoPE cos/sin table ([1, T, 1, hd/2] or [T, hd/2], plain cos and +sin) must be the
    one this base gives. Only the trained context is compared: far beyond it float32 angles are
    too coarse for two implementations to agree."""
    table = src.tensors[key].float()
    hd = arch.n_embd // arch.n_head
    table = table.reshape(-1, table.shape[-1])[:arch.sequence_len]  # [T, hd/2]
    if table.shape[-1] != hd // 2:
        raise MtplabError(f"{src.where}: {key} has shape {tuple(src.tensors[key].shape)}, "
                          f"not a RoPE table for head dim {hd}")
    inv_freq = 1.0 / (arch.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angles = torch.outer(torch.arange(table.size(0), dtype=torch.float32), inv_freq)
    expected = angles.sin() if key.endswith("sin") else angles.cos()
    tolerance = 1e-2 if src.tensors[key].dtype in (torch.bfloat16, torch.float16) else 1e-3
    if (table - expected).abs().max() > tolerance:
        raise MtplabError(f"{src.where}: {key} is not the RoPE table of base {arch.rope_base:g}: "
                          "pass --rope-base with the base it was trained with")
    src.ignore(key, "RoPE table, recomputed")


def nanochat_to_mtplab(tensors: dict[str, torch.Tensor], layout: Layout, arch: Arch,
                       where: str | Path) -> tuple[Transformer, KeyReport, list[str]]:
    """Source tensors + config -> (mtplab model, key report, notes). Refuses on any missing or
    mis-shaped tensor."""
    src = SourceWeights(tensors, where)
    L, d, kv = arch.n_layer, arch.n_embd, arch.n_kv_head
    hd = d // arch.n_head
    wte_shape = src.shape(layout.wte())
    if wte_shape is None:
        src.take(layout.wte(), (arch.vocab_size, d))  # the one-line "missing required weight"
    vocab = wte_shape[0]  # padded to a multiple of 64 by nanochat, which cuts its logits to vocab_size
    if vocab < arch.vocab_size:
        raise MtplabError(f"{where}: {layout.wte()} has {vocab} rows for vocab_size {arch.vocab_size}")
    d_ff = (src.shape(layout.block(0) + "mlp.c_fc.weight") or (4 * d,))[0]
    ve_layers = sorted(int(m.group(1)) for k in tensors
                       if (m := re.fullmatch(re.escape(layout.top("value_embeds.")) + r"(\d+)\.weight", k)))
    gate_shape = next((src.shape(layout.block(i) + "attn.ve_gate.weight") for i in ve_layers), None)
    smear_shape = src.shape(layout.top("smear_gate.weight"))
    window = short_window(arch.sequence_len) + 1 if "S" in arch.window_pattern.upper() else 0
    config = ModelConfig(
        vocab_size=vocab, vocab_real=arch.vocab_size, d_model=d, n_layers=L, n_heads=arch.n_head,
        n_kv_heads=kv, d_ff=d_ff,
        max_seq_len=arch.sequence_len, pos="rope", rope_base=arch.rope_base, norm="rmsnorm",
        norm_eps=arch.norm_eps, norm_affine=False, embed_norm=True, mlp=arch.mlp, bias=False,
        tie_embeddings=arch.tied, qk_norm=True, qk_scale=QK_SCALE, window_pattern=arch.window_pattern,
        window=window, value_embeds=bool(ve_layers),
        ve_gate_channels=gate_shape[1] if gate_shape and len(gate_shape) == 2 else 12,
        layer_lambdas=src.has(layout.top("resid_lambdas")),
        smear=smear_shape[1] if smear_shape and len(smear_shape) == 2 else 0,
        backout=src.has(layout.top("backout_lambda")), logit_softcap=SOFTCAP,
        mtp="parallel", n_future=1, head_layers=0)
    expected_ve = [i for i in range(L) if has_value_embed(config, i)]
    if ve_layers and ve_layers != expected_ve:
        raise MtplabError(f"{where}: value embeddings on layers {ve_layers}; mtplab places them on "
                          f"{expected_ve} (alternating, the last included)")

    w = {"wte.weight": src.take(layout.wte(), (vocab, d))}
    if not arch.tied:
        w["lm_head.weight"] = src.take(layout.top("lm_head.weight"), (vocab, d))
    for i in range(L):
        b, t = layout.block(i), f"blocks.{i}."
        w[t + "attn.q_proj.weight"] = rope_flip(src.take(b + "attn.c_q.weight", (arch.n_head * hd, d)), arch.n_head)
        w[t + "attn.k_proj.weight"] = rope_flip(src.take(b + "attn.c_k.weight", (kv * hd, d)), kv)
        w[t + "attn.v_proj.weight"] = src.take(b + "attn.c_v.weight", (kv * hd, d))
        w[t + "attn.o_proj.weight"] = src.take(b + "attn.c_proj.weight", (d, arch.n_head * hd))
        w[t + "mlp.up_proj.weight"] = src.take(b + "mlp.c_fc.weight", (d_ff, d))
        w[t + "mlp.down_proj.weight"] = src.take(b + "mlp.c_proj.weight", (d, d_ff))
        if has_value_embed(config, i):
            w[t + "attn.ve_gate.weight"] = src.take(b + "attn.ve_gate.weight", (kv, config.ve_gate_channels))
            w[f"value_embeds.{i}.weight"] = src.take(layout.top(f"value_embeds.{i}.weight"), (vocab, kv * hd))
    if config.layer_lambdas:
        w["resid_lambdas"] = src.take(layout.top("resid_lambdas"), (L,))
        w["x0_lambdas"] = src.take(layout.top("x0_lambdas"), (L,))
    if config.smear:
        w["smear_gate.weight"] = src.take(layout.top("smear_gate.weight"), (1, config.smear))
        w["smear_lambda"] = src.take(layout.top("smear_lambda"), (1,)).reshape(())
    if config.backout:
        w["backout_lambda"] = src.take(layout.top("backout_lambda"), (1,)).reshape(())
    if arch.tied and src.has(layout.top("lm_head.weight")):
        if not torch.equal(tensors[layout.top("lm_head.weight")].float(), w["wte.weight"]):
            raise MtplabError(f"{where}: lm_head.weight differs from wte.weight although the config "
                              "ties them")
        src.ignore(layout.top("lm_head.weight"), "tied to wte")
    for key in tensors:
        if key.startswith(layout.root) and ROPE_TABLE.fullmatch(key[len(layout.root):]):
            check_rope_table(src, key, arch)
    model = assemble(config, w, where)
    features = [name for name, on in (("value embeddings", config.value_embeds),
                                      ("resid/x0 lambdas", config.layer_lambdas),
                                      (f"smear {config.smear}", config.smear),
                                      ("backout", config.backout)) if on]
    notes = [f"{L} blocks, d {d}, {arch.n_head} heads ({kv} kv), {arch.mlp} MLP, RoPE base "
             f"{arch.rope_base:g}, windows {arch.window_pattern} (S = {window} keys), "
             f"{', '.join(features) or 'no stream features'}; vocabulary {vocab} rows "
             f"({arch.vocab_size} real, the rest never emitted), "
             f"{'tied' if arch.tied else 'untied'} unembedding",
             "q/k projections: second half of each head negated (nanochat rotates by -theta)"]
    return model, src.report(), notes


# -- gelu-d12 (GELU_GPT) ------------------------------------------------------------------------
def _gelu_d12_files(source: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """(config, tensors, where) of an HF wrapper directory, or of torch_gpt's {"config",
    "state_dict"} .pt (a file, or the only .pt in the directory)."""
    if source.is_dir() and (source / "config.json").is_file():
        tensors, weights_file = read_weights(source)
        return read_json(source / "config.json"), tensors, weights_file
    if source.is_dir():
        candidates = sorted(source.glob("*.pt")) + sorted(source.glob("*.pth"))
        if len(candidates) != 1:
            raise MtplabError(f"{source} has no config.json and {len(candidates)} .pt files: expected "
                              "GELU_GPT's HF directory or one {config, state_dict} .pt")
        source = candidates[0]
    payload = torch_load(source)
    if not (isinstance(payload, dict) and isinstance(payload.get("config"), dict)
            and "state_dict" in payload):
        raise MtplabError(f"{source} is not a GELU_GPT checkpoint: expected a dict with 'config' and "
                          "'state_dict' (or a directory with config.json)")
    return payload["config"], tensor_dict(payload["state_dict"], source), source


def convert_gelu_d12(source: Path, options: ConvertOptions) -> Converted:
    raw, tensors, where = _gelu_d12_files(source)
    if any(k.startswith(("transformer.h.", "_orig_mod.")) for k in tensors):
        raise MtplabError(f"{where} looks like nanochat's own layout: use `mtplab convert nanochat`")
    root = "model." if "model.wte.weight" in tensors else ""
    tied = raw.get("tie_embeddings", raw.get("tie_word_embeddings", True)) is not False
    arch = arch_from_config(raw, where, window_pattern="SSSL", mlp="gelu", norm_eps=1e-6, tied=tied,
                            rope_base=options.rope_base)
    model, report, notes = nanochat_to_mtplab(tensors, Layout(root, "", "blocks"), arch, where)
    search = [source if source.is_dir() else source.parent]
    tokenizer, tokenizer_path = load_tokenizer(options.tokenizer, search, options.eos,
                                               model.config.real_vocab_size, "gelu-d12")
    notes.append(f"tokenizer: {tokenizer_path} ({tokenizer.vocab_size} tokens, eos {tokenizer.eos!r})")
    return Converted(model, tokenizer, report, notes, {"layout": "GELU_GPT" + (" (HF wrapper)" if root else ""),
                                                       "tokenizer": str(tokenizer_path)})


# -- nanochat -------------------------------------------------------------------------------------
def _by_step(directory: Path, pattern: str) -> dict[int, Path]:
    return {int(m.group(1)): p for p in directory.iterdir() if (m := re.fullmatch(pattern, p.name))}


def _nanochat_files(source: Path, step: int | None) -> tuple[Path, Path, int]:
    """(model_<step>.pt, meta_<step>.json, step): the step asked for, else the highest."""
    directory = source.parent if source.is_file() else source
    models = _by_step(directory, r"model_(\d+)\.pt")
    if source.is_file():
        models = {s: p for s, p in models.items() if p.name == source.name}
        if not models:
            raise MtplabError(f"{source}: expected nanochat's model_<step>.pt (or its directory)")
    if not models:
        raise MtplabError(f"{directory} has no nanochat model_<step>.pt")
    if step is not None and step not in models:
        raise MtplabError(f"{directory}: no model_{step:06d}.pt (steps: {', '.join(map(str, sorted(models)))})")
    chosen = max(models) if step is None else step
    meta = _by_step(directory, r"meta_(\d+)\.json").get(chosen)
    if meta is None:
        raise MtplabError(f"{directory}: no meta_{chosen:06d}.json beside {models[chosen].name} "
                          "(nanochat writes the model config there)")
    return models[chosen], meta, chosen


def convert_nanochat(source: Path, options: ConvertOptions) -> Converted:
    model_file, meta_file, step = _nanochat_files(source, options.step)
    meta = read_json(meta_file)
    raw = meta.get("model_config")
    if not isinstance(raw, dict):
        raise MtplabError(f"{meta_file} has no model_config")
    tensors = tensor_dict(torch_load(model_file), model_file)
    # torch.compile'd models save their keys under "_orig_mod."; nanochat strips it the same way
    tensors = {k.removeprefix("_orig_mod."): v for k, v in tensors.items()}
    if "wte.weight" in tensors or "model.wte.weight" in tensors:
        raise MtplabError(f"{model_file} looks like GELU_GPT's layout: use `mtplab convert gelu-d12`")
    # Checkpoints from before sliding windows have no window_pattern: they attend fully ("L").
    arch = arch_from_config(raw, meta_file, window_pattern="L", mlp="relu2",
                            norm_eps=torch.finfo(torch.float32).eps,
                            tied="lm_head.weight" not in tensors, rope_base=options.rope_base)
    model, report, notes = nanochat_to_mtplab(tensors, Layout("", "transformer.", "h"), arch, model_file)
    directory = model_file.parent
    # nanochat keeps its tokenizer in <base_dir>/tokenizer, the checkpoints in <base_dir>/*/<tag>
    search = [directory, directory.parent, directory.parent / "tokenizer",
              directory.parent.parent / "tokenizer"]
    tokenizer, tokenizer_path = load_tokenizer(options.tokenizer, search, options.eos,
                                               model.config.real_vocab_size, "nanochat")
    notes.append(f"step {step}; tokenizer: {tokenizer_path} ({tokenizer.vocab_size} tokens, "
                 f"eos {tokenizer.eos!r})")
    return Converted(model, tokenizer, report, notes, {"step": step, "tokenizer": str(tokenizer_path)})


__all__ = ["convert_gelu_d12", "convert_nanochat", "nanochat_to_mtplab", "Layout", "Arch",
           "short_window", "rope_flip"]
