"""EleutherAI's lm-evaluation-harness as a client of `mtplab export-hf`: its Python API scores an
exported model on two local tasks the test writes (jsonl through `dataset_path: json`) and gets
what mtplab gets on the same items, at batch size 1 and 4 (where the harness pads: generation is
left-padded, log-likelihood batches right-padded).

The model is a small mtplab run trained for the occasion (a few seconds): it memorizes twelve
sums asked in four phrasings of different lengths and is asked four more it has not seen, so the
scores are neither 0 nor 1. Tasks, both through the chat template (`apply_chat_template=True`):
- `generate_until`: exact match of the last number in the answer, which is `mtplab eval --task
  gsm8k`'s rule for these answers;
- `multiple_choice`: four sums per question, accuracy by log-likelihood. The harness moves the
  chat prompt's trailing space (`<assistant> `) into every choice and tokenizes prompt + choice
  as one text; the choices are all two-digit, so that this only moves the space token, the same
  for every choice of a question, and the ranking is mtplab's own (answer tokens after the chat
  prompt's, as it trains). A one-digit choice would merge with the space (" 9" is one token)
  and be scored on tokens mtplab never trains on.
"""

import json
import os
import random
from collections import Counter

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a hub
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")
pytestmark = pytest.mark.hf

import mtplab  # noqa: E402
from mtplab.evaluation.exact_match import is_correct  # noqa: E402
from mtplab.inference.decode import generate  # noqa: E402
from mtplab.models.checkpoint import load_model  # noqa: E402
from mtplab.interop.hf_export import export_hf  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

PHRASINGS = ["What is {a} plus {b}?", "{a} + {b} = ?", "Add {b} to {a}.",
             "Ava has {a} apples and buys {b} more. How many apples does Ava have now?"]
N_TRAIN, N_ITEMS, MAX_NEW = 12, 16, 8
RECIPE = """
[model]
d_model = 48
n_layers = 2
n_heads = 4
max_seq_len = 64
n_future = 2

[tokenizer]
vocab_size = 320

[data]
source = "jsonl"
path = "{train}"
eval_path = "{held_out}"
seq_len = 64

[train]
steps = 150
batch_size = 12
lr = 1e-2
warmup_steps = 10
eval_every = 100000
eval_batches = 1
log_every = 1000
device = "cpu"
"""
# both local tasks read a jsonl file the test writes
DATASET = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
"""
GEN_TASK = """task: mtplab_sums_answer
""" + DATASET + """output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|endoftext|>"]
  max_gen_toks: {max_new}
  do_sample: false
filter_list:
  - name: last-number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)"
        group_select: -1
      - function: take_first
metric_list:
  - metric: exact_match
"""
CHOICE_TASK = """task: mtplab_sums_choice
""" + DATASET + """output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
"""


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def make_items():
    rng = random.Random(0)
    pairs = [(a, b) for a in range(2, 10) for b in range(2, 10) if a + b >= 10]
    rng.shuffle(pairs)
    items = [{"question": PHRASINGS[i % len(PHRASINGS)].format(a=a, b=b), "answer": str(a + b)}
             for i, (a, b) in enumerate(pairs[:N_ITEMS])]
    choices = []
    for item in items:
        right = int(item["answer"])
        options = [str(x) for x in [right] + rng.sample([x for x in range(10, 19) if x != right], 3)]
        rng.shuffle(options)
        choices.append({"question": item["question"], "choices": options, "gold": options.index(item["answer"])})
    return items, choices


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Matrices this small gain nothing from a second thread, and two threads on a busy 2-core
    machine ran this module ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    """(mtplab model, tokenizer, checkpoint dir, exported dir, task dir, items, choice items)."""
    root = tmp_path_factory.mktemp("lm_eval")
    items, choices = make_items()
    train = write_jsonl(root / "train.jsonl", items[:N_TRAIN])
    held_out = write_jsonl(root / "held_out.jsonl", items[N_TRAIN:])
    (root / "recipe.toml").write_text(RECIPE.format(train=train, held_out=held_out))
    mtplab.train(root / "recipe.toml", root / "run", progress=False)
    model, tokenizer = load_model(root / "run")[:2]
    hf_dir = export_hf(root / "run", root / "hf")
    tasks = root / "tasks"
    tasks.mkdir()
    cache = root / "datasets-cache"  # the datasets library's cache, not ~/.cache
    (tasks / "sums_answer.yaml").write_text(GEN_TASK.format(
        data=write_jsonl(root / "items.jsonl", items), cache=cache, max_new=MAX_NEW))
    (tasks / "sums_choice.yaml").write_text(CHOICE_TASK.format(
        data=write_jsonl(root / "choices.jsonl", choices), cache=cache))
    return model, tokenizer, root / "run", hf_dir, tasks, items, choices


def harness(hf_dir, tasks, batch_size):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},trust_remote_code=True,dtype=float32,device=cpu",
        tasks=["mtplab_sums_answer", "mtplab_sums_choice"], num_fewshot=0, batch_size=batch_size,
        apply_chat_template=True, log_samples=True,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False))


def loglikelihood(model, tokenizer, context, continuation):
    """log P(continuation | context) under head 0, with the text split into tokens as a harness
    splits it: the context's trailing whitespace goes with the continuation, whose tokens are
    those of the whole text after the context's."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    ctx = tokenizer.encode(stripped)
    whole = tokenizer.encode(stripped + continuation)
    assert whole[:len(ctx)] == ctx
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = model(ids[:, :-1], n_heads=1)[0][0].log_softmax(-1)
    targets = torch.tensor(whole[len(ctx):])
    return logp[len(ctx) - 1:].gather(-1, targets[:, None]).sum().item()


