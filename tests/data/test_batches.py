import numpy as np

from mtplab.data.batches import IGNORE, ChatBatches, PackedBatches


def test_chat_batches_score_only_the_answer():
    examples = [([1, 2, 3], [7, 8, 0]), ([4, 5], [9, 0])]
    batches = ChatBatches(examples, seq_len=16, batch_size=2, pad_id=99, seed=0)
    inputs, labels = batches._collate([0, 1])
    assert inputs.tolist() == [[1, 2, 3, 7, 8], [4, 5, 9, 99, 99]]
    assert labels.tolist() == [[IGNORE, IGNORE, 7, 8, 0], [IGNORE, 9, 0, IGNORE, IGNORE]]


def test_chat_batches_drop_examples_that_do_not_fit():
    batches = ChatBatches([([1] * 10, [2] * 10), ([1], [2])], seq_len=8, batch_size=1, pad_id=0)
    assert batches.dropped == 1 and len(batches.examples) == 1


def test_position_restores_exactly():
    tokens = np.arange(1000, dtype=np.uint16)
    a = PackedBatches(tokens, seq_len=16, batch_size=4, seed=5)
    for _ in range(20):  # crosses an epoch boundary (62 windows)
        a.next()
    state = a.state_dict()
    expected = [a.next() for _ in range(5)]
    b = PackedBatches(tokens, seq_len=16, batch_size=4, seed=5)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, [b.next() for _ in range(5)]):
        assert (x1 == x2).all() and (y1 == y2).all()
    x, y = expected[0]
    assert (y[:, :-1] == x[:, 1:]).all()  # labels are the next tokens
