"""`mtplab chat`: a terminal conversation that streams the model's answer as it is decoded.

The turns so far are rendered with the checkpoint's chat template each time. Ctrl-C stops the
answer being written (what was written stays in the history); Ctrl-C at the prompt or Ctrl-D quits.
`/reset` forgets the conversation.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from .inference.decode import TextDecoder, decode
from .inference.sampling import SamplingParams
from .inference.speculative import SpeculativeStats


def run_chat(model, tokenizer, read: Callable[[str], str] = input, out: TextIO = sys.stdout,
             params: SamplingParams = SamplingParams(), max_new_tokens: int = 256,
             speculative: bool | None = None) -> list[dict]:
    """Chat until end of input; returns the conversation."""
    messages: list[dict] = []
    window = model.config.max_seq_len
    out.write(f"mtplab chat: {model.num_parameters() / 1e6:.1f}M parameters, {model.n_future} head(s), "
              f"{window}-token context. Ctrl-C stops an answer, Ctrl-D quits, /reset forgets.\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return messages
        if not line.strip():
            continue
        if line.strip() == "/reset":
            messages.clear()
            out.write("(conversation cleared)\n")
            continue
        messages.append({"role": "user", "content": line})
        prompt = tokenizer.encode(tokenizer.render_chat(messages))
        if len(prompt) >= window:
            out.write(f"(the conversation is longer than the {window}-token context: its start is cut)\n")
        out.write("model> ")
        text = TextDecoder(tokenizer)
        stats = SpeculativeStats()
        try:
            for event in decode(model, prompt, max_new_tokens, params, tokenizer.eos_id, speculative,
                                stats=stats):
                out.write(text.feed(event.tokens))
                out.flush()
            out.write(text.flush())
        except KeyboardInterrupt:
            out.write(text.flush() + " [stopped]")
        out.write("\n")
        messages.append({"role": "assistant", "content": text.text})
