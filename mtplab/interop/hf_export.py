"""`mtplab export-hf`: a checkpoint as a Hugging Face transformers model directory.

`--format native` writes a trunk that is exactly GPT-2 or Llama as that architecture's own
directory (hf_native.py: no remote code, the heads beside it); `--format remote` writes any trunk
with mtplab's code; `auto` (the CLI's default) is native when the trunk fits, else remote. Both
share the tokenizer files, the generation config and the directory write below (`write_export`, atomic
through mtplab/atomic.py).

    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)   # no mtplab needed
    AutoTokenizer.from_pretrained(out, trust_remote_code=True)         # a PreTrainedTokenizerFast

What the remote-code directory holds:

    config.json               model_type "mtplab", auto_map, the ModelConfig under "mtplab"
    configuration_mtplab.py   MtplabConfig (PretrainedConfig)              from interop/hf_remote/
    modeling_mtplab.py        MtplabForCausalLM (PreTrainedModel + GenerationMixin)
    deepseek_layout.py        DeepSeek-V3 names of sequential MTP modules
    mtplab_*.py               mtplab's own model code: config, errors, models/* (no second copy of
                              the architecture to drift), package-relative imports made flat
    model.safetensors         "model." + mtplab's state-dict names; heads under "model.heads."
                              (with deepseek_layout: sequential module j as model.layers.{n+j}.*)
    generation_config.json    end-of-text and pad ids, greedy by default
    tokenizer.json, tokenizer_config.json   a PreTrainedTokenizerFast with the chat template

transformers copies a remote-code module's relative imports (`from .x import y`, one directory)
into its module cache, and requires every absolute import to be installed; `remote_code` checks
that the copied files import nothing but torch, transformers and the standard library.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from safetensors.torch import save_file

from ..architectures import architecture_of
from ..atomic import atomic_dir
from ..errors import MtplabError
from ..models.checkpoint import load_model
from ..tokenizer import CHAT_TEMPLATES, ChatTemplate, Tokenizer
from ..version import __version__
from .hf_native import misfit_message, native_files
from .hf_remote.deepseek_layout import deepseek_name

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the mtplab package directory
REMOTE_PACKAGE = "mtplab.interop.hf_remote"
ENTRY_MODULES = (f"{REMOTE_PACKAGE}.configuration_mtplab", f"{REMOTE_PACKAGE}.modeling_mtplab")
ALLOWED_IMPORTS = {"torch", "transformers"} | set(sys.stdlib_module_names)
AUTO_MAP = {"AutoConfig": "configuration_mtplab.MtplabConfig",
            "AutoModelForCausalLM": "modeling_mtplab.MtplabForCausalLM"}


# -- remote code: mtplab's modules, flattened into one directory ---------------------------------
def flat_name(module: str) -> str:
    """mtplab.models.layers -> mtplab_layers; the wrapper's own modules keep their names."""
    package, _, stem = module.rpartition(".")
    return stem if package == REMOTE_PACKAGE else f"mtplab_{stem}"


