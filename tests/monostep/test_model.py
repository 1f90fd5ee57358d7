"""The Monostep model (monostep/model.py): a pooled encoder that ignores padding, and chained slots,
each reading the one before it, that give one block of logits per forward."""

import pytest
import torch

from mtplab.monostep.config import MonostepConfig
from mtplab.monostep.model import Monostep

CONFIG = dict(vocab_size=40, d_model=16, n_layers=2, n_heads=2, max_seq_len=24, n_future=4, dropout=0.0)


def random_monostep(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Monostep(MonostepConfig(**{**CONFIG, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_one_forward_gives_a_block_of_slot_logits_per_row():
    model = random_monostep()
    assert model.n_future == 4 and model.num_parameters() == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        logits = model(torch.randint(0, 40, (3, 9)))
    assert logits.shape == (3, 4, 40)


def test_right_padding_under_the_mask_changes_nothing():
    model = random_monostep()
    short, other = torch.tensor([[4, 8, 15, 16, 23]]), torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    batch = torch.tensor([[4, 8, 15, 16, 23, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]])
    mask = torch.tensor([[True] * 5 + [False] * 3, [True] * 8])
    with torch.no_grad():
        together = model(batch, mask)
        assert torch.allclose(together[0], model(short)[0], atol=1e-5)
        assert torch.allclose(together[1], model(other)[0], atol=1e-5)
        garbage = batch.clone()
        garbage[0, 5:] = 39  # other ids in the padded places: still masked out
        assert torch.allclose(model(garbage, mask)[0], together[0], atol=1e-5)


def test_slot_k_reads_the_slots_before_it_and_none_after():
    model = random_monostep()
    ids = torch.tensor([[4, 8, 15, 16, 23]])
    with torch.no_grad():
        before = model(ids)[0]
        model.slots[2].ff[0].weight.add_(1.0)  # slot 2's own weights
        after = model(ids)[0]
    assert torch.equal(before[:2], after[:2])  # slots 0 and 1 do not read slot 2
    assert not torch.allclose(before[2], after[2]) and not torch.allclose(before[3], after[3])  # 3 reads 2


def test_ids_beyond_the_real_vocabulary_are_never_likely():
    model = random_monostep(vocab_size=48, vocab_real=40)
    with torch.no_grad():
        logits = model(torch.randint(0, 40, (2, 6)))
    assert torch.all(logits[..., 40:] == float("-inf")) and torch.all(torch.isfinite(logits[..., :40]))


def test_a_model_needs_its_vocabulary_size():
    with pytest.raises(ValueError, match="model.vocab_size must be set"):
        Monostep(MonostepConfig(**{**CONFIG, "vocab_size": 0}))