def answer_logprob(model, tokenizer, question, answer):
    """mtplab's own log P(answer | question): the answer's tokens after the chat prompt's."""
    prompt, tokens = tokenizer.encode_chat(question), tokenizer.encode(answer)
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logp = model(ids[:, :-1], n_heads=1)[0][0].log_softmax(-1)
    return logp[len(prompt) - 1:].gather(-1, torch.tensor(tokens)[:, None]).sum().item()


def accuracy(scores, choices):
    return sum(max(range(len(s)), key=s.__getitem__) == c["gold"] for s, c in zip(scores, choices)) / len(choices)


def test_lm_eval_scores_equal_mtplab_at_batch_1_and_4(setup, capsys):
    model, tokenizer, run, hf_dir, tasks, items, choices = setup
    # the prompts have different lengths, in counts that batches of 4 cannot split evenly, so the
    # harness's batches of 4 are padded whatever order it sorts them in
    lengths = Counter(len(tokenizer.encode_chat(item["question"])) for item in items)
    assert len(lengths) > 1 and any(n % 4 for n in lengths.values()), lengths

    # mtplab: `mtplab eval --task gsm8k` on the same items, and its greedy answers one by one
    code, out, _ = run_cli(capsys, "eval", str(run), "--task", "gsm8k", "--data", str(tasks.parent / "items.jsonl"),
                           "--max-new-tokens", str(MAX_NEW), "--out", str(tasks.parent / "rows.jsonl"), "--json")
    assert code == 0
    mtplab_answer = json.loads(out)["accuracy"]
    answers = [generate(model, tokenizer, item["question"], chat=True, max_new_tokens=MAX_NEW) for item in items]
    assert sum(is_correct(a, item["answer"]) for a, item in zip(answers, items)) / len(items) == mtplab_answer
    scores = [[loglikelihood(model, tokenizer, tokenizer.chat_prompt(c["question"]), choice) for choice in c["choices"]]
              for c in choices]
    own = [[answer_logprob(model, tokenizer, c["question"], choice) for choice in c["choices"]] for c in choices]
    mtplab_choice = accuracy(own, choices)
    assert accuracy(scores, choices) == mtplab_choice  # the harness's split ranks as mtplab's own
    assert 0 < mtplab_answer < 1 and 0 < mtplab_choice < 1, (mtplab_answer, mtplab_choice)

    for batch_size in (1, 4):
        result = harness(hf_dir, tasks, batch_size)
        got = result["results"]
        assert got["mtplab_sums_answer"]["exact_match,last-number"] == mtplab_answer, batch_size
        assert got["mtplab_sums_choice"]["acc,none"] == mtplab_choice, batch_size
        for sample in result["samples"]["mtplab_sums_answer"]:  # the same text, item by item
            i = sample["doc_id"]
            context = sample["arguments"][0][0]
            assert context == tokenizer.chat_prompt(items[i]["question"])  # HF's template = mtplab's
            assert sample["resps"][0][0] == answers[i], (batch_size, i)
        for sample in result["samples"]["mtplab_sums_choice"]:
            i = sample["doc_id"]
            assert {a[0] for a in sample["arguments"]} == {tokenizer.chat_prompt(choices[i]["question"])}
            harness_scores = [ll for ll, _ in sample["filtered_resps"]]
            assert max(abs(h - m) for h, m in zip(harness_scores, scores[i])) < 1e-4, (batch_size, i)
