import numpy as np
import pytest

from mtplab.data.batches import IGNORE, ChatBatches, PackedBatches
from mtplab.data.packed import open_tokens, pack_tokens
from mtplab.data.qa import load_qa_jsonl
from mtplab.errors import MtplabError
from tests.conftest import shared_path


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


@pytest.mark.parametrize("vocab,dtype", [(500, np.uint16), (70000, np.uint32)])
def test_packed_tokens_round_trip(tmp_path, vocab, dtype):
    docs = [[1, 2, 3], [], [vocab - 1, 4]]
    tokens = pack_tokens(docs, eos_id=0, out=tmp_path / "t.bin", vocab_size=vocab)
    assert tokens.dtype == dtype
    assert open_tokens(tmp_path / "t.bin").tolist() == [1, 2, 3, 0, vocab - 1, 4, 0]


def test_truncated_packed_file_is_detected(tmp_path):
    pack_tokens([[1, 2, 3, 4]], eos_id=0, out=tmp_path / "t.bin", vocab_size=10)
    with open(tmp_path / "t.bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(MtplabError, match="truncated"):
        open_tokens(tmp_path / "t.bin")


def test_jsonl_loader_reads_both_schemas_and_names_bad_lines(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "q1", "answer": "a #### 1"}\n\n{"query": "q2", "response": "r"}\n')
    assert load_qa_jsonl(path) == [{"question": "q1", "answer": "a #### 1"},
                                   {"question": "q2", "answer": "r"}]
    path.write_text('{"question": "q1", "answer": "a"}\n{"question": 3}\n')
    with pytest.raises(MtplabError, match=r"qa.jsonl:2:"):
        load_qa_jsonl(path)
    path.write_text('{"question": "q1", "answer": "a"}\n{not json\n')
    with pytest.raises(MtplabError, match=r"qa.jsonl:2: not valid JSON"):
        load_qa_jsonl(path)


def test_gsm8k_from_shared_data():
    rows = load_qa_jsonl(shared_path("gsm8k", "test.jsonl"))
    assert len(rows) == 1319 and "####" in rows[0]["answer"]
