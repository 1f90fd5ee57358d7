"""Text corpora: a folder of books, Project Gutenberg boilerplate, whole books held out; packed
token files that read back what was written and refuse a truncated copy."""

import numpy as np
import pytest

from mtplab.config import load_config
from mtplab.data.packed import open_tokens, pack_tokens, read_text_files, strip_gutenberg, text_files
from mtplab.data.pipeline import load_examples
from mtplab.errors import MtplabError
from tests.conftest import shared_path


def _book(title: str, body: str) -> str:
    return (f"\ufeffThe Project Gutenberg EBook of {title}\nThis eBook is for the use of anyone anywhere.\n\n"
            f"*** START OF THIS PROJECT GUTENBERG EBOOK {title.upper()} ***\n\n\n{body}\n\n"
            f"End of the Project Gutenberg EBook of {title}\n\n"
            f"*** END OF THIS PROJECT GUTENBERG EBOOK {title.upper()} ***\n\nSection 1. General Terms of Use\n")


def test_strip_gutenberg_keeps_the_book_only():
    assert strip_gutenberg(_book("Alice", "Alice was beginning to get very tired.")) == \
        "Alice was beginning to get very tired.\n"
    # a START line broken over two lines, "THE" instead of "THIS", no space after the stars
    text = ("header\n*** START OF THIS PROJECT GUTENBERG EBOOK\nTHE STRANGE CASE ***\nbody\n"
            "***END OF THE PROJECT GUTENBERG EBOOK THE STRANGE CASE***\nlicence")
    assert strip_gutenberg(text) == "body\n"
    assert strip_gutenberg("no markers here") == "no markers here"


def test_a_folder_is_its_text_files_by_name_and_whole_books_are_held_out(tmp_path):
    books = {"b.txt": "B " * 300, "a.txt": "A " * 300, "c.txt": "C " * 100, "d.txt": "D " * 50}
    for name, body in books.items():
        (tmp_path / name).write_text(_book(name, body.strip()))
    (tmp_path / "SOURCE.md").write_text("not a book")
    assert [p.name for p in text_files([tmp_path])] == ["a.txt", "b.txt", "c.txt", "d.txt"]
    assert all("Gutenberg" not in t for t in read_text_files([tmp_path]))
    config = load_config(None, ["data.source=text", f"data.path={tmp_path}", "data.eval_fraction=0.15"])
    train, held_out = load_examples(config)
    # the last books by name until they hold 15% of the text: d (50 words) and c (100) of 750
    assert held_out == [books["c.txt"].strip() + "\n", books["d.txt"].strip() + "\n"]
    assert train == [books["a.txt"].strip() + "\n", books["b.txt"].strip() + "\n"]
    single = load_config(None, ["data.source=text", f"data.path={tmp_path / 'a.txt'}"])
    train, held_out = load_examples(single)  # one file: its last 5% (as before)
    assert len(train) == len(held_out) == 1 and train[0] + held_out[0] == books["a.txt"].strip() + "\n"


def test_an_empty_folder_is_an_error(tmp_path):
    with pytest.raises(MtplabError, match="a directory with no text files"):
        text_files([tmp_path])


def test_the_gutenberg_bundle_loses_its_licence():
    folder = shared_path("gutenberg", "11-0.txt").parent
    files = text_files([folder])
    assert len(files) == 32 and all(p.suffix == ".txt" for p in files)
    texts = read_text_files(files[:3])
    assert all("PROJECT GUTENBERG" not in t and "Gutenberg License" not in t for t in texts)
    assert texts[0].startswith("ALICE’S ADVENTURES IN WONDERLAND")


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
