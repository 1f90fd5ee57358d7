"""train.grad_checkpointing: the same losses and gradients as a plain step, with fewer activations
kept between forward and backward."""

import pytest
import torch

from mtplab.config import ModelConfig
from mtplab.models.transformer import Transformer
from mtplab.training.losses import backward_heads, head_weights

SMALL = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, max_seq_len=32, dropout=0.1)
SHAPES = {
    "parallel-heads": dict(mtp="parallel", n_future=3, head_layers=1),
    "nanochat-features": dict(n_future=2, head_layers=1, value_embeds=True, ve_gate_channels=8,
                              layer_lambdas=True, smear=8, backout=True, qk_norm=True, qk_scale=1.2),
    "sequential": dict(mtp="sequential", n_future=3),
}


def step(config: ModelConfig, checkpointed: bool, ids, labels):
    torch.manual_seed(0)
    model = Transformer(config).train()
    model.set_grad_checkpointing(checkpointed)
    torch.manual_seed(1)  # the same dropout masks for both runs
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        losses = backward_heads(model, ids, labels, head_weights(config))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads, sum(saved)


@pytest.mark.parametrize("name", SHAPES)
def test_checkpointed_step_has_the_same_loss_and_gradients(name):
    config = ModelConfig(**SMALL, **SHAPES[name])
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (2, 24), generator=g)
    labels = torch.randint(0, 64, (2, 24), generator=g)
    plain_losses, plain_grads, plain_saved = step(config, False, ids, labels)
    ckpt_losses, ckpt_grads, ckpt_saved = step(config, True, ids, labels)
    assert ckpt_losses == pytest.approx(plain_losses, abs=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) > 10
    for n in plain_grads:
        assert torch.allclose(plain_grads[n], ckpt_grads[n], atol=1e-6, rtol=1e-5), n
    assert ckpt_saved < plain_saved / 2  # the blocks' insides were not kept


def test_checkpointing_is_off_at_inference():
    model = Transformer(ModelConfig(**SMALL, n_future=2)).eval()
    model.set_grad_checkpointing(True)
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        a = model(ids)[0]
    model.set_grad_checkpointing(False)
    with torch.no_grad():
        assert torch.equal(a, model(ids)[0])
