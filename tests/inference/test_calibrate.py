"""Calibration: the expected tokens per forward it predicts from rank paths is what the engine
accepts, the best trees are trees, and the chosen one is stored and read back."""

import json
import shutil
from collections import Counter

import pytest
import torch

from mtplab.config import ModelConfig
from mtplab.errors import MtplabError
from mtplab.inference import calibrate as cal
from mtplab.inference.engine import Engine, Request
from mtplab.inference.generate import generate_ids
from mtplab.inference.tree import DraftTree
from mtplab.models.transformer import Transformer
from tests.conftest import QUESTION, assert_one_line_error, run_cli
from tests.inference.conftest import random_model


def accepted_in_first_step(model, prompt, tree):
    """Drafts the engine accepts in the first decoding step after `prompt`."""
    engine = Engine(model, max_batch=1, n_draft=tree.depth, tree=tree)
    row = engine.submit(Request(prompt, tree.depth + 2, n_draft=tree.depth))
    engine.step()  # prefill: emits head 0's token and drafts the tree from the last position
    [(_, event)] = engine.step()
    assert len(event.branch) == sum(event.accepted) == sum(row.stats.accepted)  # the branch it took
    assert event.branch == () or event.branch in tree.paths
    return sum(row.stats.accepted)


@pytest.mark.parametrize("family", ["parallel", "medusa", "slots"])
def test_rank_paths_predict_what_the_engine_accepts(family):
    """At every position of a greedy continuation, the drafts a tree step accepts are the tree's
    deepest node whose path starts the position's rank path; so 1 + the summed node frequencies
    is exactly the mean tokens per forward over those positions."""
    model = random_model(family, vocab=12, heads=3, seed=5)  # a small vocabulary: low ranks are common
    tree = DraftTree.parse("0 1 2 3 0.0 0.1 1.0 1.1 2.0")
    prompt = [1, 5, 7]
    continuation = generate_ids(model, prompt, 24)
    counts, positions = cal.rank_paths(model, [(prompt, continuation)], depth=2, max_rank=4)
    ids = prompt + continuation
    accepted = [accepted_in_first_step(model, ids[:t + 1], tree) for t in range(len(prompt) - 1, len(ids) - 3)]
    assert positions == len(accepted) == len(continuation) - 2
    assert 0 < sum(accepted)  # drafts were accepted, and at both depths
    assert any(a == 2 for a in accepted)
    predicted = cal.expected_tokens_per_forward(tree, counts, positions)
    assert predicted == pytest.approx(1 + sum(accepted) / len(accepted))


def test_best_trees_take_the_most_frequent_paths_and_stay_trees():
    counts = Counter({(0,): 50, (1,): 20, (0, 0): 30, (0, 1): 20, (1, 0): 5, (0, 0, 0): 20, (2,): 4})
    assert cal.best_tree(counts, 1).paths == ((0,),)
    assert cal.best_tree(counts, 4).paths == ((0,), (1,), (0, 0), (0, 1))  # ties: the shallower first
    assert cal.best_tree(counts, 5).paths == ((0,), (1,), (0, 0), (0, 1), (0, 0, 0))
    assert cal.best_tree(counts, 99).size == 7
    assert cal.best_tree(Counter(), 3) is None
    assert cal.expected_tokens_per_forward(DraftTree.chain(3), counts, 100) == pytest.approx(2.0)


