"""Think loops per request: a looped model's requests at different counts, together or not, each get
what plain decoding at that count gives; each count decodes in an engine of its own."""

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from mtplab.inference.generate import generate_ids
from mtplab.models.transformer import Transformer
from mtplab.serve import create_app
from tests.serve.conftest import LiveServer

PROMPTS = [[5, 17, 30, 2], [40, 41, 9], [7, 7, 100, 3, 12], [60]]


@pytest.fixture(scope="module")
def looped(tiny):
    """tiny's tokenizer and two heads on a looped trunk (1 entry + 1 shared x 2 loops + 1 exit),
    random weights: every loop count decodes differently."""
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(tiny[0].config, n_layers=3, loop_layers=1, n_think_loops=2,
                                            init_std=0.1)).eval()
    return model, tiny[1]


def plain(model, prompt, loops, n=10):
    trained, model.n_think_loops = model.n_think_loops, loops
    try:
        return generate_ids(model, prompt, n)
    finally:
        model.n_think_loops = trained


def complete(server, prompt, **extra):
    reply = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"prompt": prompt, "max_tokens": 10, "temperature": 0, **extra})
    return reply.status_code, reply.json()


def test_each_request_decodes_at_its_own_think_loops(looped, slow_engine):
    model, tokenizer = looped
    engines = slow_engine(0.01)  # decodes to the token limit (no eos), a little slowly: they overlap
    server = LiveServer(create_app(model, tokenizer, model_name="looped", engine_fn=engines))
    try:
        wanted = [(p, loops) for p in PROMPTS for loops in (None, 1, 4)]  # None: the model's 2
        expected = [tokenizer.decode(plain(model, p, loops or 2)) for p, loops in wanted]
        assert len({tokenizer.decode(plain(model, PROMPTS[0], n)) for n in (1, 2, 4)}) == 3
        with ThreadPoolExecutor(len(wanted)) as pool:  # all at once, speculative (the default)
            replies = list(pool.map(lambda w: complete(server, w[0], **({} if w[1] is None else
                                                                      {"think_loops": w[1]})), wanted))
        assert [code for code, _ in replies] == [200] * len(wanted)
        assert [body["choices"][0]["text"] for _, body in replies] == expected
        assert sorted({e.cache.n_loops for e in engines.engines}) == [1, 2, 4]
        assert max(engines.widths) > 1  # rows of one count were decoded together
        made = len(engines.engines)
        code, body = complete(server, PROMPTS[1], think_loops=4, speculative=False)
        assert code == 200 and body["choices"][0]["text"] == expected[wanted.index((PROMPTS[1], 4))]
        # the 4-loop engine was freed when its last row left, so this request made a new one; the
        # default count's engine stays
        assert len(engines.engines) == made + 1 and engines.engine.cache.n_loops == 4
        code, _ = complete(server, PROMPTS[1])
        assert code == 200 and len(engines.engines) == made + 1
        assert model.n_think_loops == 2  # the app sets a count only while it builds an engine
    finally:
        server.close()


def test_bad_think_loops_are_400s_naming_the_field(looped, tiny):
    model, tokenizer = looped
    server = LiveServer(create_app(model, tokenizer, model_name="looped"))
    flat = LiveServer(create_app(tiny[0], tiny[1], model_name="tiny"))
    try:
        for value in (0, 33, "4", 2.5):
            code, body = complete(server, PROMPTS[0], think_loops=value)
            assert code == 400 and body["error"]["param"] == "think_loops", (value, body)
        code, body = complete(flat, PROMPTS[0], think_loops=2)
        assert code == 400 and body["error"]["param"] == "think_loops"
        assert body["error"]["message"].startswith("the model 'tiny' has no looped layers")
    finally:
        server.close()
        flat.close()
