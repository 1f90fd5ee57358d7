"""Text in, text out: `decode` picks plain, speculative or another architecture's decoding; text
streams in pieces that join to the full decode; decode_batch / decode_many give many prompts in one
engine exactly what each gets alone, in input order, whatever the batch size."""

import pytest
import torch

from mtplab.config import ModelConfig
from mtplab.errors import MtplabError
from mtplab.inference.decode import TextDecoder, decode, decode_batch, decode_many, generate, stream
from mtplab.inference.generate import generate_ids, generate_plain, generate_speculative
from mtplab.inference.sampling import SamplingParams
from mtplab.monostep.config import MonostepConfig
from mtplab.monostep.model import Monostep
from mtplab.models.transformer import Transformer
from mtplab.tokenizer import Tokenizer


def random_model(family="parallel", seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                                   mtp=family, n_future=4)).eval()


def prompts_of_different_lengths(n=7, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (1 + (5 * i) % 17,), generator=gen).tolist() for i in range(n)]


def alone(model, prompt, n, params=SamplingParams(), eos_id=None, speculative=False):
    if speculative:
        return [t for e in generate_speculative(model, prompt, n, params, eos_id) for t in e.tokens]
    return generate_ids(model, prompt, n, params, eos_id)


def events(decoded):
    return [(e.tokens, e.drafts, e.finished) for e in decoded]


def test_decode_speculates_by_default_only_when_the_model_has_draft_heads():
    model = random_model()
    prompt = [3, 1, 4, 1, 5]
    speculative = events(generate_speculative(model, prompt, 12))
    plain = events(generate_plain(model, prompt, 12))
    assert any(drafts for _, drafts, _ in speculative) and not any(drafts for _, drafts, _ in plain)
    assert events(decode(model, prompt, 12)) == speculative
    assert events(decode(model, prompt, 12, speculative=False)) == plain
    assert events(decode(model, prompt, 12, n_draft=1)) == events(generate_speculative(model, prompt, 12,
                                                                                       n_draft=1))
    torch.manual_seed(0)
    one_head = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                                       n_future=1)).eval()
    assert events(decode(one_head, prompt, 12)) == events(generate_plain(one_head, prompt, 12))


def test_text_decoder_pieces_join_to_the_full_decode_even_with_broken_utf8():
    tok = Tokenizer.train(["plain ascii text " * 20], 300)
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    lead, cont = tok.token_to_id("Ã"), tok.token_to_id("©")  # the bytes 0xC3 and 0xA9: "é" when joined
    for ids in ([a, lead, cont, b], [a, lead, b, cont], [lead], [a, cont, cont], [a, lead, lead, cont]):
        decoder = TextDecoder(tok)
        pieces = [decoder.feed([t]) for t in ids] + [decoder.flush()]
        assert "".join(pieces) == tok.decode(ids), ids
    decoder = TextDecoder(tok)
    assert decoder.feed([a, lead]) == "a" and decoder.feed([cont]) == "é"  # a split character waits


def test_streamed_text_joins_to_the_full_decode(tiny_run):
    import mtplab

    model, tok = mtplab.load(tiny_run[0])
    pieces, streamed = zip(*stream(model, tok, "Ava has 3 apples.", chat=True, max_new_tokens=40))
    ids = [t for e in streamed for t in e.tokens]
    assert "".join(pieces) == tok.decode(ids)
    assert ids == generate_ids(model, tok.encode(tok.chat_prompt("Ava has 3 apples.")), 40, eos_id=tok.eos_id)
    assert generate(model, tok, "Ava has 3 apples.", chat=True, max_new_tokens=40) == "".join(pieces)
    decoder = TextDecoder(tok)
    emoji = tok.encode("🙂 ok")
    assert len(emoji) > 2  # a character split over byte tokens
    assert "".join(decoder.feed([i]) for i in emoji) == "🙂 ok"


