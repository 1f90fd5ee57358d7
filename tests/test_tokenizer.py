import pytest

from mtplab.errors import MtplabError
from mtplab.tokenizer import Tokenizer
from tests.conftest import shared_path

SPECIALS = ["<pad>", "<empty>", "<system>", "<user>", "<assistant>"]
CORPUS = ["Ava has 12 apples. Then Ava buys 5 more apples.", "Ben has 3 * 4 = 12 coins.\n#### 12"] * 50


def test_round_trip_and_special_ids():
    tok = Tokenizer.train(CORPUS, vocab_size=300, special_tokens=SPECIALS)
    assert [tok.token_to_id(t) for t in ["<|endoftext|>"] + SPECIALS] == [0, 1, 2, 3, 4, 5]
    text = "Zoë has 7 marbles — then 3 more!\n#### 10"  # characters never seen in training
    assert tok.decode(tok.encode(text)) == text
    prompt = tok.chat_prompt("  What is 2 + 2?  ")
    assert prompt == "<system> You are a helpful math assistant.\n<user> What is 2 + 2?\n<assistant> "
    ids = tok.encode(prompt)
    assert ids[0] == tok.token_to_id("<system>") and tok.token_to_id("<assistant>") in ids
    assert tok.decode(ids, skip_special_tokens=False) == prompt


def test_saved_tokenizer_loads_identically(tmp_path):
    tok = Tokenizer.train(CORPUS, vocab_size=300, special_tokens=SPECIALS)
    tok.save(tmp_path)
    again = Tokenizer.from_path(tmp_path / "tokenizer.json")
    assert again.encode("Ava buys 5 apples") == tok.encode("Ava buys 5 apples")
    assert again.vocab_size == tok.vocab_size


def test_gpt2_style_files_get_specials_appended_in_order(tmp_path):
    base = Tokenizer.train(CORPUS, vocab_size=280)
    base.hf.model.save(str(tmp_path))  # writes vocab.json + merges.txt, like GPT-2's files
    tok = Tokenizer.from_path(tmp_path, SPECIALS)
    n = base.vocab_size
    assert [tok.token_to_id(t) for t in SPECIALS] == list(range(n, n + 5))
    assert tok.eos_id == base.eos_id
    assert tok.encode("Ava has 12 apples.") == base.encode("Ava has 12 apples.")


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(MtplabError, match="no tokenizer"):
        Tokenizer.from_path(tmp_path)


def test_gpt2_files_from_shared_data():
    path = shared_path("tokenizers", "gpt2")
    tok = Tokenizer.from_path(path, SPECIALS)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_id == 50256
    assert [tok.token_to_id(t) for t in SPECIALS] == [50257, 50258, 50259, 50260, 50261]
    assert tok.vocab_size == 50262
