"""Block-autoregressive decoding (monostep/decoding.py): one forward per block of SLOTS tokens,
<empty> dropped, eos ends the answer (the block's other tokens still count), an empty block ends it
too, a limit that SLOTS does not divide gets one more block cut to it, the context keeps its last
max_len tokens."""

import pytest
import torch

from mtplab.errors import MtplabError
from mtplab.inference.sampling import SamplingParams
from mtplab.monostep.config import MonostepConfig
from mtplab.monostep.decoding import generate_blocks
from mtplab.monostep.model import Monostep

EMPTY, EOS = 1, 2


def random_monostep(seed=0, max_len=16):
    torch.manual_seed(seed)
    model = Monostep(MonostepConfig(vocab_size=30, d_model=16, n_layers=1, n_heads=2, max_seq_len=max_len,
                                    n_future=4, dropout=0.0, empty_token=EMPTY)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def scripted(block):
    """A model whose slot k always says block[k], whatever the context."""
    model = random_monostep()
    with torch.no_grad():
        for slot, token in zip(model.slots, block):
            slot.to_vocab.weight.zero_()
            slot.to_vocab.bias.zero_()
            slot.to_vocab.bias[token] = 10.0
    return model


def blocks(model, prompt=(5, 6, 7), limit=8, params=SamplingParams(), eos_id=EOS):
    return [(e.tokens, e.finished) for e in generate_blocks(model, list(prompt), limit, params, eos_id)]


def test_one_event_per_block_until_the_limit():
    model = scripted([10, 11, 12, 13])
    assert blocks(model, limit=8) == [([10, 11, 12, 13], False), ([10, 11, 12, 13], True)]
    # 6 is not a multiple of 4: a second block, cut to the two tokens left
    assert blocks(model, limit=6) == [([10, 11, 12, 13], False), ([10, 11], True)]
    assert blocks(model, limit=1) == [([10], True)]


def test_empty_slots_are_dropped_and_an_empty_block_ends_the_answer():
    assert blocks(scripted([10, EMPTY, 12, EMPTY]), limit=4) == [([10, 12], True)]
    assert blocks(scripted([EMPTY] * 4)) == [([], True)]


def test_eos_ends_the_answer_and_the_tokens_after_it_in_the_block_still_count():
    assert blocks(scripted([10, EOS, 12, 13])) == [([10, 12, 13], True)]
    assert blocks(scripted([10, EOS, 12, 13]), eos_id=None) == [([10, EOS, 12, 13], False),
                                                               ([10, EOS, 12, 13], True)]


def by_hand(model, prompt, n_blocks):
    """Argmax per slot, the block appended, the context cut to its last max_len tokens."""
    ids, out, window = list(prompt), [], model.config.max_seq_len
    with torch.no_grad():
        for _ in range(n_blocks):
            ids = ids[-window:]
            block = [t for t in model(torch.tensor([ids]))[0].argmax(-1).tolist() if t != EMPTY]
            out.append(block)
            ids += block
    return out


def test_greedy_blocks_follow_the_growing_context_cut_to_max_len():
    model = random_monostep(seed=3)
    prompt = list(range(3, 23))  # 20 tokens: longer than the 16-token context
    got = [tokens for tokens, _ in blocks(model, prompt, limit=16, eos_id=None)]
    want = by_hand(model, prompt, 4)
    assert got == want and all(want)  # no block empty: every one of the 4 was decoded
    assert blocks(model, prompt, 16, eos_id=None) == blocks(model, prompt[-16:], 16, eos_id=None)


def test_sampling_with_a_seed_repeats_and_another_seed_differs():
    model = random_monostep(seed=1)
    hot = SamplingParams(temperature=1.5, seed=4)
    first = blocks(model, limit=16, params=hot, eos_id=None)
    assert first == blocks(model, limit=16, params=hot, eos_id=None)
    assert first != blocks(model, limit=16, params=SamplingParams(temperature=1.5, seed=5), eos_id=None)


def test_bad_prompt_and_limit_are_errors():
    model = random_monostep()
    with pytest.raises(MtplabError, match="the prompt is empty"):
        list(generate_blocks(model, [], 4))
    with pytest.raises(MtplabError, match="max_new_tokens must be >= 1, got 0"):
        list(generate_blocks(model, [3], 0))
