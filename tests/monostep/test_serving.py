"""A Monostep checkpoint behind the API: each streamed chunk is one decoded block."""

import json

import httpx
import torch

import mtplab
from mtplab.monostep.config import MonostepConfig
from mtplab.monostep.model import Monostep
from mtplab.serve import create_app
from mtplab.tokenizer import Tokenizer
from tests.serve.conftest import LiveServer, sse_chunks

Q = "Ava has 3 apples and buys 4 more. How many?"


def test_monostep_streams_blocks_and_refuses_speculation():
    text = "Ava has 3 apples and buys 4 more. She has 7 apples now. " * 30
    tok = Tokenizer.train([text], 200, ["<pad>", "<empty>", "<system>", "<user>", "<assistant>"])
    torch.manual_seed(1)
    model = Monostep(MonostepConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2,
                                    max_seq_len=160, n_future=4, empty_token=tok.token_to_id("<empty>")))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        model.slots[2].to_vocab.bias[tok.token_to_id("<empty>")] += 30  # blocks of 3 tokens
    server = LiveServer(create_app(model.eval(), tok, model_name="mono"))
    try:
        body = {"model": "mono", "messages": [{"role": "user", "content": Q}], "max_tokens": 24, "stream": True}
        chunks = [json.loads(c) for c in sse_chunks(server, "/v1/chat/completions", body)[:-1]]
        blocks = [c["mtplab"]["tokens"] for c in chunks if c.get("mtplab", {}).get("tokens")]
        assert blocks and all(len(b) == 3 for b in blocks)
        text_out = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text_out == mtplab.generate(model, tok, Q, chat=True, max_new_tokens=24)
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "speculative": True}, timeout=30)
        assert r.status_code == 400 and "Monostep" in r.json()["error"]["message"]
    finally:
        server.close()
