import pytest

from mtplab.evaluation.exact_match import extract_answer, is_correct


@pytest.mark.parametrize("text,expected", [
    ("She pays 3 * 4 = 12 dollars.\n#### 12", "12"),
    ("#### 1,234", "1234"),                       # thousands separators
    ("the balance is\n#### -5", "-5"),            # negatives
    ("#### $3.50", "3.5"),                        # currency and trailing zeros
    ("#### 2.0", "2"),
    ("so 7 + 8 = 15 and 15 - 3 = 12.", "12"),     # no ####: the last number
    ("it costs $1,000.", "1000"),
    ("no number here", None),
    ("#### 0.25 of the pie", "0.25"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct_compares_normalised_numbers():
    assert is_correct("... so 1200 total", "work\n#### 1,200")
    assert not is_correct("#### 12", "#### 13")
    assert not is_correct("#### 12", "no final number")