def test_generate_samples_with_a_seed_and_repeats_it(tiny_run):
    import mtplab

    model, tok = mtplab.load(tiny_run[0])
    prompt = "Ben has 12 pens."
    hot = dict(max_new_tokens=24, temperature=1.5, seed=5)
    first = generate(model, tok, prompt, **hot)
    assert first == generate(model, tok, prompt, **hot)
    assert first != generate(model, tok, prompt, max_new_tokens=24, temperature=1.5, seed=6)
    assert first != generate(model, tok, prompt, max_new_tokens=24)  # greedy by default


@pytest.mark.parametrize("family", ["parallel", "sequential"])
@pytest.mark.parametrize("speculative", [False, True])
def test_batched_greedy_equals_batch_1_in_input_order(family, speculative):
    model = random_model(family)
    prompts = prompts_of_different_lengths(6)
    free = alone(model, prompts[0], 16)
    eos = free[7]  # a token the model does emit: some rows stop early, at different steps
    expected = [alone(model, p, 16, eos_id=eos) for p in prompts]
    assert len({len(e) for e in expected}) > 1
    for batch_size in (3, 16):
        done = list(decode_batch(model, prompts, 16, eos_id=eos, batch_size=batch_size,
                                 speculative=speculative))
        assert [c.index for c in done] == list(range(len(prompts)))
        assert [c.ids for c in done] == expected, batch_size
        assert [c.prompt_ids for c in done] == prompts
        for c in done:
            assert c.stats.tokens == c.tokens and c.stats.prefills == 1
            if c.stats.forwards:  # else the prompt's forward gave the end-of-text: tau 0
                assert c.tau == c.stats.decoded / c.stats.forwards
                # tau counts decoding forwards only, the end-of-text included: plain is exactly 1
                assert c.tau >= 1 if speculative else c.tau == 1


def test_seeded_sampling_rows_draw_as_they_would_alone():
    model = random_model()
    prompts = prompts_of_different_lengths(5)
    params = SamplingParams(temperature=1.0, top_k=20, seed=11)
    for speculative in (False, True):
        expected = [alone(model, p, 15, params, speculative=speculative) for p in prompts]
        done = decode_batch(model, prompts, 15, params, batch_size=4, speculative=speculative)
        assert [c.ids for c in done] == expected


def test_monostep_prompts_decode_one_at_a_time_as_alone():
    torch.manual_seed(1)
    model = Monostep(MonostepConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2,
                                    max_seq_len=48, n_future=4, empty_token=1)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    prompts = prompts_of_different_lengths(4)
    prompts = [[t % 40 for t in p] for p in prompts]
    expected = [[t for e in decode(model, p, 12) for t in e.tokens] for p in prompts]
    done = list(decode_batch(model, prompts, 12, batch_size=8))
    assert [c.ids for c in done] == expected and [c.index for c in done] == [0, 1, 2, 3]
    with pytest.raises(MtplabError, match="Monostep"):
        list(decode_batch(model, prompts, 12, speculative=True))


def test_texts_equal_generate(tiny_run):
    import mtplab

    model, tokenizer = mtplab.load(tiny_run[0])
    questions = ["Ava has 3 apples.", "Ben has 12 pens and buys 4 more. How many pens now?", "7 + 5"]
    done = list(decode_many(model, tokenizer, questions, chat=True, max_new_tokens=24, batch_size=2))
    assert [c.text for c in done] == [generate(model, tokenizer, q, chat=True, max_new_tokens=24)
                                      for q in questions]


def test_bad_input():
    model = random_model()
    with pytest.raises(MtplabError, match="batch size must be >= 1"):
        list(decode_batch(model, [[1, 2]], 4, batch_size=0))
    with pytest.raises(MtplabError, match="prompt 2 is empty"):
        list(decode_batch(model, [[1, 2], []], 4))
    with pytest.raises(MtplabError, match="n_draft"):
        list(decode_batch(model, [[1, 2]], 4, speculative=True, n_draft=9))
    assert list(decode_batch(model, [], 4)) == []
