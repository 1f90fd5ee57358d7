"""From a recipe's [data] and [tokenizer] sections to a tokenizer and train/eval batch iterators."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..errors import MtplabError
from ..tokenizer import Tokenizer
from .batches import ChatBatches, PackedBatches
from .packed import pack_tokens, read_text_files
from .qa import load_qa_jsonl, qa_to_text
from .synthetic import make_split


@dataclass
class Dataset:
    tokenizer: Tokenizer
    train: ChatBatches | PackedBatches
    eval: ChatBatches | PackedBatches
    eval_examples: list[dict]  # held-out question/answer pairs, for accuracy (empty for text)


def _split(items: list, fraction: float) -> tuple[list, list]:
    n_eval = max(1, int(len(items) * fraction))
    if len(items) < 2:
        raise MtplabError("need at least two examples to hold one out for evaluation")
    return items[:-n_eval], items[-n_eval:]


def load_examples(config: Config) -> tuple[list, list]:
    """Train and held-out examples: question/answer dicts, or raw text strings for `text`."""
    data = config.data
    if data.source == "synthetic":
        return make_split(data.n_train, data.n_eval, data.seed, data.max_steps, data.max_number)
    paths = [p.strip() for p in data.path.split(",") if p.strip()]
    if not paths:
        raise MtplabError(f"data.path is required for data.source = {data.source!r}")
    if data.source == "jsonl":
        train = [ex for p in paths for ex in load_qa_jsonl(p)]
        if data.eval_path:
            return train, load_qa_jsonl(data.eval_path)
        return _split(train, data.eval_fraction)
    texts = read_text_files(paths)
    if not any(t.strip() for t in texts):
        raise MtplabError(f"{data.path}: the corpus is empty")
    if data.eval_path:
        return texts, read_text_files([data.eval_path])
    if len(texts) > 1:  # several files (a folder of books): hold out whole ones
        return hold_out_documents(texts, data.eval_fraction)
    text = texts[0]
    cut = int(len(text) * (1 - data.eval_fraction))
    return [text[:cut]], [text[cut:]]


def hold_out_documents(texts: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Whole documents for evaluation: the last ones (in the order given; a directory's by name)
    until they hold `fraction` of the characters, at least one, and at least one left to train on."""
    total, held, n = sum(len(t) for t in texts), 0, 0
    while n < len(texts) - 1 and (n == 0 or held < fraction * total):
        n += 1
        held += len(texts[-n])
    return texts[:-n], texts[-n:]


def build_tokenizer(config: Config, corpus: list[str]) -> Tokenizer:
    tok = config.tokenizer
    if tok.path:
        return Tokenizer.from_path(tok.path, tok.special_tokens, tok.eos, tok.chat_template)
    if not any(t.strip() for t in corpus):
        raise MtplabError("the corpus is empty: nothing to train a tokenizer on")
    return Tokenizer.train(corpus, tok.vocab_size, tok.special_tokens, tok.eos, tok.chat_template)


def _texts(examples: list, tokenizer_eos: str) -> list[str]:
    return [ex if isinstance(ex, str) else qa_to_text(ex, tokenizer_eos) for ex in examples]


def build_dataset(config: Config, work_dir: Path, tokenizer: Tokenizer | None = None) -> Dataset:
    """Tokenize the data named by `config` (training a tokenizer unless one is given or configured);
    packed token files go to `work_dir/data/`."""
    data, train_cfg = config.data, config.train
    train, held_out = load_examples(config)
    if tokenizer is None:
        corpus = [ex if isinstance(ex, str) else f"{ex['question']}\n{ex['answer']}" for ex in train]
        tokenizer = build_tokenizer(config, corpus)
    try:
        if data.format == "chat":
            train_b = ChatBatches(chat_pairs(train, tokenizer), data.seq_len, train_cfg.batch_size,
                                  tokenizer.pad_id, seed=train_cfg.seed)
            eval_b = ChatBatches(chat_pairs(held_out, tokenizer), data.seq_len, train_cfg.batch_size,
                                 tokenizer.pad_id, seed=train_cfg.seed)
        else:
            packed = {}
            for name, examples in (("train", train), ("eval", held_out)):
                docs = tokenizer.encode_batch(_texts(examples, tokenizer.eos))
                packed[name] = pack_tokens(docs, tokenizer.eos_id, work_dir / "data" / f"{name}.bin",
                                           tokenizer.vocab_size)
            train_b = PackedBatches(packed["train"], data.seq_len, train_cfg.batch_size, train_cfg.seed)
            eval_b = PackedBatches(packed["eval"], data.seq_len, train_cfg.batch_size, train_cfg.seed)
    except ValueError as exc:  # too little data for the sequence length
        raise MtplabError(f"data: {exc}") from None
    qa_held_out = [ex for ex in held_out if isinstance(ex, dict)]
    return Dataset(tokenizer, train_b, eval_b, qa_held_out)


def chat_pairs(examples: list[dict], tokenizer: Tokenizer) -> list[tuple[list[int], list[int]]]:
    prompts = tokenizer.encode_batch([tokenizer.chat_prompt(ex["question"]) for ex in examples])
    answers = tokenizer.encode_batch([ex["answer"].strip() for ex in examples])
    return [(p, a + [tokenizer.eos_id]) for p, a in zip(prompts, answers)]
