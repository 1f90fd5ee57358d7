"""The command line as a user runs it: bad input ends in one line on stderr and exit code 2."""

import errno
import json
import math
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import mtplab
from mtplab import atomic
from mtplab.cli import main
from mtplab.config import load_config
from mtplab.models.checkpoint import step_dirs
from mtplab.training import trainer
from tests.conftest import QUESTION, TINY, assert_one_line_error, run_cli, shared_path


def test_missing_checkpoint_directory(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", str(tmp_path / "nope"), "--prompt", "hi")
    assert_one_line_error(code, err, "no checkpoint directory")


def test_unknown_config_key(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--recipe", str(TINY), "--out", str(tmp_path / "o"),
                           "--set", "model.depthh=4")
    assert_one_line_error(code, err, "--set model.depthh=4: [model]: unknown key 'depthh'")
    assert "d_model" in err and "tiny.toml" not in err  # the --set argument is at fault, not the recipe
    code, _, err = run_cli(capsys, "train", "--recipe", str(TINY), "--out", str(tmp_path / "o"),
                           "--set", "trian.steps=4")
    assert_one_line_error(code, err, "--set trian.steps=4: section: unknown key 'trian'")
    assert not (tmp_path / "o").exists()


def test_tokenizer_that_does_not_fit_the_model(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--recipe", str(TINY), "--out", str(tmp_path / "o"),
                           "--set", "model.vocab_size=64", "--quiet")
    assert_one_line_error(code, err, "does not fit")


def test_empty_corpus(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = run_cli(capsys, "train", "--recipe", str(TINY), "--out", str(tmp_path / "o"),
                           "--set", "data.source=text", "--set", f"data.path={empty}", "--quiet")
    assert_one_line_error(code, err, "empty")


def test_generate_and_bad_sampling_values(capsys, tiny_run):
    out, _ = tiny_run
    question = "Ava has 3 apples. How many apples does Ava have now?"
    code, text, _ = run_cli(capsys, "generate", str(out), "--chat", "--prompt", question,
                            "--max-new-tokens", "24")
    model, tokenizer = mtplab.load(out)
    assert code == 0
    assert text == mtplab.generate(model, tokenizer, question, chat=True, max_new_tokens=24) + "\n"
    code, _, err = run_cli(capsys, "generate", str(out), "--prompt", "x", "--top-p", "1.5")
    assert_one_line_error(code, err, "top_p")


def test_console_entry_point_trains_and_generates(tmp_path):
    out = tmp_path / "cli-run"
    train = subprocess.run([sys.executable, "-m", "mtplab", "train", "--recipe", str(TINY), "--out",
                            str(out), "--set", "train.steps=12", "--set", "data.n_train=300"],
                           capture_output=True, text=True)
    assert train.returncode == 0, train.stderr
    assert "trained to step 12" in train.stdout
    assert re.search(r"train [0-9.]+M: 100%.*\| 12/12 \[", train.stderr), train.stderr  # the progress bar
    gen = subprocess.run([sys.executable, "-m", "mtplab", "generate", str(out), "--prompt", "Ava has",
                          "--max-new-tokens", "8"], capture_output=True, text=True)
    model, tokenizer = mtplab.load(out)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout == mtplab.generate(model, tokenizer, "Ava has", max_new_tokens=8) + "\n"


def test_demo_runs_end_to_end_on_a_small_budget(tmp_path):
    from mtplab.demo import run_demo

    lines = []
    summary = run_demo(tmp_path / "demo", ["train.steps=6", "train.eval_every=6", "data.n_train=300",
                                           "data.n_eval=4"], progress=False, say=lines.append,
                       distill_steps=2, distill_prompts=8)
    answers = [json.loads(line) for line in (tmp_path / "demo" / "eval.jsonl").read_text().splitlines()]
    assert summary["held_out_problems"] == len(answers) == 4
    assert summary["held_out_accuracy"] == sum(a["correct"] for a in answers) / 4
    assert 2e6 <= summary["parameters"] <= 5e6
    assert len(summary["final_eval_loss_per_head"]) == 4
    for name in ["demo.json", "eval.jsonl", "loss.png", "model.safetensors"]:
        assert (tmp_path / "demo" / name).is_file()
    assert f"held-out exact-match accuracy: {summary['held_out_accuracy']:.1%} of 4 problems" in lines
    assert summary["identical"] and summary["tree_identical"] and summary["tree"] == "0 1 2 0.0 0.1 1.0 0.0.0 0.0.1 0.1.0"
    assert any(line.startswith("  with a tree of 9 drafts instead of the chain: ") for line in lines)
    assert "self-distilling the draft heads on the model's own answers to 8 new questions" in lines
    assert any(line.startswith("  the draft heads self-distilled (") for line in lines)
    distilled = json.loads((tmp_path / "demo" / "config.json").read_text())["run"]["self_distill"]
    assert distilled == {"steps": 2, "prompts": 8} and summary["tokens_per_forward_before_distill"] >= 1
    assert "on the CPU: 6 steps of" in lines[0] and "auto" not in lines[0]  # the header in plain words


def test_speculative_generate_marks_drafts_and_matches_plain(capsys, tiny_run):
    out, _ = tiny_run
    code, plain, _ = run_cli(capsys, "generate", str(out), "--chat", "--prompt", QUESTION,
                             "--no-speculative", "--max-new-tokens", "40")
    assert code == 0
    code, spec, _ = run_cli(capsys, "generate", str(out), "--chat", "--prompt", QUESTION,
                            "--max-new-tokens", "40")
    assert code == 0 and spec == plain
    code, marked, err = run_cli(capsys, "generate", str(out), "--chat", "--prompt", QUESTION,
                                "--max-new-tokens", "40", "--show-drafts")
    assert code == 0 and "tokens/forward" in err and "acceptance by draft position" in err
    assert marked.replace("[", "").replace("]", "") == plain
    # tau is per decoding forward (the prompt's forward apart): never below 1, even for a short answer
    code, _, err = run_cli(capsys, "generate", str(out), "--chat", "--prompt", QUESTION,
                           "--max-new-tokens", "3", "--show-drafts")
    tau = float(re.search(r"at ([0-9.]+) tokens/forward", err).group(1))
    assert code == 0 and "the prompt's forward, then" in err and tau >= 1.0


def test_bench_json_reports_identical_outputs(capsys, tiny_run):
    import json

    out, _ = tiny_run
    code, text, _ = run_cli(capsys, "bench", str(out), "--max-new-tokens", "16", "--json")
    assert code == 0
    result = json.loads(text)
    assert result["identical"] is True
    for key in ["plain_tokens_per_s", "speculative_tokens_per_s", "speedup", "tokens_per_forward",
                "acceptance_by_position"]:
        assert key in result
    assert 1.0 <= result["tokens_per_forward"] <= 2.0  # one extra head: at most 2 tokens per forward
    code, table, _ = run_cli(capsys, "bench", str(out), "--max-new-tokens", "8")
    assert code == 0 and "speed-up" in table and "acceptance by draft position" in table


def test_bench_and_draft_errors(capsys, tiny_run, tmp_path):
    out, _ = tiny_run
    code, _, err = run_cli(capsys, "generate", str(out), "--prompt", "x", "--n-draft", "5")
    assert_one_line_error(code, err, "n_draft must be between 0 and 1")
    code, _, err = run_cli(capsys, "bench", str(out), "--prompts", str(tmp_path / "none.txt"))
    assert_one_line_error(code, err, "prompts file not found")


def write_qa(path, n):
    import json

    from mtplab.data.synthetic import make_problems

    path.write_text("".join(json.dumps({"question": p["question"], "answer": p["answer"]}) + "\n"
                            for p in make_problems(n, seed=11)))
    return path


def test_eval_gsm8k_loss_and_ppl(capsys, tiny_run, tmp_path):
    import json

    out, result = tiny_run
    data = write_qa(tmp_path / "qa.jsonl", 6)
    code, text, _ = run_cli(capsys, "eval", str(out), "--task", "gsm8k", "--data", str(data), "--limit", "4",
                            "--max-new-tokens", "48", "--out", str(tmp_path / "rows.jsonl"), "--json")
    assert code == 0
    report = json.loads(text)
    rows = [json.loads(l) for l in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert report["n"] == len(rows) == 4
    assert report["accuracy"] == sum(r["correct"] for r in rows) / 4
    code, text, _ = run_cli(capsys, "eval", str(out), "--task", "loss", "--data", str(data), "--json")
    losses = json.loads(text)["head_losses"]
    assert code == 0 and len(losses) == 2 and losses[0] < 4.0  # far below ln(vocab) ~ 5.9
    corpus = tmp_path / "c.txt"
    corpus.write_text("Ava has 3 apples. Then Ava buys 2 more apples.\n" * 20)
    code, text, _ = run_cli(capsys, "eval", str(out), "--task", "ppl", "--data", str(corpus), "--json")
    ppl = json.loads(text)
    vocab_real = json.loads((out / "config.json").read_text())["model"]["vocab_real"]
    assert code == 0 and ppl["perplexity"] == pytest.approx(math.exp(ppl["nats_per_token"]))
    assert ppl["perplexity"] < vocab_real / 2  # in-distribution text: far better than uniform guessing
    # every token after the first is scored once; bits per byte spreads their nats over the file's bytes
    n_tokens = len(mtplab.load(out)[1].encode(corpus.read_text()))
    assert ppl["tokens"] == n_tokens - 1
    assert ppl["bits_per_byte"] == pytest.approx(ppl["nats_per_token"] * ppl["tokens"] / math.log(2)
                                                 / len(corpus.read_bytes()))


def test_eval_bad_data(capsys, tiny_run, tmp_path):
    out, _ = tiny_run
    (tmp_path / "bad.jsonl").write_text('{"question": "q"}\n')
    code, _, err = run_cli(capsys, "eval", str(out), "--task", "gsm8k", "--data", str(tmp_path / "bad.jsonl"))
    assert_one_line_error(code, err, "bad.jsonl:1")
    code, _, err = run_cli(capsys, "eval", str(out), "--task", "ppl", "--data", str(tmp_path / "none.txt"))
    assert_one_line_error(code, err, "not found")


def test_eval_on_gsm8k_test_split(capsys, tiny_run, tmp_path):
    data = shared_path("gsm8k", "test.jsonl")
    out, _ = tiny_run
    rows_file = tmp_path / "g.jsonl"
    code, text, _ = run_cli(capsys, "eval", str(out), "--task", "gsm8k", "--data", str(data), "--limit", "2",
                            "--max-new-tokens", "16", "--out", str(rows_file))
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    firsts = [json.loads(line)["question"] for line in data.read_text().splitlines()[:2]]
    assert [r["question"] for r in rows] == firsts  # --limit 2: the file's first two problems
    accuracy = sum(r["correct"] for r in rows) / 2
    assert code == 0 and text == f"GSM8K exact match: {accuracy:.2%} of 2 ({rows_file})\n"


# -- batched: generate --prompts, eval --batch-size, bench's columns ---------------------------------

def test_generate_prompts_from_text_and_jsonl_writes_rows(capsys, tiny_run, tmp_path):
    import json

    out, _ = tiny_run
    questions = [QUESTION, "Ben has 5 pens.", "How many pens does Ben have now if he buys 3 more pens?"]
    text_file = tmp_path / "p.txt"
    text_file.write_text(questions[0] + "\n\n" + "\n".join(questions[1:]) + "\n")  # blank lines skipped
    code, stdout, _ = run_cli(capsys, "generate", str(out), "--prompts", str(text_file), "--chat",
                              "--batch-size", "2", "--max-new-tokens", "24")
    assert code == 0
    rows = [json.loads(l) for l in stdout.splitlines()]
    assert [r["prompt"] for r in rows] == questions
    for q, r in zip(questions, rows):  # each row is what the single-prompt command prints
        code, alone, _ = run_cli(capsys, "generate", str(out), "--chat", "--prompt", q, "--max-new-tokens", "24")
        assert alone == r["text"] + "\n"
        assert 1 <= r["tokens"] <= 24 and 1.0 <= r["tau"] <= 2.0  # one extra head: <= 2 per forward
    jsonl = tmp_path / "q.jsonl"  # "question" rows are chat-wrapped, like eval's
    jsonl.write_text("".join(json.dumps({"question": q, "answer": "#### 1"}) + "\n" for q in questions))
    dest = tmp_path / "rows.jsonl"
    code, stdout, _ = run_cli(capsys, "generate", str(out), "--prompts", str(jsonl), "--out", str(dest),
                              "--max-new-tokens", "24", "--batch-size", "3", "--no-speculative")
    assert code == 0 and "wrote 3 rows" in stdout
    plain = [json.loads(l) for l in dest.read_text().splitlines()]
    assert [{**r, "tau": 0} for r in plain] == [{**r, "tau": 0} for r in rows]
    assert all(r["tau"] <= 1.0 for r in plain)  # plain: one token per forward (eos takes one too)


def test_generate_prompts_bad_input(capsys, tiny_run, tmp_path):
    out, _ = tiny_run
    good = tmp_path / "good.txt"
    good.write_text("Ava has\n")
    code, _, err = run_cli(capsys, "generate", str(out), "--prompts", str(good), "--batch-size", "0")
    assert_one_line_error(code, err, "--batch-size must be >= 1")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    code, _, err = run_cli(capsys, "generate", str(out), "--prompts", str(empty))
    assert_one_line_error(code, err, "empty.txt: no prompts")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Ava has 3 apples."}\n\n{"question": "oops"\n')
    code, _, err = run_cli(capsys, "generate", str(out), "--prompts", str(bad))
    assert_one_line_error(code, err, "bad.jsonl:3: not valid JSON")
    bad.write_text('{"prompt": "Ava has"}\n{"text": "no field"}\n')
    code, _, err = run_cli(capsys, "generate", str(out), "--prompts", str(bad))
    assert_one_line_error(code, err, 'bad.jsonl:2: expected a non-empty string field "question" or "prompt"')
    code, _, err = run_cli(capsys, "generate", str(out), "--prompts", str(tmp_path / "none.txt"))
    assert_one_line_error(code, err, "prompts file not found")
    for verb in (["eval", str(out), "--task", "gsm8k", "--data", str(bad)], ["bench", str(out)]):
        code, _, err = run_cli(capsys, *verb, "--batch-size", "0")
        assert_one_line_error(code, err, "--batch-size must be >= 1")
    # bench and calibrate read their prompts files the same way, with the same errors
    for verb in (["bench", str(out), "--prompts"], ["calibrate", str(out), "--dry-run", "--data"]):
        code, _, err = run_cli(capsys, *verb, str(bad))
        assert_one_line_error(code, err, 'bad.jsonl:2: expected a non-empty string field "question" or "prompt"')


def test_eval_batched_gives_the_per_example_outputs_of_batch_1(capsys, tiny_run, tmp_path):
    import json

    out, _ = tiny_run
    data = write_qa(tmp_path / "qa.jsonl", 6)
    rows = {}
    for batch, mode in (("1", "--speculative"), ("4", "--speculative"), ("4", "--no-speculative")):
        dest = tmp_path / f"rows{batch}{mode}.jsonl"
        code, text, err = run_cli(capsys, "eval", str(out), "--task", "gsm8k", "--data", str(data),
                                  "--max-new-tokens", "32", "--batch-size", batch, mode, "--out", str(dest))
        rows[batch, mode] = [json.loads(l) for l in dest.read_text().splitlines()]
        accuracy = sum(r["correct"] for r in rows[batch, mode]) / 6
        assert code == 0 and text == f"GSM8K exact match: {accuracy:.2%} of 6 ({dest})\n"
        assert re.search(r"answering: 100%.*\| 6/6 \[", err), err  # the progress bar
    first, *others = rows.values()
    assert len(first) == 6 and all(r == first for r in others)


def test_bench_prints_tau_speedup_and_their_ratio_and_batched_throughput(capsys, tiny_run, tmp_path):
    import json

    out, _ = tiny_run
    prompts = tmp_path / "p.txt"
    prompts.write_text("Ava has 3 apples.\nBen has 12 pens and buys 4 more.\nCal has\n")
    code, text, _ = run_cli(capsys, "bench", str(out), "--prompts", str(prompts), "--max-new-tokens", "12",
                            "--batch-size", "3", "--json")
    result = json.loads(text)
    assert code == 0 and result["identical"] and result["batched"]["identical"]
    assert result["speedup_per_tau"] == pytest.approx(result["speedup"] / result["tokens_per_forward"])
    assert result["batched"]["batch_size"] == 3 and result["batched"]["plain_tokens_per_s"] > 0
    code, table, _ = run_cli(capsys, "bench", str(out), "--prompts", str(prompts), "--max-new-tokens", "8",
                             "--batch-size", "2")
    header = table.splitlines()[0].split()
    assert code == 0 and header[-4:] == ["speed-up", "tau", "up/tau", "same"]
    assert "batch 2: plain" in table and "same tokens as batch 1: true" in table


# -- installed use: recipes by name, `mtplab recipes`, --version --------------------------------------

def test_version_flag_and_info_json_carry_the_package_version(capsys):
    import json

    from mtplab import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"mtplab {__version__}\n"
    code, text, _ = run_cli(capsys, "info", "nrm-miniaxion", "--json")  # a packaged recipe by name
    assert code == 0 and json.loads(text)["mtplab_version"] == __version__
    assert json.loads(text)["parameters"] == 920_833  # the card's count


def test_recipes_lists_every_packaged_recipe_with_its_count_and_command(capsys):
    import json

    from mtplab.config import packaged_recipes, recipe_summary

    code, text, _ = run_cli(capsys, "recipes", "--json")
    rows = {r["name"]: r for r in json.loads(text)}
    assert code == 0 and list(rows) == list(packaged_recipes())
    assert rows["gelu-d12"]["parameters"] == 261_096_338 and rows["aomts-100m"]["parameters"] == 118_209_024
    assert rows["tiny"]["train"] == "mtplab train --recipe tiny --out runs/tiny"
    assert rows["demo"]["train"] == "mtplab demo"
    assert rows["aomts-ablation"]["train"].startswith("mtplab ablate aomts-ablation ")
    assert rows["nrm-miniaxion"]["what"] == recipe_summary(packaged_recipes()["nrm-miniaxion"])
    code, info, _ = run_cli(capsys, "info", "slots-gsm8k", "--json")  # the same count as info's
    assert json.loads(info)["parameters"] == rows["slots-gsm8k"]["parameters"]
    code, table, _ = run_cli(capsys, "recipes")
    lines = table.splitlines()
    assert code == 0 and len(lines) == 1 + len(rows)  # a header, then one line per recipe
    assert lines[-1].split()[:2] == ["tiny", f"{rows['tiny']['parameters']:,}"]
    assert "mtplab train --recipe tiny --out runs/tiny" in lines[-1]


def test_a_wrong_recipe_name_lists_the_valid_ones(capsys, tmp_path):
    for argv in (["info", "gelu-d13"], ["train", "--recipe", "gelu-d13", "--out", str(tmp_path / "o")],
                 ["ablate", "gelu-d13", "--out", str(tmp_path / "a")]):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "recipe not found: gelu-d13")
        assert "packaged recipes: aomts-100m, " in err and "gelu-d12, " in err and "tiny" in err


# -- think loops at inference -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def looped_run(tiny_run, tmp_path_factory):
    """A checkpoint with tiny's tokenizer and two heads on a looped trunk (1 entry + 1 shared x 2
    loops + 1 exit), untrained: random weights make every loop count decode differently."""
    import dataclasses

    import mtplab
    from mtplab.models.checkpoint import save_checkpoint
    from mtplab.models.transformer import Transformer

    tiny, tokenizer = mtplab.load(tiny_run[0])
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(tiny.config, n_layers=3, loop_layers=1, n_think_loops=2,
                                            init_std=0.1))
    out = tmp_path_factory.mktemp("looped") / "run"
    save_checkpoint(out, model, tokenizer)
    return out


def test_generate_think_loops_change_the_compute_not_the_weights(capsys, looped_run):
    import json

    import mtplab

    model, tokenizer = mtplab.load(looped_run)
    prompt = "Ava has 3 apples. Then Ava"
    texts = {}
    for loops in (1, 2, 4):
        model.n_think_loops = loops
        texts[loops] = mtplab.generate(model, tokenizer, prompt, max_new_tokens=16, speculative=False)
    assert texts[1] != texts[2] != texts[4]  # the count matters, so the flag can be seen to act
    for loops in (1, 2, 4):
        for mode in ("--speculative", "--no-speculative"):  # speculation stays lossless at every count
            code, out, _ = run_cli(capsys, "generate", str(looped_run), "--prompt", prompt,
                                   "--max-new-tokens", "16", "--think-loops", str(loops), mode)
            assert code == 0 and out == texts[loops] + "\n", (loops, mode)
    code, info2, _ = run_cli(capsys, "info", str(looped_run), "--json")
    code, info4, _ = run_cli(capsys, "info", str(looped_run), "--json", "--set", "model.n_think_loops=4")
    code, info1, _ = run_cli(capsys, "info", str(looped_run), "--json", "--set", "model.n_think_loops=1")
    two, four, one = (json.loads(t) for t in (info2, info4, info1))
    assert two["parameters"] == four["parameters"]  # no new weights
    loop_flops = two["flops_per_token_next_token"] - one["flops_per_token_next_token"]  # one shared pass
    assert four["flops_per_token_next_token"] - one["flops_per_token_next_token"] == 3 * loop_flops
    code, _, err = run_cli(capsys, "info", str(looped_run), "--set", "train.lr=1")
    assert_one_line_error(code, err, "model.* settings only")


def test_think_loops_errors_name_the_model(capsys, tiny_run, looped_run, tmp_path):
    out, _ = tiny_run
    for verb in (["generate", str(out), "--prompt", "x", "--think-loops", "4"],
                 ["chat", str(out), "--think-loops", "4"], ["bench", str(out), "--think-loops", "1,4"]):
        code, _, err = run_cli(capsys, *verb)
        assert_one_line_error(code, err, f"{out} has no looped layers (model.loop_layers = 0)")
    code, _, err = run_cli(capsys, "generate", str(looped_run), "--prompt", "x", "--think-loops", "0")
    assert_one_line_error(code, err, "think loops must be at least 1, got 0")
    for bad, message in (("1,x", "--think-loops expects N or N,N"), ("2,2", "lists a count twice")):
        code, _, err = run_cli(capsys, "bench", str(looped_run), "--think-loops", bad)
        assert_one_line_error(code, err, message)
    code, _, err = run_cli(capsys, "bench", str(looped_run), "--data", str(tmp_path / "c.txt"))
    assert_one_line_error(code, err, "--data and --limit go with --think-loops")


def test_bench_compares_think_loops_side_by_side(capsys, looped_run, tmp_path):
    import json

    corpus = tmp_path / "c.txt"
    corpus.write_text("Ava has 3 apples. Then Ava buys 2 more apples.\n" * 10)
    prompts = tmp_path / "p.txt"
    prompts.write_text("Ava has 3 apples.\nBen has\n")
    code, text, _ = run_cli(capsys, "bench", str(looped_run), "--think-loops", "1,2,4", "--prompts",
                            str(prompts), "--max-new-tokens", "8", "--data", str(corpus), "--limit", "2",
                            "--json")
    result = json.loads(text)
    rows = {r["think_loops"]: r for r in result["rows"]}
    assert code == 0 and list(rows) == [1, 2, 4] and result["trained_think_loops"] == 2
    assert all(r["identical"] and r["plain_tokens_per_s"] > 0 and 1 <= r["tokens_per_forward"] <= 2
               for r in rows.values())
    flops = {n: r["flops_per_token"] for n, r in rows.items()}
    assert flops[4] - flops[2] == 2 * (flops[2] - flops[1])  # each loop costs the same
    code, loss, _ = run_cli(capsys, "eval", str(looped_run), "--task", "loss", "--data", str(corpus),
                            "--limit", "2", "--json")
    assert rows[2]["loss"] == pytest.approx(json.loads(loss)["head_losses"][0])  # the trained count
    assert len({round(r["loss"], 6) for r in rows.values()}) == 3
    code, table, _ = run_cli(capsys, "bench", str(looped_run), "--think-loops", "2,4", "--max-new-tokens", "4")
    lines = table.splitlines()
    assert code == 0 and lines[1].split() == ["loops", "FLOPs/token", "tokens", "plain", "tok/s", "spec",
                                              "tok/s", "tau", "same", "loss"]
    assert [l.split()[0] for l in lines[2:]] == ["2", "4"] and lines[2].split()[-1] == "-"  # no --data


def test_generate_and_bench_with_a_tree_of_drafts(capsys, tiny_run, tmp_path):
    import json

    out, _ = tiny_run
    code, plain, _ = run_cli(capsys, "generate", str(out), "--chat", "--prompt", QUESTION,
                             "--no-speculative", "--max-new-tokens", "30")
    for tree in ("default", "chain", "0 1 2 3"):  # the tiny model has one draft head: trees 1 deep
        code, text, err = run_cli(capsys, "generate", str(out), "--chat", "--prompt", QUESTION,
                                  "--max-new-tokens", "30", "--tree", tree, "--show-drafts")
        assert code == 0 and text.replace("[", "").replace("]", "") == plain, tree
        assert "tree branches taken (the deepest accepted node, as ranks; none: no draft): " in err
    prompts = tmp_path / "p.txt"
    prompts.write_text("Ava has 3 apples.\nBen has\n")
    code, rows, _ = run_cli(capsys, "generate", str(out), "--prompts", str(prompts), "--tree", "default",
                            "--max-new-tokens", "12")
    code2, chain_rows, _ = run_cli(capsys, "generate", str(out), "--prompts", str(prompts), "--max-new-tokens", "12")
    texts = [json.loads(line)["text"] for line in rows.splitlines()]
    assert code == code2 == 0 and texts == [json.loads(line)["text"] for line in chain_rows.splitlines()]
    code, text, _ = run_cli(capsys, "bench", str(out), "--max-new-tokens", "16", "--json", "--tree", "0 1")
    result = json.loads(text)
    assert code == 0 and result["tree"] == "0 1" and result["tree_nodes"] == 2
    assert result["tree_identical"] and result["tree_tokens_per_forward"] >= 1.0
    assert result["chain_speedup"] == result["speedup"]
    code, text, _ = run_cli(capsys, "bench", str(out), "--max-new-tokens", "8")
    assert code == 0 and "tree of 3 drafts (0 1 2)" in text
    for bad, message in [("0.1", "no parent"), ("0 0.0", "2 deep; the model has 1 draft heads"),
                         ("a", "rank paths")]:
        code, _, err = run_cli(capsys, "generate", str(out), "--prompt", "x", "--tree", bad)
        assert_one_line_error(code, err, message)


# -- broken checkpoints and unwritable places: one line on stderr, exit 2, nothing saved is lost --------

@pytest.fixture
def copy_of_run(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    return out


def generate(capsys, checkpoint):
    return run_cli(capsys, "generate", str(checkpoint), "--prompt", "Ava has", "--max-new-tokens", "4")


def test_truncated_weights(capsys, copy_of_run):
    weights = copy_of_run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    code, _, err = generate(capsys, copy_of_run)
    assert_one_line_error(code, err, "truncated or corrupt")


def test_garbage_weights(capsys, copy_of_run):
    (copy_of_run / "model.safetensors").write_bytes(b"\x00" * 64)
    code, _, err = generate(capsys, copy_of_run)
    assert_one_line_error(code, err, "model.safetensors")


def test_missing_and_extra_tensors_are_named(capsys, copy_of_run):
    path = copy_of_run / "model.safetensors"
    state = load_file(path)
    state["lm_head.extra"] = state.pop("norm_f.weight")
    path.unlink()  # a hard link to the step directory's copy: write a new file, not through it
    save_file(state, path)
    code, _, err = generate(capsys, copy_of_run)
    assert_one_line_error(code, err, "missing norm_f.weight; unexpected lm_head.extra")


def test_a_tokenizer_bigger_than_the_model_vocabulary(capsys, copy_of_run):
    config = json.loads((copy_of_run / "config.json").read_text())
    config["model"]["vocab_size"] = 64
    (copy_of_run / "config.json").unlink()
    (copy_of_run / "config.json").write_text(json.dumps(config))
    code, _, err = generate(capsys, copy_of_run)
    assert_one_line_error(code, err, "model.vocab_real (384) must be between 0 and model.vocab_size (64)")
    del config["model"]["vocab_real"]  # a checkpoint from before the field: the tokenizer is checked
    (copy_of_run / "config.json").write_text(json.dumps(config))
    code, _, err = generate(capsys, copy_of_run)
    assert_one_line_error(code, err, "tokenizer has")


def test_a_config_that_is_not_json(capsys, copy_of_run):
    (copy_of_run / "config.json").unlink()
    (copy_of_run / "config.json").write_text("{ half a config")
    code, _, err = generate(capsys, copy_of_run)
    assert_one_line_error(code, err, "not valid JSON")


def test_a_corrupt_dataset_line_is_reported_with_file_and_line(capsys, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?", "answer": 4}\n')
    code, _, err = run_cli(capsys, "train", "--recipe", str(TINY), "--out", str(tmp_path / "o"), "--quiet",
                           "--set", "data.source=jsonl", "--set", f"data.path={data}")
    assert_one_line_error(code, err, f"{data}:2:")


def test_an_output_path_under_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(capsys, "train", "--recipe", str(TINY), "--out", str(tmp_path / "file" / "run"),
                           "--quiet")
    assert_one_line_error(code, err, "cannot create")


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(capsys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    settings = ["--set", "train.steps=8", "--set", "train.eval_every=4", "--set", "data.n_train=400"]
    real_write = atomic.atomic_write

    def write_until_full(path, write):
        if "step-000008" in str(path):  # the disk fills up during the second checkpoint
            def short_write(tmp):
                tmp.write_bytes(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(path, short_write)
        return real_write(path, write)

    monkeypatch.setattr("mtplab.models.checkpoint.atomic_write", write_until_full)
    code, _, err = run_cli(capsys, "train", "--recipe", str(TINY), "--out", str(out), "--quiet", *settings)
    assert_one_line_error(code, err, "No space left on device")
    assert [s for s, _ in step_dirs(out)] == [4]
    assert json.loads((out / "config.json").read_text())["step"] == 4
    assert not list(out.rglob(".*.tmp"))
    monkeypatch.undo()
    result = trainer.train(load_config(TINY, ["train.steps=8", "train.eval_every=4", "data.n_train=400"]), out,
                           resume=True, progress=False)
    assert result.step == 8 and all(torch.isfinite(p).all() for p in result.model.parameters())
