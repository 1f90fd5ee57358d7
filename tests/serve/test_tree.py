"""Tree speculation in the server: `--tree` sets what requests decode with by default, a request's
`speculative` ("tree", "chain", "off", true, false) picks its own, and every row of the batch,
whatever it picked, answers exactly what plain greedy decoding gives."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from mtplab.cli import main
from mtplab.config import ModelConfig
from mtplab.errors import MtplabError
from mtplab.inference.generate import generate_ids
from mtplab.inference.tree import DraftTree
from mtplab.models.transformer import Transformer
from mtplab.serve import create_app

N = 20  # tokens per answer
WIDE = DraftTree.parse("0 1 2")  # the tiny model has one draft head: three of its guesses per step
# (prompt, the request's `speculative`; None: the field left out), one prompt per decoder so that
# the engine's rows can be told apart
REQUESTS = [("Ava has 3 apples.", None), ("Ben has", "tree"), ("Cleo has 12 pens.", True),
            ("Dan has 5 cars", "chain"), ("Eve has 20 books.", "off"), ("Fay has 9 cups", False)]


def body(prompt, speculative, stream):
    out = {"model": "tiny", "prompt": prompt, "max_tokens": N, "temperature": 0, "stream": stream}
    return out if speculative is None else {**out, "speculative": speculative}


def complete(server, prompt, speculative):
    reply = httpx.post(server.url + "/v1/completions", json=body(prompt, speculative, False), timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def streamed(server, prompt, speculative):
    """The streamed text and each chunk's `mtplab` object (tokens, accepted, drafts)."""
    with httpx.stream("POST", server.url + "/v1/completions", json=body(prompt, speculative, True),
                      timeout=60) as reply:
        assert reply.status_code == 200
        chunks = [json.loads(line[len("data: "):]) for line in reply.iter_lines()
                  if line.startswith("data: {")]
    return "".join(c["choices"][0]["text"] for c in chunks), [c["mtplab"] for c in chunks]


def plain_greedy(tiny, prompt):
    model, tok, _ = tiny
    return tok.decode(generate_ids(model, tok.encode(prompt), N))  # to the limit: the test engines ignore eos


def rows_by_prompt(slow, tok):
    return {tok.decode(run.row.prompt): run.row for run in slow.runs}


@pytest.mark.parametrize("default", ["tree", "chain"])
def test_every_decoder_in_one_batch_answers_plain_greedy(serve_app, slow_engine, tiny, default):
    """A server whose default is the tree (`--tree`) or the chain (no `--tree`): the six requests
    at once, each with its own decoder, give plain greedy decoding's text; the rows verified the
    tree exactly when the request (or the server's default) asked for it, and the tree rows
    accepted drafts that were not the head's top guess (a chain could not have)."""
    slow = slow_engine(0.002, ignore_eos=True)
    server = serve_app(engine_fn=slow, tree=WIDE, speculative=default)
    card = httpx.get(server.url + "/v1/models/tiny", timeout=10).json()["mtplab"]
    assert (card["speculative"], card["draft_tree"]) == (default, "0 1 2")
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        answers = list(pool.map(lambda r: streamed(server, *r), REQUESTS))
    assert [text for text, _ in answers] == [plain_greedy(tiny, p) for p, _ in REQUESTS]
    assert max(slow.widths) > 1  # they shared the batch
    rows = rows_by_prompt(slow, tiny[1])
    modes = [{None: default, True: default, False: "off"}.get(asked, asked) for _, asked in REQUESTS]
    assert [chunks[-1]["speculative"] for _, chunks in answers] == modes  # the final chunk says which
    for (prompt, _), mode in zip(REQUESTS, modes):
        row = rows[prompt]
        expected = (WIDE if mode == "tree" else None, mode != "off")
        assert (row.tree, row.n_draft > 0) == expected, (prompt, mode)
    # a tree step's drafts are the head's top three; its first token, when accepted, is one of them
    siblings = [c for (_, chunks), mode in zip(answers, modes) if mode == "tree" for c in chunks
                if c["accepted"][:1] == [True] and c["tokens"][0] != c["drafts"][0]]
    assert siblings and all(c["tokens"][0] in c["drafts"][1:] for c in siblings)


