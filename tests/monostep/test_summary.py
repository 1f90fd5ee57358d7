"""`mtplab info` for Monostep (monostep/summary.py): the parameters of the model it describes, by
part, and FLOPs per forward that grow faster than the context (the prefix is re-encoded)."""

from mtplab.monostep.config import MonostepConfig
from mtplab.monostep.model import Monostep
from mtplab.monostep.summary import describe, summarize

CONFIG = MonostepConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_seq_len=80, n_future=4)


def test_parameters_by_part_add_up_to_the_model():
    summary = summarize(CONFIG, context=64)
    model = Monostep(CONFIG)
    assert summary["parameters"] == model.num_parameters() == sum(summary["breakdown"].values())
    assert summary["breakdown"]["embeddings"] == (300 + 80) * 32  # token and position tables
    slots = sum(p.numel() for p in model.slots.parameters())
    assert summary["breakdown"]["heads"] == slots + 32  # and the 32-wide init_state
    assert (summary["heads"], summary["family"], summary["context"]) == (4, "monostep", 64)


def test_flops_per_forward_grow_faster_than_the_context():
    small, large = (summarize(CONFIG, context=c)["flops_per_forward"] for c in (32, 64))
    assert large > 2 * small  # attention over the whole prefix: quadratic in it


def test_the_description_quotes_the_summary():
    summary = summarize(CONFIG, context=64)
    lines = describe(summary, CONFIG).splitlines()
    b = summary["breakdown"]
    assert f"parameters: {summary['parameters']:,}" in lines
    assert f"  embeddings {b['embeddings']:,}   trunk {b['trunk']:,}   slots {b['heads']:,}" in lines
    assert lines[1] == "slots: 4 chained slot heads, one block of 4 tokens per forward"
