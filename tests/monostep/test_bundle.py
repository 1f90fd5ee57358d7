"""Seed 000's bundle -> mtplab checkpoint -> bundle, checked against tests/monostep/model_card.py's
reading of the card: same keys, same logits, same block-greedy text, bit-exact round trips."""

import argparse

import pytest
import torch

from mtplab.errors import MtplabError
from mtplab.inference.decode import generate
from mtplab.models.checkpoint import load_model
from mtplab.interop.convert import ConvertOptions, convert
from mtplab.monostep.bundle import export_bundle, read_bundle
from mtplab.monostep.config import MonostepConfig
from mtplab.monostep.model import Monostep
from mtplab.tokenizer import Tokenizer
from tests.monostep import model_card
from tests.conftest import assert_one_line_error, run_cli, shared_path

QUESTIONS = ["Ava has 3 apples and buys 4 more. How many apples?", "  What is 12 minus 5?  ", "Add 7 and 8."]
CORPUS = ["Ava has 3 apples and buys 4 more. She has 7 apples. #### 7",
          "Tom had 12 marbles, gave away 5 and kept 7. #### 7", "What is 12 minus 5? It is 7."] * 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE whose eos is followed by seed 000's specials, as in GPT-2 + specials."""
    path = tmp_path_factory.mktemp("tok")
    Tokenizer.train(CORPUS, 300, model_card.SPECIALS).save(path)
    return path


def convert_bundle(bundle, tokenizer, out, trust_pickle=None):
    convert("monostep", bundle, out, ConvertOptions(tokenizer=str(tokenizer), trust_pickle=trust_pickle))
    return out


def small_config(vocab: int) -> dict:
    return {"vocab_size": vocab, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_len": 80, "slots": 4,
            "lr": 3e-4, "epochs": 10}


def make_bundle(tmp_path, tokenizer_dir, seed=0, adjust=None):
    tok = Tokenizer.from_path(tokenizer_dir)
    config = small_config(tok.vocab_size)
    reference = model_card.random_model(config, seed)
    if adjust:
        adjust(reference, tok)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=3e-4)
    reference(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.bool)).sum().backward()
    optimizer.step()  # a bundle carries real optimizer state
    optimizer.zero_grad()
    path = tmp_path / f"bundle{seed}.pt"
    model_card.save_bundle(path, reference.eval(), config, optimizer)
    return path, reference, tok, config


def reference_text(reference, tok, config, question, max_new_tokens=64):
    return model_card.generate(reference, lambda s: tok.hf.encode(s).ids,
                            lambda ids: tok.hf.decode(ids, skip_special_tokens=True), question,
                            tok.token_to_id("<empty>"), tok.eos_id, config["max_len"], config["slots"],
                            max_new_tokens)


def test_seed_configuration_has_the_published_size_and_key_names():

    with torch.device("meta"):
        ours = Monostep(MonostepConfig(vocab_size=50262, d_model=64, n_layers=4, n_heads=4,
                                       max_seq_len=512, n_future=4, dropout=0.1))
        theirs = model_card.Monostep(50262)
    assert ours.num_parameters() == 16_567_960
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_converted_bundle_gives_the_seed_models_logits(tmp_path, tokenizer_dir):
    bundle, reference, tok, config = make_bundle(tmp_path, tokenizer_dir)
    out = convert_bundle(bundle, tokenizer_dir, tmp_path / "ckpt")
    model, tokenizer = load_model(out)
    assert isinstance(model, Monostep) and tokenizer.vocab_size == config["vocab_size"]
    ids = torch.randint(0, config["vocab_size"], (3, 11))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 7:] = False  # right padding, as in a training batch
    mask[2, 3:] = False
    with torch.no_grad():
        diff = (model(ids, mask) - reference(ids, mask)).abs().max().item()
    assert diff < 1e-5


def _favour(token: str, slot: int, amount: float):
    def adjust(reference, tok):
        with torch.no_grad():
            reference.slots[slot].to_vocab.bias[tok.token_to_id(token)] += amount
    return adjust


def _favour_everywhere(token: str):
    def adjust(reference, tok):
        for slot in range(len(reference.slots)):
            _favour(token, slot, 40.0)(reference, tok)
    return adjust


