"""Data parallelism (DDP-style replicas and FSDP2 shards): torchrun with 2 gloo processes on the
CPU follows the 1-process run."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mtplab.config import load_config
from mtplab.errors import MtplabError
from mtplab.data.pipeline import build_dataset
from mtplab.training import distributed
from tests.conftest import ROOT, TINY

SETTINGS = ["train.steps=6", "train.batch_size=8", "train.grad_accum=2", "train.log_every=1",
            "train.eval_every=3", "train.keep_checkpoints=0", "data.n_train=400", "data.n_eval=16"]


def torchrun(nproc, out, *settings):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "mtplab", "train", "--recipe", str(TINY), "--out", str(out), "--quiet"]
    for s in SETTINGS + [s for s in settings if s != "--resume"]:
        cmd += ["--set", s]
    cmd += ["--resume"] if "--resume" in settings else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("data_format", "parallel"), [("chat", "ddp"), ("lm", "ddp"), ("chat", "fsdp")])
def test_two_gloo_processes_match_one_process(tmp_path, data_format, parallel):
    settings = [f"data.format={data_format}", f"train.parallel={parallel}"]
    one = torchrun(1, tmp_path / "one", *settings)
    two = torchrun(2, tmp_path / "two", *settings)
    curve = lambda rows: [(r["step"], r["head_losses"]) for r in rows if "head_losses" in r]  # noqa: E731
    assert [s for s, _ in curve(one)] == [s for s, _ in curve(two)] == list(range(1, 7))
    for (_, a), (_, b) in zip(curve(one), curve(two)):
        assert a == pytest.approx(b, abs=1e-5)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    if parallel == "fsdp":  # gathered shards resume into shards: bit-identical to going straight on
        shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-000006")
        torchrun(2, tmp_path / "two", *settings, "--resume")
        c = load_file(tmp_path / "two" / "model.safetensors")
        assert all(torch.equal(b[k], c[k]) for k in b)


def test_the_global_batch_must_split_evenly():
    with pytest.raises(MtplabError, match="divisible by the number of processes"):
        distributed.check_batch(distributed.Ranks(0, 3), 8)


@pytest.mark.parametrize("data_format", ["chat", "lm"])
def test_the_ranks_rows_put_together_are_the_single_process_batch(tmp_path, data_format):
    config = load_config(TINY, ["data.n_train=64", "train.batch_size=8", f"data.format={data_format}"])
    batches = [build_dataset(config, tmp_path).train for _ in range(3)]  # same seed: same order
    whole = batches[0].next()
    shares = [batches[1 + rank].next(distributed.Ranks(rank, 2).rows(8)) for rank in range(2)]
    assert torch.equal(torch.cat([ids for ids, _ in shares]), whole[0])
    assert torch.equal(torch.cat([labels for _, labels in shares]), whole[1])