def test_calibrate_compares_chains_and_trees_and_stores_the_choice(tmp_path):
    torch.manual_seed(1)  # untied, so that its greedy continuations do not repeat one token
    model = Transformer(ModelConfig(vocab_size=12, d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                                    n_future=3, tie_embeddings=False)).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 12, (4,), generator=gen).tolist() for _ in range(6)]
    said = []
    report = cal.calibrate(model, prompts, eos_id=None, max_nodes=6, max_new_tokens=16, progress=said.append)
    names = [r["candidate"] for r in report["candidates"]]
    assert names[:2] == ["chain 1", "chain 2"] and "tree 6" in names and len(said) == 2
    best = max(report["candidates"], key=lambda r: r["expected_speedup"])
    assert report["tree"] == best["tree"] and report["chosen"] == best["candidate"]
    for r in report["candidates"]:  # the speed-up is tau over the step cost relative to plain's
        assert r["expected_speedup"] == pytest.approx(
            r["expected_tokens_per_forward"] * report["plain_step_ms"] / r["step_ms"], rel=1e-3)
        assert r["nodes"] == DraftTree.parse(r["tree"]).size <= 6
    taus = [r["expected_tokens_per_forward"] for r in report["candidates"] if r["candidate"].startswith("tree")]
    assert taus == sorted(taus)  # a bigger best tree never expects fewer tokens
    assert report["positions"] == 6 * (16 - 1 - 2 + 1)
    assert "<- chosen" in cal.format_report(report)
    assert cal.calibrated_tree(tmp_path) is None
    cal.save_calibration(tmp_path, report)
    assert str(cal.calibrated_tree(tmp_path)) == report["tree"]
    (tmp_path / cal.TREE_FILE).write_text("{}")
    with pytest.raises(MtplabError, match="not a calibration file"):
        cal.calibrated_tree(tmp_path)


def test_calibrate_refuses_what_it_cannot_measure():
    with pytest.raises(MtplabError, match="sequential heads draft depth after depth"):
        cal.calibrate(random_model("sequential", heads=3), [[1, 2]], None)
    with pytest.raises(MtplabError, match="needs a model with draft heads"):
        cal.calibrate(random_model("parallel", heads=1), [[1, 2]], None)
    with pytest.raises(MtplabError, match="too short"):
        cal.calibrate(random_model("parallel", heads=3), [[1, 2]], None, max_new_tokens=2)


def test_cli_calibrate_then_generate_and_bench_use_the_stored_tree(capsys, tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    prompts = tmp_path / "questions.jsonl"
    prompts.write_text("".join(json.dumps({"question": q, "answer": "#### 1"}) + "\n"
                               for q in [QUESTION, "Ben has 3 pens. He buys 2 more. How many pens?"] * 4))
    code, text, _ = run_cli(capsys, "calibrate", str(out), "--data", str(prompts), "--nodes", "3",
                            "--max-new-tokens", "24", "--dry-run")
    assert code == 0 and "chain 1" in text and "<- chosen" in text and not (out / cal.TREE_FILE).exists()
    code, text, _ = run_cli(capsys, "calibrate", str(out), "--data", str(prompts), "--nodes", "3",
                            "--max-new-tokens", "24", "--json")
    report = json.loads(text)
    assert code == 0 and json.loads((out / cal.TREE_FILE).read_text())["tree"] == report["tree"]
    code, bench, _ = run_cli(capsys, "bench", str(out), "--max-new-tokens", "8", "--json")
    assert code == 0 and json.loads(bench)["tree"] == report["tree"]  # --tree auto: the stored one
    code, plain, _ = run_cli(capsys, "generate", str(out), "--chat", "--prompt", QUESTION, "--no-speculative",
                             "--max-new-tokens", "20")
    code, tree, _ = run_cli(capsys, "generate", str(out), "--chat", "--prompt", QUESTION, "--tree",
                            "--max-new-tokens", "20")
    assert code == 0 and tree == plain
    code, _, err = run_cli(capsys, "calibrate", str(out), "--data", str(prompts), "--limit", "0")
    assert_one_line_error(code, err, "--limit must be >= 1")
    code, _, err = run_cli(capsys, "calibrate", str(out), "--data", str(tmp_path / "missing.txt"))
    assert_one_line_error(code, err, "not found")
    code, _, err = run_cli(capsys, "calibrate", str(out), "--data", str(prompts), "--nodes", "0")
    assert_one_line_error(code, err, "--nodes must be >= 1")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = run_cli(capsys, "calibrate", str(out), "--data", str(empty))
    assert_one_line_error(code, err, "no prompts")
    code, _, err = run_cli(capsys, "calibrate", str(out), "--data", str(prompts), "--max-new-tokens", "1", "--json")
    assert_one_line_error(code, err, "too short")
    (out / cal.TREE_FILE).write_text(json.dumps({"tree": "0 0.0"}))  # the tiny model drafts 1 deep
    code, _, err = run_cli(capsys, "generate", str(out), "--prompt", "x", "--tree")
    assert_one_line_error(code, err, "2 deep; the model has 1 draft heads")