@pytest.mark.parametrize("seed,adjust", [(0, None), (1, None), (2, _favour("<empty>", 1, 40.0)),
                                         (3, _favour("<|endoftext|>", 2, 40.0)),
                                         (4, _favour("<empty>", 0, 40.0)), (5, _favour_everywhere("<empty>"))])
def test_block_greedy_text_equals_the_seeds_generate(tmp_path, tokenizer_dir, seed, adjust):
    """Including blocks with <empty> in them, a block holding eos with tokens after it (kept, as the
    card's decode keeps them), an all-<empty> first block (nothing), and contexts beyond max_len."""
    bundle, reference, tok, config = make_bundle(tmp_path, tokenizer_dir, seed, adjust)
    model, tokenizer = load_model(convert_bundle(bundle, tokenizer_dir, tmp_path / "ckpt"))
    for question in QUESTIONS:
        expected = reference_text(reference, tok, config, question)
        assert generate(model, tokenizer, question, chat=True, max_new_tokens=64) == expected


def test_blocks_stream_as_one_event_each(tmp_path, tokenizer_dir):
    from mtplab.inference.decode import decode

    bundle, *_ = make_bundle(tmp_path, tokenizer_dir, 2, _favour("<empty>", 1, 40.0))
    model, tokenizer = load_model(convert_bundle(bundle, tokenizer_dir, tmp_path / "ckpt"))
    events = list(decode(model, tokenizer.encode_chat(QUESTIONS[0]), 40, eos_id=tokenizer.eos_id))
    assert len(events) == 10 and all(len(e.tokens) == 3 for e in events)  # slot 1 always <empty>
    assert events[-1].finished and not any(e.finished for e in events[:-1])


def test_export_then_convert_round_trips_bit_exactly(tmp_path, tokenizer_dir):
    bundle_path, *_ = make_bundle(tmp_path, tokenizer_dir)
    original = read_bundle(bundle_path)
    exported = export_bundle(convert_bundle(bundle_path, tokenizer_dir, tmp_path / "a"), tmp_path / "a.pt")
    again = export_bundle(convert_bundle(exported, tokenizer_dir, tmp_path / "b"), tmp_path / "b.pt")
    for path in (exported, again):
        bundle = read_bundle(path)  # weights_only: the exported file is safe to load
        assert bundle["model_state_dict"].keys() == original["model_state_dict"].keys()
        assert all(torch.equal(bundle["model_state_dict"][k], v) for k, v in original["model_state_dict"].items())
        osd, ref = bundle["optimizer_state_dict"], original["optimizer_state_dict"]
        assert osd["param_groups"] == ref["param_groups"]
        assert all(torch.equal(osd["state"][i][name], value) for i, s in ref["state"].items()
                   for name, value in s.items())
        for key in ("config", "train_history", "eval_history", "sample_output"):
            assert bundle[key] == original[key]


