"""Question/answer jsonl files: GSM8K's and MetaMathQA's schemas read alike, errors name the file
and line, and a pair becomes one plain document for packed training."""

import pytest

from mtplab.data.qa import load_qa_jsonl, qa_to_text
from mtplab.errors import MtplabError
from tests.conftest import shared_path


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
    assert len(rows) == 1319 and all("####" in r["answer"] for r in rows)
    assert rows[0]["question"].startswith("Janet’s ducks lay 16 eggs per day.")


def test_limit_blank_lines_and_missing_or_empty_files(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(f'{{"question": "q{i}", "answer": "a{i}"}}\n\n' for i in range(5)))
    assert [r["question"] for r in load_qa_jsonl(path, limit=2)] == ["q0", "q1"]
    with pytest.raises(MtplabError, match="data file not found"):
        load_qa_jsonl(tmp_path / "missing.jsonl")
    path.write_text("\n  \n")
    with pytest.raises(MtplabError, match="qa.jsonl: no examples"):
        load_qa_jsonl(path)
    path.write_bytes(b'{"question": "\xff", "answer": "a"}\n')
    with pytest.raises(MtplabError, match="qa.jsonl: not UTF-8 text"):
        load_qa_jsonl(path)


def test_a_pair_as_a_document_is_question_newline_answer_then_eos():
    pair = {"question": "  How many?\n", "answer": "\nSeven. #### 7  "}
    assert qa_to_text(pair, "<|endoftext|>") == "How many?\nSeven. #### 7<|endoftext|>"