def _source_path(module: str) -> Path:
    return PACKAGE_ROOT.joinpath(*module.split(".")[1:]).with_suffix(".py")


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute name of a package-relative `from .x import y` inside `module`."""
    if node.module is None:  # `from . import x`: transformers' loader would not see the file
        raise RuntimeError(f"{module}: write `from .{'.'.join(n.name for n in node.names)} import ...` "
                           "for the HF export to follow it")
    base = module.split(".")[:-node.level]
    return ".".join(base + node.module.split("."))


def _flatten(module: str, source: str) -> tuple[str, list[str]]:
    """The source with every relative import pointing at a flat sibling file, and the modules those
    imports name."""
    lines = source.splitlines(keepends=True)
    needed = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        target = _resolve(module, node)
        if not _source_path(target).is_file():
            raise RuntimeError(f"{module}: the HF export can only copy module files, not {target}")
        line = lines[node.lineno - 1]
        lines[node.lineno - 1], found = re.subn(r"\bfrom\s+\.+[\w.]*\s+import\b",
                                                f"from .{flat_name(target)} import", line, count=1)
        if not found:
            raise RuntimeError(f"{module}:{node.lineno}: keep `from ... import` on one line")
        needed.append(target)
    return "".join(lines), needed


def absolute_imports(source: str) -> set[str]:
    """Top-level packages a file imports, as transformers' check_imports sees them: imports inside
    try blocks are optional and not counted."""
    found = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Try):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def remote_code() -> dict[str, str]:
    """File name -> source of every Python file the exported directory needs."""
    files, todo, seen = {}, list(ENTRY_MODULES), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        relative = _source_path(module).relative_to(PACKAGE_ROOT.parent)
        source, needed = _flatten(module, _source_path(module).read_text())
        name = f"{flat_name(module)}.py"
        if name in files:
            raise RuntimeError(f"two modules would both be exported as {name}")
        files[name] = f"# {relative.as_posix()} of mtplab {__version__}, copied by `mtplab export-hf`\n{source}"
        todo.extend(needed)
    for name, source in files.items():
        foreign = absolute_imports(source) - ALLOWED_IMPORTS
        if foreign:  # transformers would refuse to load the model without these installed
            raise RuntimeError(f"exported {name} imports {', '.join(sorted(foreign))}")
    return files


# -- configs -------------------------------------------------------------------------------------
def chat_template_jinja(template: ChatTemplate) -> str:
    """An mtplab chat template as the Jinja that HF's apply_chat_template renders identically."""

    def turn(fmt: str, content: str) -> str:
        before, after = fmt.split("{content}")
        return f"{{{{ {json.dumps(before)} + {content} + {json.dumps(after)} }}}}"

    parts = []
    if template.default_system:
        parts.append("{%- if not messages or messages[0]['role'] != 'system' %}"
                     + turn(template.system, json.dumps(template.default_system)) + "{%- endif %}")
    parts.append("{%- for message in messages %}")
    for i, role in enumerate(("system", "user", "assistant")):
        keyword = "if" if i == 0 else "elif"
        parts.append(f"{{%- {keyword} message['role'] == '{role}' %}}"
                     + turn(getattr(template, role), "(message['content'] | trim)"))
    parts.append("{%- else %}{{ raise_exception('unknown chat role ' + message['role']) }}{%- endif %}")
    parts.append("{%- endfor %}")
    parts.append("{%- if add_generation_prompt %}"
                 + f"{{{{ {json.dumps(template.generation_prompt)} }}}}" + "{%- endif %}")
    return "\n".join(parts)


def hf_config(model, tokenizer: Tokenizer, deepseek_layout: bool) -> dict:
    c = model.config
    return {
        "architectures": ["MtplabForCausalLM"],
        "model_type": "mtplab",
        "auto_map": AUTO_MAP,
        "mtplab": asdict(c),
        "num_nextn_predict_layers": c.n_future - 1 if deepseek_layout else 0,
        # read-only copies for generic tools; MtplabConfig derives them from "mtplab"
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.kv_heads,
        "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": c.tie_embeddings,
        "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
        "dtype": str(model.wte.weight.dtype).removeprefix("torch."),
        "mtplab_version": __version__,
    }


def tokenizer_config(tokenizer: Tokenizer, max_len: int) -> dict:
    pad = tokenizer.pad if tokenizer.token_to_id(tokenizer.pad) is not None else tokenizer.eos
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tokenizer.eos,
        "pad_token": pad,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,  # mtplab decodes without it
        "chat_template": chat_template_jinja(CHAT_TEMPLATES[tokenizer.chat_template]),
    }


# -- the export ----------------------------------------------------------------------------------
FORMATS = ("native", "remote", "auto")


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path, deepseek_layout: bool = False,
              force: bool = False, format: str = "remote") -> Path:
    """Write `checkpoint_dir` as a transformers model directory `out_dir` (built beside it, then
    renamed); see `export`. Returns `out_dir`. The default stays the remote-code export that this
    function always wrote; the CLI's default is "auto"."""
    return export(checkpoint_dir, out_dir, format, deepseek_layout, force)[0]


