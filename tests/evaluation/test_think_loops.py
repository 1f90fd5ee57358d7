"""`mtplab bench --think-loops` (evaluation/think_loops.py): the same weights decoded at several
think-loop counts, each giving what plain decoding at that count gives, with more FLOPs per token
for more loops; the model's own count comes back afterwards."""

from mtplab.evaluation.think_loops import compare_think_loops, format_think_loops
from mtplab.inference.generate import generate_ids
from tests.conftest import FEATURES, feature_model

PROMPTS = [[5, 17, 30, 2], [40, 41, 9]]


def test_each_count_decodes_as_plain_decoding_at_that_count_and_the_count_is_restored():
    model = feature_model(**FEATURES["looped-sequential-heads"])  # 3 think loops, 2 heads
    seen = []
    result = compare_think_loops(model, PROMPTS, [1, 3, 5], max_new_tokens=6,
                                 loss=lambda m: seen.append(m.n_think_loops) or float(m.n_think_loops))
    assert model.n_think_loops == 3 and result["trained_think_loops"] == 3
    assert [r["think_loops"] for r in result["rows"]] == [1, 3, 5] and seen == [1, 3, 5]
    assert [r["loss"] for r in result["rows"]] == [1.0, 3.0, 5.0]
    flops = [r["flops_per_token"] for r in result["rows"]]
    assert flops[0] < flops[1] < flops[2]  # same weights, more compute
    for row in result["rows"]:
        model.n_think_loops = row["think_loops"]
        assert row["tokens"] == sum(len(generate_ids(model, p, 6)) for p in PROMPTS) == 12
        assert row["identical"] and 1.0 <= row["tokens_per_forward"] <= 2.0


def test_the_table_marks_what_does_not_apply():
    model = feature_model(**FEATURES["looped"])  # one head: no speculation; no data: no loss
    result = compare_think_loops(model, PROMPTS, [2, 4], max_new_tokens=4)
    lines = format_think_loops(result).splitlines()
    assert lines[0].startswith("same weights at each think-loop count (trained with 3)")
    assert lines[1].split() == ["loops", "FLOPs/token", "tokens", "plain", "tok/s", "spec", "tok/s", "tau",
                                "same", "loss"]
    assert [line.split()[0] for line in lines[2:]] == ["2", "4"]
    assert all(line.split()[-4:] == ["-", "-", "-", "-"] for line in lines[2:])
    assert lines[2].split()[1] == f"{result['rows'][0]['flops_per_token']:,}"
