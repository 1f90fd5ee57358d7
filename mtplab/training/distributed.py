"""Data-parallel training through torch.distributed, started by torchrun.

    torchrun --nproc_per_node 2 -m mtplab train --recipe recipes/tiny.toml --out runs/tiny-ddp

Every rank draws the same global micro-batch order and keeps its own contiguous slice of rows, so
the global batch (train.batch_size x train.grad_accum) is the same whatever the number of processes.
Each head's loss is divided by the token count of the *global* micro-batch, so summing the ranks'
gradients (one all-reduce per optimizer step, after accumulation) gives exactly the gradient a
single process computes. Gradients are reduced by hand rather than by the DistributedDataParallel
wrapper because the trainer back-propagates one head at a time (see losses.py): several backward
passes per forward, with the unembedding used by every head, which DDP's reducer does not allow.

train.parallel = "fsdp" shards parameters, gradients and optimizer state with FSDP2
(`fully_shard`) for models that do not fit one device; it then takes a plain all-heads backward.
gloo on CPU, nccl on CUDA. Rank 0 alone writes checkpoints and metrics.

What the training loop asks of a data-parallel run is here: joining it (`start`, `rank_device`),
whether to shard (`sharded`), the loss scale, summing counts, losses and gradients over ranks,
the gradient norm, and the whole state a checkpoint saves (`states`, `restore_optimizer`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import MtplabError


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global micro-batch."""
        per = batch_size // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


def start(device: torch.device) -> Ranks:
    """Join the process group torchrun describes in the environment (a single process otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ranks


def rank_device(ranks: Ranks, device: torch.device) -> torch.device:
    """The device this rank trains on: its own GPU (LOCAL_RANK) under torchrun on CUDA."""
    if ranks.active and device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    return device


def stop(ranks: Ranks) -> None:
    if ranks.active and dist.is_initialized():
        dist.destroy_process_group()


def check_batch(ranks: Ranks, batch_size: int) -> None:
    if batch_size % ranks.world:
        raise MtplabError(f"train.batch_size ({batch_size}) must be divisible by the number of "
                          f"processes ({ranks.world}): it is the global batch, split between them")


def sharded(ranks: Ranks, parallel: str, optimizer: str, tst: bool) -> bool:
    """Whether this run shards its model (train.parallel = fsdp under torchrun); refused where the
    step needs what FSDP splits."""
    if not (ranks.active and parallel == "fsdp"):
        return False
    if tst or optimizer != "adamw":
        raise MtplabError("train.parallel = fsdp supports AdamW without TST for now (Muon/Aurora need "
                          "whole matrices, TST's phase 1 its own forward): use ddp")
    return True


def loss_scale(ranks: Ranks, sharded: bool, grad_accum: int) -> float:
    """What each micro-batch's loss is multiplied by before its backward. FSDP averages gradients
    over ranks; the losses are already shares of the global mean, so it is undone."""
    return (ranks.world if sharded else 1) / grad_accum


def sum_(ranks: Ranks, values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks, in place; the identity in a single process."""
    if ranks.active:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def sum_gradients(ranks: Ranks, model: torch.nn.Module) -> None:
    """Sum every gradient over ranks: one flat all-reduce instead of one per tensor."""
    if not ranks.active:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def reduce_gradients(ranks: Ranks, model: torch.nn.Module, sharded: bool) -> None:
    """After the last micro-batch: the replicas' gradients summed (FSDP reduces its shards
    itself, during backward)."""
    if not sharded:
        sum_gradients(ranks, model)


def grad_norm(params: list[torch.nn.Parameter], clip: float) -> float:
    """The gradients' global norm, clipped to `clip` first when it is > 0 (a DTensor under FSDP)."""
    if clip > 0:
        return to_float(torch.nn.utils.clip_grad_norm_(params, clip))
    grads = [p.grad for p in params if p.grad is not None]
    return to_float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def shard(model: torch.nn.Module, ranks: Ranks, device: torch.device) -> None:
    """FSDP2: every transformer block, then the rest of the model, sharded over the ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..models.layers import Block

    mesh = init_device_mesh(device.type, (ranks.world,))
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.stack_heads = False  # the batched inference path reads whole weights, which FSDP splits


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Whole (unsharded) model and optimizer state dicts, on the CPU of rank 0; every rank must call."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options))


def states(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict | None, dict]:
    """What a checkpoint saves: (whole model state, or None to read the model itself; optimizer
    state). Sharded, every rank must call."""
    return full_state(model, optimizer) if sharded else (None, optimizer.state_dict())


def restore_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                      sharded: bool) -> None:
    if sharded:
        load_optimizer(model, optimizer, state)
    else:
        optimizer.load_state_dict(state)


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Scatter a whole optimizer state dict (as `full_state` made it) into a sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def to_float(value: torch.Tensor) -> float:
    """A scalar that may be a DTensor (FSDP's gradient norm) as a Python float."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)
