import pytest

from mtplab.training.schedules import lr_multiplier


def test_warmup_is_linear():
    assert [lr_multiplier(s, 100, 4, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_ends_at_min():
    assert lr_multiplier(4, 100, 4, "cosine", min_ratio=0.1) == pytest.approx(1.0, abs=1e-3)
    assert lr_multiplier(99, 100, 4, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(52, 100, 4, "cosine") == pytest.approx(0.5, abs=0.02)


def test_wsd_is_flat_then_decays_linearly_to_zero():
    values = [lr_multiplier(s, 100, 10, "wsd", decay_fraction=0.1) for s in range(100)]
    assert values[10:90] == [1.0] * 80
    assert values[90] == pytest.approx(0.9) and values[99] == 0.0
    assert all(a > b for a, b in zip(values[89:], values[90:]))
