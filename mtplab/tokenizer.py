"""Tokenizers through HF `tokenizers`: train a byte-level BPE, or load GPT-2's files; special tokens
in a fixed order; and the chat template that turns a conversation into the model's prompt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from .atomic import atomic_write
from .errors import MtplabError


@dataclass(frozen=True)
class ChatTemplate:
    system: str
    user: str
    assistant: str  # a finished assistant turn in the history
    generation_prompt: str  # what opens the turn the model writes
    default_system: str = ""


# Monostep's GSM8K prompt, every recipe's default:
# "<system> You are a helpful math assistant.\n<user> {question}\n<assistant> "
CHAT_TEMPLATES = {
    "monostep": ChatTemplate(system="<system> {content}\n", user="<user> {content}\n",
                             assistant="<assistant> {content}\n", generation_prompt="<assistant> ",
                             default_system="You are a helpful math assistant."),
}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the names of its end-of-text token and chat template."""

    def __init__(self, hf: HFTokenizer, eos: str = "<|endoftext|>", chat_template: str = "monostep",
                 pad: str = "<pad>"):
        if chat_template not in CHAT_TEMPLATES:
            raise MtplabError(f"unknown chat template {chat_template!r}; "
                              f"known: {', '.join(CHAT_TEMPLATES)}")
        self.hf = hf
        self.eos = eos
        self.pad = pad
        self.chat_template = chat_template
        if hf.token_to_id(eos) is None:
            raise MtplabError(f"the tokenizer has no end-of-text token {eos!r}")

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens: list[str] = (),
              eos: str = "<|endoftext|>", chat_template: str = "monostep") -> "Tokenizer":
        """Byte-level BPE; the eos and special tokens take ids 0, 1, ... in the order given."""
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        specials = [eos] + [t for t in special_tokens if t != eos]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      min_frequency=2, show_progress=False)
        hf.train_from_iterator(texts, trainer)
        if hf.get_vocab_size() <= len(specials):
            raise MtplabError("cannot train a tokenizer on an empty corpus")
        return cls(hf, eos=eos, chat_template=chat_template)

    @classmethod
    def from_path(cls, path: str | Path, special_tokens: list[str] = (), eos: str = "<|endoftext|>",
                  chat_template: str = "monostep") -> "Tokenizer":
        """Load `tokenizer.json`, or a directory holding it or GPT-2's `vocab.json` + `merges.txt`,
        then add the special tokens that are missing, in order (GPT-2 + Monostep's five: ids 50257-50261)."""
        path = Path(path)
        if path.is_dir() and (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        try:
            if path.is_file():
                hf = HFTokenizer.from_file(str(path))
            elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                hf = HFTokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
                hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                hf.decoder = decoders.ByteLevel()
            else:
                raise MtplabError(f"no tokenizer at {path}: expected tokenizer.json or "
                                  "vocab.json + merges.txt")
        except Exception as exc:  # tokenizers raises plain Exception on bad files
            if isinstance(exc, MtplabError):
                raise
            raise MtplabError(f"cannot read tokenizer {path}: {exc}") from None
        hf.add_special_tokens([_special(eos)])
        hf.add_special_tokens([_special(t) for t in special_tokens])
        return cls(hf, eos=eos, chat_template=chat_template)

    def save(self, directory: str | Path) -> None:
        atomic_write(Path(directory) / "tokenizer.json", lambda tmp: self.hf.save(str(tmp)))

    def describe(self) -> dict:
        """What config.json records so that `load` can rebuild this wrapper around tokenizer.json."""
        return {"eos": self.eos, "pad": self.pad, "chat_template": self.chat_template,
                "vocab_size": self.vocab_size}

    # -- use ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self.hf.token_to_id(self.eos)

    @property
    def pad_id(self) -> int:
        pad = self.hf.token_to_id(self.pad)
        return self.eos_id if pad is None else pad

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Messages are {"role": system|user|assistant, "content": str}, as in the OpenAI API."""
        template = CHAT_TEMPLATES[self.chat_template]
        parts = []
        if template.default_system and (not messages or messages[0]["role"] != "system"):
            parts.append(template.system.format(content=template.default_system))
        for message in messages:
            role = message["role"]
            if role not in ("system", "user", "assistant"):
                raise MtplabError(f"unknown chat role {role!r}")
            parts.append(getattr(template, role).format(content=message["content"].strip()))
        if add_generation_prompt:
            parts.append(template.generation_prompt)
        return "".join(parts)

    def chat_prompt(self, question: str) -> str:
        """One user question in the chat template, ready for the answer."""
        return self.render_chat([{"role": "user", "content": question}])

    def encode_chat(self, question: str) -> list[int]:
        return self.encode(self.chat_prompt(question))


def _special(token: str) -> AddedToken:
    return AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False,
                      single_word=False)