def test_a_chain_server_verifies_the_default_tree_on_request(serve_app, slow_engine, tiny):
    """Without a tree of its own (no `--tree`), a request's "tree" verifies DraftTree.default cut
    to the model's heads, and still answers plain greedy."""
    slow = slow_engine(0.0, ignore_eos=True)
    server = serve_app(engine_fn=slow)
    assert complete(server, "Ben has", "tree") == plain_greedy(tiny, "Ben has")
    assert complete(server, "Ava has", None) == plain_greedy(tiny, "Ava has")
    rows = rows_by_prompt(slow, tiny[1])
    assert rows["Ben has"].tree == DraftTree.default(tiny[0].n_future - 1) and rows["Ava has"].tree is None
    for asked, got in [("tree", "tree"), (None, "chain"), (False, "off")]:  # the whole answer says which
        reply = httpx.post(server.url + "/v1/completions", json=body("Ben has", asked, False), timeout=60)
        assert reply.json()["mtplab"]["speculative"] == got, asked
    card = httpx.get(server.url + "/v1/models/tiny", timeout=10).json()["mtplab"]
    assert (card["speculative"], card["draft_tree"]) == ("chain", "0 1 2")


@pytest.fixture(scope="module")
def api(tiny):
    with TestClient(create_app(tiny[0], tiny[1], model_name="tiny", tree=WIDE, speculative="tree"),
                    raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize("value", ["bogus", "Tree", "", "on", 3, 0.5, ["tree"], {"mode": "tree"}])
def test_a_bad_speculative_value_is_a_one_line_400(api, value):
    r = api.post("/v1/completions", json={"prompt": "Ava has", "max_tokens": 3, "speculative": value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "speculative" and "'tree', 'chain' or 'off'" in error["message"]
    assert "\n" not in error["message"]


def test_a_model_without_draft_heads_refuses_a_tree_or_a_chain_but_serves_plain(tiny):
    tok = tiny[1]
    one_head = Transformer(ModelConfig(vocab_size=tiny[0].config.vocab_size, d_model=16, n_layers=1,
                                          n_heads=2, max_seq_len=32, n_future=1)).eval()
    with TestClient(create_app(one_head, tok, model_name="one")) as client:
        for value in ("tree", "chain"):
            r = client.post("/v1/completions", json={"prompt": "Ava", "max_tokens": 2, "speculative": value})
            assert r.status_code == 400 and r.json()["error"]["param"] == "speculative", r.text
            assert "one head" in r.json()["error"]["message"]
        for value in ("off", True, False, None):
            body = {"prompt": "Ava", "max_tokens": 2, **({} if value is None else {"speculative": value})}
            assert client.post("/v1/completions", json=body).status_code == 200
        card = client.get("/v1/models/one").json()["mtplab"]
        assert (card["speculative"], card["draft_tree"]) == ("off", None)
    with pytest.raises(MtplabError, match="1 deep; the model has 0 draft heads"):
        create_app(one_head, tok, tree=DraftTree.chain(1))


def test_create_app_refuses_a_tree_deeper_than_the_heads_and_an_unknown_default(tiny):
    with pytest.raises(MtplabError, match="2 deep; the model has 1 draft heads"):
        create_app(tiny[0], tiny[1], tree=DraftTree.parse("0 0.0"))
    with pytest.raises(MtplabError, match="speculative must be one of tree, chain, off"):
        create_app(tiny[0], tiny[1], speculative="sometimes")


def one_line_error(capsys, *argv):
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mtplab: error:"), err
    return err[0]


def test_serve_tree_bad_values_exit_2(capsys, tiny):
    checkpoint = str(tiny[2])
    assert "no parent" in one_line_error(capsys, "serve", checkpoint, "--port", "0", "--tree", "0.1")
    assert "rank paths" in one_line_error(capsys, "serve", checkpoint, "--port", "0", "--tree", "wide")
    assert "2 deep; the model has 1 draft heads" in one_line_error(capsys, "serve", checkpoint, "--port", "0",
                                                                   "--tree", "0 0.0")


@pytest.mark.parametrize("argv, default, tree", [
    ([], "chain", DraftTree.default(1)),  # no --tree: chains, and "tree" requests get 'auto''s tree
    (["--tree"], "tree", DraftTree.default(1)),  # 'auto' without a calibration: the default tree
    (["--tree", "0 1"], "tree", DraftTree.parse("0 1")),
])
def test_serve_tree_reaches_the_app(capsys, tiny, monkeypatch, argv, default, tree):
    """`mtplab serve --tree ...` as far as the server's start: the app gets the tree and the default."""
    import uvicorn

    from mtplab.serve import app as app_module
    from mtplab.serve import server as server_module

    made = {}
    real = app_module.create_app

    def recording(*args, **kwargs):
        made.update(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(app_module, "create_app", recording)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # start nothing
    monkeypatch.setattr(server_module, "log_to_stderr", lambda level: None)  # keep the test's logging
    assert main(["serve", str(tiny[2]), "--port", "0", *argv]) == 0
    assert (made["tree"], made["speculative"]) == (tree, default)
    banner = capsys.readouterr().out
    assert (f"verifying a {tree.size}-node draft tree by default" in banner) == (default == "tree"), banner
