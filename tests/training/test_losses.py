"""The 4-head training step holds one head's logits at a time: its peak memory stays close to a
1-head step, while scoring all heads at once (the naive step) costs several times more."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtplab.config import ModelConfig
from mtplab.evaluation.head_loss import head_loss
from mtplab.models.transformer import Transformer
from mtplab.training.losses import backward_heads

PEAK_SCRIPT = r"""
import sys, torch
from mtplab.config import ModelConfig
from mtplab.evaluation.head_loss import head_loss
from mtplab.models.transformer import Transformer
from mtplab.training.losses import backward_heads
heads, mode = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
V = 32768
model = Transformer(ModelConfig(vocab_size=V, d_model=64, n_layers=1, n_heads=2, max_seq_len=256,
                                n_future=heads))
def step(ids, labels):
    if mode == "split":
        backward_heads(model, ids, labels, [1.0] * heads)
    else:
        total = sum(head_loss(l, labels, k)[0] / labels.numel() for k, l in enumerate(model(ids)))
        total.backward()
def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
step(torch.randint(0, V, (1, 8)), torch.randint(0, V, (1, 8)))  # warm up allocators
# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across exec, so
# under a big pytest process it would start above this step's peak. Writing 5 resets VmHWM.
open("/proc/self/clear_refs", "w").write("5")
before = kib("VmRSS")
step(torch.randint(0, V, (8, 256)), torch.randint(0, V, (8, 256)))
print(kib("VmHWM") - before)
"""


def peak_kib(heads: int, mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(heads), mode], check=True,
                         capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_four_head_step_peak_memory_stays_close_to_one_head():
    one, four, naive_four = peak_kib(1, "split"), peak_kib(4, "split"), peak_kib(4, "naive")
    logits_kib = 8 * 256 * 32768 * 4 // 1024  # one head's fp32 logits
    assert one > logits_kib  # the measurement sees the logits at all
    assert four < one * 1.25, (one, four)
    assert naive_four > one * 2, (one, naive_four)  # the control: the measurement can tell


@pytest.mark.parametrize("family", ["parallel", "sequential", "medusa", "slots"])
def test_split_backward_gives_the_same_gradients_as_one_backward(family):
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, max_seq_len=16,
                                    mtp=family, n_future=3))
    ids, labels = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    labels[0, :5] = -100
    weights = [1.0, 0.5, 0.25]
    losses = backward_heads(model, ids, labels, weights)
    split = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    per_head = []
    for k, logits in enumerate(model(ids)):
        total, count = head_loss(logits, labels, k)
        per_head.append(total / count)
    sum(w * l for w, l in zip(weights, per_head)).backward()
    assert losses == pytest.approx([l.item() for l in per_head], abs=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(split[name], p.grad, atol=1e-6), name
