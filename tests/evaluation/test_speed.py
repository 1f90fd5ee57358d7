"""`mtplab bench`'s measurement (evaluation/speed.py): plain and speculative greedy decoding of the
same prompts give the same tokens, one chain, one tree, or batched; tau stays within what the heads
allow; the table has a row per prompt, the overall row and the lines that were measured."""

import torch

from mtplab.config import ModelConfig
from mtplab.evaluation.speed import bench_batched, bench_decoding, compare_decoders, format_bench, format_decoders
from mtplab.inference.generate import generate_ids
from mtplab.inference.sampling import SamplingParams
from mtplab.inference.tree import DraftTree
from mtplab.models.transformer import Transformer

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]]


def random_model(heads=3):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                                   mtp="parallel", n_future=heads, init_std=0.3)).eval()


def test_bench_decodes_every_prompt_alike_plain_speculative_tree_and_batched():
    model = random_model()
    tree = DraftTree.parse("0 1 0.0")
    result = bench_decoding(model, PROMPTS, max_new_tokens=12, batch_size=2, tree=tree)
    assert result["identical"] and result["tree_identical"] and result["batched"]["identical"]
    assert [r["tokens"] for r in result["rows"]] == [len(generate_ids(model, p, 12)) for p in PROMPTS]
    assert [r["tokens"] for r in result["rows"]] == [12] * 3  # no eos: every prompt to the limit
    assert all(r["identical"] and 1.0 <= r["tokens_per_forward"] <= 3.0 for r in result["rows"])  # 2 drafts + 1
    assert 1.0 <= result["tokens_per_forward"] <= 3.0 and len(result["acceptance_by_position"]) == 2
    assert (result["prompts"], result["heads"], result["tree"], result["tree_nodes"]) == (3, 3, "0 1 0.0", 3)
    assert result["speedup_per_tau"] == result["speedup"] / result["tokens_per_forward"]
    assert result["batched"]["batch_size"] == 2


def test_batched_bench_returns_each_prompts_tokens_in_order():
    model = random_model()
    result = bench_batched(model, PROMPTS, max_new_tokens=10, batch_size=2)
    want = [generate_ids(model, p, 10) for p in PROMPTS]
    assert result["plain_ids"] == result["speculative_ids"] == want
    assert result["plain_tokens_per_forward"] == 1.0 and result["speculative_tokens_per_forward"] >= 1.0


def test_the_table_has_a_row_per_prompt_then_all_then_what_was_measured():
    model = random_model()
    lines = format_bench(bench_decoding(model, PROMPTS, max_new_tokens=8)).splitlines()
    assert lines[0].split() == ["prompt", "tokens", "plain", "tok/s", "spec", "tok/s", "speed-up", "tau",
                                "up/tau", "same"]
    assert [line.split()[0] for line in lines[1:]] == ["0", "1", "2", "all", "acceptance"]
    assert all(line.split()[1] == "8" and line.split()[-1] == "true" for line in lines[1:4])
    assert lines[4].split()[1] == "24"  # all prompts' tokens
    assert len(lines[5].removeprefix("acceptance by draft position: ").split()) == 2
    tree = format_bench(bench_decoding(model, PROMPTS, max_new_tokens=8, batch_size=3,
                                       tree=DraftTree.parse("0 1 0.0"))).splitlines()
    assert tree[6].startswith("tree of 3 drafts (0 1 0.0): ") and tree[6].endswith("same: true")
    assert tree[7].startswith("batch 3: plain ") and tree[7].endswith("same tokens as batch 1: true")


def test_compare_decoders_gives_a_row_per_batch_and_decoder_against_plain_at_that_batch():
    model = random_model()
    rows = compare_decoders(model, PROMPTS, max_new_tokens=10, tree=DraftTree.parse("0 1 0.0"), batches=(1, 2))
    assert [(r["batch"], r["mode"]) for r in rows] == [(b, m) for b in (1, 2) for m in ("plain", "chain", "tree")]
    assert all(r["same"] == 1.0 for r in rows)  # greedy: every decoder, every batch gives plain's tokens
    plain = [r for r in rows if r["mode"] == "plain"]
    assert all(r["speedup"] == 1.0 and r["tau"] == 1.0 for r in plain)
    assert all(1.0 <= r["tau"] <= 3.0 for r in rows if r["mode"] != "plain")  # 2 drafts + the bonus token
    table = format_decoders(rows).splitlines()
    assert len(table) == 1 + len(rows) and table[1].split()[:2] == ["1", "plain"]


def test_compare_decoders_sampling_seeds_each_round_apart():
    model = random_model()
    params = SamplingParams(temperature=1.0, seed=3)
    one = compare_decoders(model, PROMPTS, max_new_tokens=8, params=params, batches=(1,), rounds=1)
    again = compare_decoders(model, PROMPTS, max_new_tokens=8, params=params, batches=(1,), rounds=1)
    assert [r["tau"] for r in one] == [r["tau"] for r in again]  # seeded: the same draws
    assert [r["mode"] for r in one] == ["plain", "chain"] and one[0]["same"] == 1.0
    two = compare_decoders(model, PROMPTS, max_new_tokens=8, params=params, batches=(1,), rounds=2)
    assert two[1]["tau"] != one[1]["tau"]  # round 2 (seed 4) adds other draws
