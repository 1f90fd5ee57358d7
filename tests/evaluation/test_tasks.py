"""`mtplab eval --task loss` on question/answer examples: every example is scored, the long ones
with a sliding window (or cut, or skipped when asked), and the summary says how."""

import json

import pytest
import torch

from mtplab.config import ModelConfig
from mtplab.data.batches import IGNORE
from mtplab.errors import MtplabError
from mtplab.evaluation.tasks import _collate, answer_rows, evaluate_task
from mtplab.models.transformer import Transformer
from mtplab.evaluation.head_loss import evaluate_heads


def scored_targets(rows, k):
    """For head k: (global index of each label it scores, tokens of context before its position)."""
    out = []
    for inputs, labels in rows:
        for u in range(len(inputs) - k):
            if labels[u + k] != IGNORE:
                out.append((labels[u + k], u))
    return out


def test_long_example_windows_score_every_answer_token_once_per_head():
    prompt, answer = list(range(100, 130)), list(range(200, 250))  # 80 tokens, window 16
    ids = prompt + answer
    for k in range(4):
        fitting = [ids[t + 1 + k] for t in range(len(ids) - 1 - k) if t + 1 + k >= len(prompt)]
        got = scored_targets(answer_rows(prompt, answer, 16), k)
        assert sorted(t for t, _ in got) == sorted(fitting)  # each answer token once, none else
        # every label is scored with at least half a window (less the head's offset) before it,
        # except in the first window
        assert all(u >= 8 - k for t, u in got if ids.index(t) - 1 - k >= 16)
    rows = answer_rows(prompt, answer, 16)
    assert all(len(x) == len(y) <= 16 for x, y in rows)
    assert answer_rows(prompt, answer, 16, "skip") == []
    (cut,) = answer_rows(prompt, answer, 16, "truncate")
    assert cut[0] == ids[-17:-1] and [t for t in cut[1] if t != IGNORE] == answer[-16:]
    assert answer_rows(prompt, answer, 100) == [(ids[:-1], [IGNORE] * 29 + answer)]


@pytest.mark.parametrize("family", ["parallel", "sequential"])
def test_windowed_loss_equals_the_full_context_loss_when_context_does_not_matter(family):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=128, n_future=3,
                         mtp=family, head_layers=1)
    model = Transformer(config).eval()
    with torch.no_grad():  # no attention: each position sees its own token only (RoPE, no position table)
        for name, p in model.named_parameters():
            if "o_proj" in name:
                p.zero_()
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randint(0, 64, (n,), generator=g).tolist(), torch.randint(0, 64, (m,), generator=g).tolist())
             for n, m in [(30, 50), (5, 70), (12, 3), (60, 9)]]
    full = evaluate_heads(model, _collate([r for p, a in pairs for r in answer_rows(p, a, 128)], 0, 3))
    windowed = evaluate_heads(model, _collate([r for p, a in pairs for r in answer_rows(p, a, 16)], 0, 3))
    assert windowed == pytest.approx(full, abs=1e-5)


def test_eval_loss_scores_every_example_and_says_how(capsys, tiny_run, tmp_path):
    from mtplab.cli import main

    out, _ = tiny_run  # a 160-token context
    data = tmp_path / "qa.jsonl"
    long_question = "Ava has 3 apples. " * 60 + "How many apples does Ava have now?"
    rows = [{"question": "Ava has 3 apples. How many apples does Ava have now?", "answer": "3\n#### 3"},
            {"question": long_question, "answer": "Ava has 3 apples.\n#### 3"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {}
    for mode in ("window", "truncate", "skip"):
        assert main(["eval", str(out), "--task", "loss", "--data", str(data), "--json",
                     "--long-examples", mode]) == 0
        results[mode] = json.loads(capsys.readouterr().out)
    assert results["window"]["scored_examples"] == results["truncate"]["scored_examples"] == 2
    assert results["skip"]["scored_examples"] == 1 and results["skip"]["skipped_longer_than_context"] == 1
    assert all(r["longer_than_context"] == 1 for r in results.values())
    assert results["window"]["head_losses"] != results["skip"]["head_losses"]
    assert main(["eval", str(out), "--task", "loss", "--data", str(data)]) == 0
    summary = capsys.readouterr().out
    assert "of 2 examples" in summary and "1 longer than the 160-token context, scored with a sliding window" in summary
    only_long = tmp_path / "long.jsonl"
    only_long.write_text(json.dumps(rows[1]) + "\n")
    import mtplab

    model, tokenizer = mtplab.load(out)
    with pytest.raises(MtplabError, match="no example fits the 160-token context"):
        evaluate_task(model, tokenizer, "loss", str(only_long), long="skip")
