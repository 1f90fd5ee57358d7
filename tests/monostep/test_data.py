import numpy as np
import torch

from mtplab.monostep.data import BlockBatches

E, PAD = 99, 98


def test_answers_become_prefix_and_next_block_samples():
    pairs = [([1, 2], [3, 4, 5, 6, 7, 0]), ([8], [9, 0]), ([5], [])]  # 0 = eos; an empty answer is dropped
    b = BlockBatches(pairs, slots=4, batch_size=8, pad_id=PAD, empty_id=E, max_len=5)
    ids, mask, targets = b.collate(np.arange(len(b.samples)))
    rows = {tuple(ids[r][mask[r]].tolist()): targets[r].tolist() for r in range(len(b.samples))}
    assert rows == {(1, 2): [3, 4, 5, 6],
                    (2, 3, 4, 5, 6): [7, 0, E, E],  # prefix [1..6] cut to its last max_len=5 tokens
                    (8,): [9, 0, E, E]}
    assert (ids[~mask] == PAD).all()
    assert mask.sum(1).tolist() == [b.lengths[i] for i in range(3)]


def test_an_epoch_visits_every_sample_once_in_length_sorted_batches_and_resumes_exactly():
    rng = np.random.default_rng(0)
    pairs = [(list(rng.integers(1, 50, rng.integers(1, 30))), list(rng.integers(1, 50, rng.integers(1, 40))))
             for _ in range(200)]
    b = BlockBatches(pairs, 4, 8, PAD, E, 64, seed=3)
    seen = []
    for _ in range(len(b)):
        ids, mask, targets = b.next()
        seen += [(tuple(i[m].tolist()), tuple(t.tolist())) for i, m, t in zip(ids, mask, targets)]
    assert len(seen) == len(b.samples) == len({*seen})
    order = b._epoch_order()
    assert sorted(np.concatenate(order).tolist()) == list(range(len(b.samples)))
    assert sum(len(batch) != 8 for batch in order) <= 1  # pools hold whole batches: one short batch
    assert b.epoch == 0  # the next call starts epoch 1
    # pools sort by length, so a batch pads little: compare with random batching
    padded = sum(len(w) * b.lengths[w].max() for w in order)
    assert padded < 1.15 * b.lengths.sum()
    state = b.state_dict()
    expected = [b.next() for _ in range(5)]
    again = BlockBatches(pairs, 4, 8, PAD, E, 64, seed=3)
    again.load_state_dict(state)
    for (i1, m1, t1), (i2, m2, t2) in zip(expected, [again.next() for _ in range(5)]):
        assert torch.equal(i1, i2) and torch.equal(m1, m2) and torch.equal(t1, t2)
    assert b.epoch == 1
