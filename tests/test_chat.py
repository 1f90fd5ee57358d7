import io
import subprocess
import sys

import mtplab
from mtplab.chat import run_chat

Q1 = "Ava has 3 apples. Then Ava buys 2 more apples. How many apples does Ava have now?"
Q2 = "Ben has 4 eggs. How many eggs does Ben have now?"


def scripted(lines):
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


def test_turns_stream_and_keep_history(tiny_run):
    model, tok = mtplab.load(tiny_run[0])
    out = io.StringIO()
    messages = run_chat(model, tok, scripted([Q1, "", Q2]), out, max_new_tokens=30)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    # the first answer is what a one-turn generate says; the second saw the first turn
    assert messages[1]["content"] == mtplab.generate(model, tok, Q1, chat=True, max_new_tokens=30)
    assert out.getvalue().count("model> ") == 2


def test_reset_forgets(tiny_run):
    model, tok = mtplab.load(tiny_run[0])
    messages = run_chat(model, tok, scripted([Q1, "/reset", Q2]), io.StringIO(), max_new_tokens=20)
    assert [m["content"] for m in messages if m["role"] == "user"] == [Q2]


class InterruptAfter(io.StringIO):
    """A terminal whose user presses Ctrl-C once, after a few pieces of the first answer."""

    def __init__(self, writes):
        super().__init__()
        self.left = writes

    def write(self, text):
        if text.strip() and "model>" not in text and "mtplab chat" not in text and self.left is not None:
            self.left -= 1
            if self.left == 0:
                self.left = None
                raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_answer_not_the_chat(tiny_run):
    model, tok = mtplab.load(tiny_run[0])
    out = InterruptAfter(2)
    messages = run_chat(model, tok, scripted([Q1, Q2]), out, max_new_tokens=40)
    assert "[stopped]" in out.getvalue()
    assert len(messages) == 4 and messages[3]["content"]  # the chat went on to the second question


def test_console_chat_reads_stdin_until_eof(tiny_run):
    done = subprocess.run([sys.executable, "-m", "mtplab", "chat", str(tiny_run[0]), "--max-new-tokens", "12"],
                          input=f"{Q1}\n", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    model, tok = mtplab.load(tiny_run[0])
    answer = mtplab.generate(model, tok, Q1, chat=True, max_new_tokens=12)
    # one turn, then a last prompt that meets the end of input
    assert done.stdout.splitlines()[1:] == [f"you> model> {answer}", "you> "], done.stdout
    assert "Traceback" not in done.stderr
