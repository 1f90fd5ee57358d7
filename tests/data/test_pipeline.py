"""From a recipe's [data] and [tokenizer] to batches: which examples train and which are held out,
chat batches that score the answer (and its eos) only, packed batches cut from the token files."""

import json
import re

import pytest

from mtplab.config import load_config
from mtplab.data.batches import IGNORE, ChatBatches, PackedBatches
from mtplab.data.packed import open_tokens
from mtplab.data.pipeline import build_dataset, build_tokenizer, chat_pairs, hold_out_documents, load_examples
from mtplab.errors import MtplabError
from mtplab.tokenizer import Tokenizer

PAIRS = [{"question": f"Ava has {i} apples and buys {i + 2} more. How many?",
          "answer": f"{2 * i + 2}. #### {2 * i + 2}"} for i in range(1, 21)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(*overrides):
    return load_config(None, ["tokenizer.vocab_size=300", "train.batch_size=4", *overrides])


def test_jsonl_holds_out_its_last_examples_or_reads_the_eval_file(tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    train, held_out = load_examples(config("data.source=jsonl", f"data.path={train_file}",
                                           "data.eval_fraction=0.1"))
    assert train == PAIRS[:18] and held_out == PAIRS[18:]  # the last 10%, in file order
    eval_file = write_jsonl(tmp_path / "eval.jsonl", PAIRS[:3])
    train, held_out = load_examples(config("data.source=jsonl", f"data.path={train_file},{eval_file}",
                                           f"data.eval_path={eval_file}"))
    assert train == PAIRS + PAIRS[:3] and held_out == PAIRS[:3]  # comma-separated paths train together
    one = write_jsonl(tmp_path / "one.jsonl", PAIRS[:1])
    with pytest.raises(MtplabError, match="need at least two examples"):
        load_examples(config("data.source=jsonl", f"data.path={one}"))


def test_synthetic_problems_come_in_the_sizes_asked():
    train, held_out = load_examples(config("data.n_train=30", "data.n_eval=7"))
    assert len(train) == 30 and len(held_out) == 7
    # GSM8K's shape: worked steps, then the final number after ####
    assert all(re.fullmatch(r"(?s).+\n#### \d+", ex["answer"]) for ex in train + held_out)
    assert load_examples(config("data.n_train=30", "data.n_eval=7")) == (train, held_out)  # seeded
    assert load_examples(config("data.n_train=30", "data.n_eval=7", "data.seed=1"))[0] != train


def test_one_text_file_is_cut_at_the_eval_fraction(tmp_path):
    text = "".join(f"line {i}\n" for i in range(100))
    (tmp_path / "t.txt").write_text(text)
    train, held_out = load_examples(config("data.source=text", "data.format=lm",
                                           f"data.path={tmp_path / 't.txt'}", "data.eval_fraction=0.25"))
    cut = int(len(text) * 0.75)
    assert train == [text[:cut]] and held_out == [text[cut:]]


def test_missing_path_and_empty_text_are_errors(tmp_path):
    with pytest.raises(MtplabError, match="data.path is required for data.source = 'jsonl'"):
        load_examples(config("data.source=jsonl"))
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(MtplabError, match="the corpus is empty"):
        load_examples(config("data.source=text", "data.format=lm", f"data.path={tmp_path / 'blank.txt'}"))
    with pytest.raises(MtplabError, match="nothing to train a tokenizer on"):
        build_tokenizer(config(), ["", "   "])


def test_whole_documents_are_held_out_from_the_end_until_the_fraction_is_reached():
    docs = ["a" * 50, "b" * 30, "c" * 15, "d" * 5]
    assert hold_out_documents(docs, 0.05) == (docs[:3], docs[3:])  # 5 of 100 characters: enough
    assert hold_out_documents(docs, 0.06) == (docs[:2], docs[2:])  # 5 is short of 6: one more
    assert hold_out_documents(docs, 0.9) == (docs[:1], docs[1:])  # at least one stays to train on
    assert hold_out_documents(docs[:2], 0.0) == (docs[:1], docs[1:2])  # at least one is held out


def test_chat_pairs_are_the_chat_prompt_then_the_stripped_answer_and_eos():
    tok = Tokenizer.train([p["question"] + "\n" + p["answer"] for p in PAIRS], 300)
    (prompt, answer), = chat_pairs([{"question": PAIRS[0]["question"], "answer": "  4. #### 4\n"}], tok)
    assert prompt == tok.encode(tok.chat_prompt(PAIRS[0]["question"]))
    assert answer == tok.encode("4. #### 4") + [tok.eos_id]


def test_chat_dataset_scores_only_the_answers_and_their_eos(tmp_path):
    data = config("data.source=jsonl", f"data.path={write_jsonl(tmp_path / 'qa.jsonl', PAIRS)}",
                  "data.eval_fraction=0.2", "data.seq_len=128")
    dataset = build_dataset(data, tmp_path / "run")
    tok = dataset.tokenizer
    assert isinstance(dataset.train, ChatBatches) and isinstance(dataset.eval, ChatBatches)
    assert tok.vocab_size == 300 and dataset.eval_examples == PAIRS[16:]
    assert not (tmp_path / "run" / "data").exists()  # chat batches are built in memory
    inputs, labels = next(dataset.eval.eval_batches(1))
    for row, example in enumerate(PAIRS[16:20]):
        prompt = tok.encode(tok.chat_prompt(example["question"]))
        answer = tok.encode(example["answer"]) + [tok.eos_id]
        scored = labels[row][labels[row] != IGNORE].tolist()
        assert scored == answer  # the answer's tokens and eos, nothing of the prompt
        assert inputs[row, :len(prompt)].tolist() == prompt
        # label t is input t + 1: the first scored label sits on the prompt's last token
        assert labels[row, len(prompt) - 2] == IGNORE and labels[row, len(prompt) - 1] == answer[0]


def test_lm_dataset_packs_every_document_with_eos_into_token_files(tmp_path):
    data = config("data.source=jsonl", f"data.path={write_jsonl(tmp_path / 'qa.jsonl', PAIRS)}",
                  "data.format=lm", "data.eval_fraction=0.2", "data.seq_len=16")
    dataset = build_dataset(data, tmp_path / "run")
    tok = dataset.tokenizer
    assert isinstance(dataset.train, PackedBatches)
    packed = open_tokens(tmp_path / "run" / "data" / "eval.bin").tolist()
    documents = [tok.encode(f"{p['question']}\n{p['answer']}{tok.eos}") + [tok.eos_id] for p in PAIRS[16:]]
    assert packed == [t for doc in documents for t in doc]
    inputs, labels = next(dataset.eval.eval_batches(1))
    assert inputs[0].tolist() == packed[:16] and labels[0].tolist() == packed[1:17]  # every token scored


def test_too_little_data_for_the_sequence_length_is_a_one_line_error(tmp_path):
    data = config("data.source=jsonl", f"data.path={write_jsonl(tmp_path / 'qa.jsonl', PAIRS[:4])}",
                  "data.format=lm", "data.eval_fraction=0.25", "data.seq_len=512")
    with pytest.raises(MtplabError) as err:
        build_dataset(data, tmp_path / "run")
    assert str(err.value).startswith("data: only ") and "too few for one sequence of 512" in str(err.value)
    chat = config("data.source=jsonl", f"data.path={write_jsonl(tmp_path / 'qa.jsonl', PAIRS[:4])}",
                  "data.seq_len=4")
    with pytest.raises(MtplabError, match="data: no example fits in seq_len=4"):
        build_dataset(chat, tmp_path / "chat")


def test_a_given_tokenizer_is_used_as_it_is(tmp_path):
    tok = Tokenizer.train(["Ava has apples. How many? #### 7"] * 10, 280)
    data = config("data.source=jsonl", f"data.path={write_jsonl(tmp_path / 'qa.jsonl', PAIRS)}")
    assert build_dataset(data, tmp_path / "run", tokenizer=tok).tokenizer is tok
