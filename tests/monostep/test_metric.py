"""Seed 000's metric (cross-entropy of the next block from each block start) for Monostep and for
causal models, and `mtplab eval` on a Monostep checkpoint."""

import math

import pytest
import torch
import torch.nn.functional as F

from mtplab.config import ModelConfig
from mtplab.monostep.data import BlockBatches
from mtplab.monostep.metric import causal_block_loss, monostep_block_loss
from mtplab.evaluation.tasks import evaluate_task
from mtplab.models.checkpoint import save_checkpoint
from mtplab.monostep.config import MonostepConfig
from mtplab.monostep.model import Monostep
from mtplab.models.transformer import Transformer
from mtplab.tokenizer import Tokenizer

V, E, PAD, EOS = 40, 39, 38, 0
PAIRS = [([1, 2, 3], [4, 5, 6, 7, 8, EOS]), ([9], [10, 11, EOS]), ([12, 13], [14, EOS])]


def manual(logits_for, pairs, slots):
    """Mean CE over every (block start, slot) with a token, by brute force."""
    total, count = 0.0, 0
    for prompt, answer in pairs:
        ids = prompt + answer
        for start in range(len(prompt), len(ids), slots):
            logits = logits_for(ids[:start])  # [slots, V]
            for k in range(slots):
                if start + k < len(ids):
                    total += F.cross_entropy(logits[k][None], torch.tensor([ids[start + k]])).item()
                    count += 1
    return total / count


def test_monostep_block_loss_is_the_mean_over_scored_slots():
    model = Monostep(MonostepConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2,
                                    max_seq_len=32, n_future=4, empty_token=E)).eval()
    batches = BlockBatches(PAIRS, 4, 2, PAD, E, 32)
    expected = manual(lambda prefix: model(torch.tensor([prefix]))[0], PAIRS, 4)
    got = monostep_block_loss(model, batches)
    assert got["loss"] == pytest.approx(expected, abs=1e-5)
    assert got["tokens"] == sum(len(a) for _, a in PAIRS)


@pytest.mark.parametrize("family", ["parallel", "slots", "medusa"])
def test_causal_block_loss_reads_head_k_at_each_prefix_end(family):
    model = Transformer(ModelConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, max_seq_len=32,
                                    mtp=family, n_future=4)).eval()

    def heads_at_end(prefix):
        with torch.no_grad():
            return torch.stack([h[0, -1] for h in model(torch.tensor([prefix]))])

    got = causal_block_loss(model, PAIRS, 4)
    assert got["loss"] == pytest.approx(manual(heads_at_end, PAIRS, 4), abs=1e-5)
    # longer than the context: each block from the last `window` tokens before it, none skipped
    model.config.max_seq_len = 4
    short = causal_block_loss(model, PAIRS, 4)
    assert short["tokens"] == got["tokens"]
    assert short["loss"] == pytest.approx(manual(lambda prefix: heads_at_end(prefix[-4:]), PAIRS, 4), abs=1e-5)
    with pytest.raises(ValueError, match="heads"):
        causal_block_loss(model, PAIRS, 5)


@pytest.fixture(scope="module")
def monostep_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("mono")
    text = "Ava has 3 apples and buys 4 more. She has 7 apples now. " * 30
    tok = Tokenizer.train([text], 200, ["<pad>", "<empty>", "<system>", "<user>", "<assistant>"])
    model = Monostep(MonostepConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2,
                                    max_seq_len=24, n_future=4, empty_token=tok.token_to_id("<empty>")))
    save_checkpoint(out, model.eval(), tok)
    (out / "text.txt").write_text(text[:400])
    (out / "qa.jsonl").write_text('{"question": "Ava has 3 apples and buys 4.", "answer": "She has 7. #### 7"}\n' * 3)
    return out, model, tok


def test_eval_tasks_on_a_monostep_checkpoint(monostep_checkpoint):
    out, model, tok = monostep_checkpoint
    loss, _ = evaluate_task(model, tok, "loss", str(out / "qa.jsonl"))
    assert len(loss["head_losses"]) == 4 and all(math.isfinite(l) for l in loss["head_losses"])
    text_loss, _ = evaluate_task(model, tok, "loss", str(out / "text.txt"))
    assert math.isfinite(text_loss["loss"])
    ppl, summary = evaluate_task(model, tok, "ppl", str(out / "text.txt"))
    ids = tok.encode((out / "text.txt").read_text())
    assert ppl["tokens"] == len(ids) - 1  # every token but the first, once
    first = [F.cross_entropy(model(torch.tensor([ids[max(0, i - 24):i]]))[0, :1], torch.tensor([ids[i]])).item()
             for i in range(1, 6)]  # slot 0 on the first positions, by hand
    # by hand: the text in windows of 24 tokens, each scoring its 23 positions after its first token,
    # every position with the window's tokens before it, through slot 0
    by_hand = [F.cross_entropy(model(torch.tensor([ids[start:i]]))[0, :1], torch.tensor([ids[i]])).item()
               for start in range(0, len(ids) - 1, 23) for i in range(start + 1, min(start + 24, len(ids)))]
    assert ppl["nats_per_token"] == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-5)
    assert f"{ppl['tokens']:,} tokens (slot 0): {ppl['nats_per_token']:.4f} nats/token" in summary
    assert sum(first) / 5 == pytest.approx(
        monostep_block_loss(_first(model), BlockBatches([(ids[:1], ids[1:6])], 1, 8, 0, -1, 24))["loss"], abs=1e-5)
    acc, _ = evaluate_task(model, tok, "gsm8k", str(out / "qa.jsonl"), max_new_tokens=8, out=out / "rows.jsonl")
    assert acc["n"] == 3 and (out / "rows.jsonl").is_file()


def _first(model):
    from mtplab.monostep.metric import FirstSlot as _FirstSlot

    return _FirstSlot(model)