def test_a_bundle_with_arbitrary_objects_needs_trust_pickle(tmp_path, tokenizer_dir):
    path, *_ = make_bundle(tmp_path, tokenizer_dir)
    bundle = torch.load(path, weights_only=True)
    bundle["args"] = argparse.Namespace(lr=3e-4)
    torch.save(bundle, path)
    with pytest.raises(MtplabError, match="argparse.Namespace.*--trust-pickle"):
        convert_bundle(path, tokenizer_dir, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    assert load_model(convert_bundle(path, tokenizer_dir, tmp_path / "ok", trust_pickle=True))


def test_a_tokenizer_with_the_specials_in_another_order_is_refused(tmp_path, tokenizer_dir):
    path, *_ = make_bundle(tmp_path, tokenizer_dir)
    other = tmp_path / "other-tok"
    Tokenizer.train(CORPUS, 300, ["<empty>", "<pad>", "<system>", "<user>", "<assistant>"]).save(other)
    with pytest.raises(MtplabError, match="<pad> has id"):
        convert_bundle(path, other, tmp_path / "ckpt")


def test_not_a_bundle(tmp_path, tokenizer_dir):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(MtplabError, match="not a torch.save file"):
        read_bundle(junk)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(MtplabError, match="not a Monostep bundle"):
        read_bundle(tmp_path / "other.pt")


def test_gpt2_tokenizer_matches_the_seeds_and_decodes_alike(tmp_path):
    """With the real GPT-2 files: ids 50257-50261, the prompt tokenized exactly as transformers'
    tokenizer with the card's add_special_tokens, and the block-greedy text equal to the card's."""
    from transformers import AutoTokenizer

    gpt2 = shared_path("tokenizers", "gpt2")
    hf = AutoTokenizer.from_pretrained(gpt2)  # the card's tokenizer, from local files
    hf.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": model_card.SPECIALS[1:]})
    config = {"vocab_size": len(hf), "d_model": 16, "n_layers": 1, "n_heads": 2, "max_len": 64, "slots": 4}
    reference = model_card.random_model(config, seed=5)
    model_card.save_bundle(tmp_path / "b.pt", reference, config)
    model, tokenizer = load_model(convert_bundle(tmp_path / "b.pt", gpt2, tmp_path / "ckpt"))
    assert [tokenizer.token_to_id(t) for t in model_card.SPECIALS] == list(range(50257, 50262))
    for question in QUESTIONS:
        prompt = tokenizer.chat_prompt(question)
        assert tokenizer.encode(prompt) == hf(prompt, add_special_tokens=False).input_ids
        expected = model_card.generate(reference, lambda s: hf(s, add_special_tokens=False).input_ids,
                                    lambda ids: hf.decode(ids, skip_special_tokens=True), question,
                                    hf.convert_tokens_to_ids("<empty>"), hf.convert_tokens_to_ids("<|endoftext|>"),
                                    64, 4, 48)
        assert generate(model, tokenizer, question, chat=True, max_new_tokens=48) == expected


def test_cli_convert_and_export(tmp_path, tokenizer_dir, capsys):
    path, reference, tok, config = make_bundle(tmp_path, tokenizer_dir)
    code, out, err = run_cli(capsys, "convert", "monostep", str(path), "--tokenizer", str(tokenizer_dir),
                             "--out", str(tmp_path / "ckpt"))
    assert code == 0 and "unused: none; missing: none" in out
    code, out, err = run_cli(capsys, "export", "monostep", str(tmp_path / "ckpt"), "--out", str(tmp_path / "b.pt"))
    assert code == 0 and read_bundle(tmp_path / "b.pt")["config"] == config
    code, out, err = run_cli(capsys, "generate", str(tmp_path / "ckpt"), "--chat", "--prompt", QUESTIONS[0],
                             "--max-new-tokens", "64")
    assert code == 0 and out == reference_text(reference, tok, config, QUESTIONS[0]) + "\n"
    for args, message in [(["convert", "monostep", str(path), "--out", str(tmp_path / "x")], "--tokenizer"),
                          (["convert", "monostep", str(path), "--tokenizer", str(tokenizer_dir), "--heads", "2",
                            "--out", str(tmp_path / "x")], "--heads does not apply"),
                          (["export", "monostep", str(tmp_path / "missing"), "--out", str(tmp_path / "c.pt")],
                           "no checkpoint"),
                          (["export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")], "export monostep"),
                          (["generate", str(tmp_path / "ckpt"), "--prompt", "hi", "--speculative"], "blocks"),
                          (["bench", str(tmp_path / "ckpt")], "blocks")]:
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, message)
    assert not (tmp_path / "x").exists() and not (tmp_path / "hf").exists()


def test_a_token_limit_that_slots_do_not_divide_is_never_exceeded(tmp_path, tokenizer_dir):
    from mtplab.inference.decode import decode

    bundle, *_ = make_bundle(tmp_path, tokenizer_dir)
    model, tokenizer = load_model(convert_bundle(bundle, tokenizer_dir, tmp_path / "ckpt"))
    for limit in (1, 2, 5, 7):
        events = list(decode(model, tokenizer.encode_chat(QUESTIONS[0]), limit, eos_id=None))
        assert sum(len(e.tokens) for e in events) <= limit and len(events) <= -(-limit // 4)
        assert events[-1].finished
