import re

from mtplab.data.synthetic import make_problems, make_split
from mtplab.evaluation.exact_match import extract_answer


def test_deterministic_by_seed():
    assert make_problems(50, seed=7) == make_problems(50, seed=7)
    assert make_problems(50, seed=7) != make_problems(50, seed=8)


def test_worked_lines_are_correct_arithmetic_in_gsm8k_format():
    problems = make_problems(500, seed=1)
    assert {p["steps"] for p in problems} == {1, 2, 3}
    assert len({p["question"].split()[2] for p in problems}) > 5  # varied wording
    for p in problems:
        *lines, final = p["answer"].split("\n")
        assert final.startswith("#### ")
        assert len(lines) == p["steps"]
        results = []
        for line in lines:
            a, op, b, c = re.search(r"(\d+) ([-+*/]) (\d+) = \$?(\d+)", line).groups()
            assert eval(f"{a} {op} {b}") == int(c)
            results.append(c)
        assert extract_answer(p["answer"]) == results[-1]


def test_held_out_questions_never_appear_in_training():
    train, held_out = make_split(2000, 200, seed=3)
    assert len(held_out) == 200
    assert not {p["question"] for p in held_out} & {p["question"] for p in train}
