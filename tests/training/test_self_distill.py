"""Self-distillation of the draft heads: only heads k >= 1 move, towards head 0 at t + k, on the
positions a decoder drafts from."""

import json

import pytest
import torch
import torch.nn.functional as F

import mtplab
from mtplab.errors import MtplabError
from mtplab.inference.generate import generate_ids
from mtplab.models.transformer import Transformer
from mtplab.training.self_distill import Answer, _batch, distill_heads, distill_loss, own_answers
from tests.conftest import assert_one_line_error, feature_model, run_cli

FAMILIES = ["parallel", "sequential", "medusa", "slots"]
EOS = 60


def model_of(family: str, **extra) -> Transformer:
    return feature_model(mtp=family, n_future=3, head_layers=1, **extra)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, EOS, (int(torch.randint(3, 9, (), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def head0_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, n_heads=1)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_draft_heads_move_and_their_loss_falls(family):
    model = model_of(family)
    probe = torch.randint(0, EOS, (2, 12))
    before_logits = head0_logits(model, probe)
    drafts = {id(p) for p in model.heads.draft_parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = prompts(24)
    answers = own_answers(model, data, EOS, max_new_tokens=10)
    batch = _batch(answers, EOS, model.device)
    with torch.no_grad():
        loss_before = float(distill_loss(model, *batch))

    report = distill_heads(model, data, EOS, steps=30, batch_size=24, lr=1e-2, max_new_tokens=10)

    assert torch.equal(head0_logits(model, probe), before_logits)  # head 0 and the trunk: bit for bit
    for name, p in model.named_parameters():
        assert id(p) in drafts or torch.equal(p, before[name]), name
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if id(p) in drafts)
    with torch.no_grad():
        loss_after = float(distill_loss(model, *batch))
    assert loss_after < 0.7 * loss_before, (loss_before, loss_after)
    assert report.steps == 30 and report.prompts == 24 and report.last_loss < report.first_loss
    assert all(p.requires_grad for p in model.parameters()) and not model.training  # left as found


@pytest.mark.parametrize("family", FAMILIES)
def test_the_loss_scores_head_k_at_t_against_head_0_at_t_plus_k_where_a_decoder_drafts(family):
    model = model_of(family)
    answers = [Answer([5, 6, 7, 8, 9, 10, 11, EOS], start=3), Answer([1, 2, 3, 4, 5, 6], start=4)]
    ids, starts, ends = _batch(answers, EOS, model.device)
    with torch.no_grad():
        logits = [x.float() for x in model(ids)]  # head k: [B, T_k, V]
        expected = 0.0
        for k in range(1, model.n_future):
            terms = []
            for b, a in enumerate(answers):
                for t in range(a.start - 1, len(a.ids) - k - 1):  # the drafted token t+k+1 was generated
                    p = logits[0][b, t + k].log_softmax(-1)
                    q = logits[k][b, t].log_softmax(-1)
                    terms.append(F.kl_div(q, p, log_target=True, reduction="sum"))
            expected += float(torch.stack(terms).mean())
        assert float(distill_loss(model, ids, starts, ends)) == pytest.approx(expected, rel=1e-4)


def test_answers_end_with_eos_only_when_the_model_stopped_there():
    model = model_of("parallel")
    for p, a in zip(prompts(6), own_answers(model, prompts(6), EOS, max_new_tokens=5)):
        tokens = generate_ids(model, p, 5, eos_id=EOS)
        assert a.ids == p + tokens + ([EOS] if len(tokens) < 5 else []) and a.start == len(p)


def test_bad_settings_are_refused():
    model = model_of("parallel")
    for kwargs, words in [({"steps": 0}, "steps"), ({"batch_size": 0}, "batch size"), ({"lr": 0.0}, "learning rate")]:
        with pytest.raises(MtplabError, match=words):
            distill_heads(model, prompts(2), EOS, **kwargs)
    with pytest.raises(MtplabError, match="no prompts"):
        distill_heads(model, [], EOS)
    with pytest.raises(MtplabError, match="shorter than two tokens"):  # one token each, eos never reached
        distill_heads(model, prompts(3), eos_id=999, max_new_tokens=1)
    with pytest.raises(MtplabError, match="one head"):
        distill_heads(feature_model(n_future=1), prompts(2), EOS)


def test_cli_writes_a_new_checkpoint_whose_head_0_answers_as_before(capsys, tiny_run, tmp_path):
    run, _ = tiny_run
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": f"Ava has {i} apples. Then Ava buys 2 more apples. "
                                                    "How many apples does Ava have now?"}) + "\n" for i in range(12)))
    out = tmp_path / "distilled"
    code, stdout, err = run_cli(capsys, "distill", str(run), "--out", str(out), "--data", str(data),
                                "--steps", "4", "--batch-size", "4", "--held-out", "3", "--max-new-tokens", "24",
                                "--quiet")
    assert code == 0, err
    assert "on its own greedy answers to 9 prompts (3 held out)" in err
    assert "held-out tau " in stdout and "output identical to plain greedy: true" in stdout
    report = json.loads((out / "distill.json").read_text())
    assert report["steps"] == 4 and report["prompts"] == 9 and report["after"]["identical"]
    assert json.loads((out / "config.json").read_text())["run"]["self_distill"]["steps"] == 4
    (old, tokenizer), (new, _) = mtplab.load(run), mtplab.load(out)
    question = "Ava has 7 apples. Then Ava buys 2 more apples. How many apples does Ava have now?"
    assert mtplab.generate(new, tokenizer, question, chat=True, max_new_tokens=24) == \
        mtplab.generate(old, tokenizer, question, chat=True, max_new_tokens=24)
    changed = [k for k, v in new.state_dict().items() if not torch.equal(v, old.state_dict()[k])]
    assert changed and all(k.startswith("heads.heads.1.") for k in changed)


def test_cli_bad_input_is_one_line(capsys, tiny_run, tmp_path):
    run, _ = tiny_run
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    cases = [
        (["--out", str(taken)], "not empty"),
        (["--out", str(run)], "not empty"),
        (["--out", str(tmp_path / "a"), "--limit", "0"], "--limit"),
        (["--out", str(tmp_path / "a"), "--limit", "5", "--held-out", "5"], "--held-out"),
        (["--out", str(tmp_path / "a"), "--data", str(tmp_path / "missing.txt")], "not found"),
        (["--out", str(tmp_path / "a"), "--limit", "4", "--held-out", "0", "--steps", "0"], "--steps"),
    ]
    for extra, words in cases:
        code, _, err = run_cli(capsys, "distill", str(run), *extra, "--quiet")
        assert_one_line_error(code, err, words)
    assert not (tmp_path / "a").exists()