def export(checkpoint_dir: str | Path, out_dir: str | Path, format: str = "auto",
           deepseek_layout: bool = False, force: bool = False) -> tuple[Path, str]:
    """Write `checkpoint_dir` as a transformers model directory `out_dir`; returns it and the format
    written. remote: model_type "mtplab" with mtplab's code (any trunk); native: the standard
    GPT-2 or Llama directory plus the heads beside it (hf_native; one line naming what does not
    fit otherwise); auto: native when the trunk fits, else remote. `force` replaces a non-empty
    `out_dir`."""
    if format not in FORMATS:
        raise MtplabError(f"unknown export format {format!r}; known: {', '.join(FORMATS)}")
    checkpoint, out = Path(checkpoint_dir), Path(out_dir)
    model, tokenizer = load_model(checkpoint)
    other = architecture_of(model)
    if other is not None:
        raise MtplabError(f"{checkpoint} is a {other.label} model (no causal LM for transformers): "
                          f"{other.export_hint}")
    if deepseek_layout and format == "native":
        raise MtplabError("--deepseek-layout names the heads of the remote-code export; a native "
                          "export keeps mtplab's names in mtp_heads.safetensors")
    if format == "auto":
        format = "remote" if deepseek_layout or misfit_message(model.config) else "native"
    if format == "native":
        files = native_files(model, tokenizer)  # refuses a trunk that does not fit
    else:
        files = remote_files(model, tokenizer, deepseek_layout, checkpoint)
    _check_target(checkpoint, out, force)
    files.update(tokenizer_files(model, tokenizer))
    write_export(out, files)
    return out, format


def remote_files(model, tokenizer: Tokenizer, deepseek_layout: bool, checkpoint: Path) -> dict:
    """config.json, the weights under "model." and the remote code."""
    if deepseek_layout and model.config.mtp != "sequential":
        raise MtplabError(f"the DeepSeek-V3 layout is for sequential MTP heads; {checkpoint} has "
                          f"{model.config.mtp} heads")

    def name(key: str) -> str:
        return "model." + (deepseek_name(key, model.config.n_layers) if deepseek_layout else key)

    weights = {name(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    layout = "deepseek-v3" if deepseek_layout else "mtplab"
    return {**remote_code(),
            "config.json": hf_config(model, tokenizer, deepseek_layout),
            "model.safetensors": (weights, {"format": "pt", "mtplab_layout": layout})}


def tokenizer_files(model, tokenizer: Tokenizer) -> dict:
    """What both exports share: the tokenizer (a PreTrainedTokenizerFast with the chat template)
    and the generation defaults (end-of-text and pad ids, greedy)."""
    return {
        "tokenizer.json": lambda path: tokenizer.hf.save(str(path)),
        "tokenizer_config.json": tokenizer_config(tokenizer, model.config.max_seq_len),
        "generation_config.json": {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
                                   "do_sample": False},
    }


def write_export(out: Path, files: dict) -> None:
    """Write `files` (name -> text, a dict as JSON, (tensors, metadata) as safetensors, or a
    function of the path) as the directory `out`.

    The files are written into a fresh sibling directory that is renamed into place at the end
    (`atomic_dir`), so `out` never holds a partial export. (Plain writes with the umask's
    permissions: the whole directory is what is atomic, and an export is meant to be shared.)"""

    def write(directory: Path) -> None:
        for file_name, value in files.items():
            _write(directory / file_name, _writer(value))

    atomic_dir(out, write)


def _writer(value) -> Callable[[Path], None]:
    if callable(value):
        return value
    if isinstance(value, str):
        return lambda path: path.write_text(value)
    if isinstance(value, dict):
        return lambda path: path.write_text(json.dumps(value, indent=2) + "\n")
    tensors, metadata = value
    return lambda path: save_file(tensors, str(path), metadata=metadata)


def _write(path: Path, write: Callable[[Path], None]) -> None:
    write(path)
    os.chmod(path, path.parent.stat().st_mode & 0o666)  # as the umask has it (safetensors writes 0600)
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _check_target(checkpoint: Path, out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MtplabError(f"{out} exists and is not a directory")
    if out.resolve() == checkpoint.resolve() or out.resolve() in checkpoint.resolve().parents:
        raise MtplabError(f"{out} holds the checkpoint {checkpoint}: export somewhere else")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MtplabError(f"{out} exists and is not empty; --force replaces it")
