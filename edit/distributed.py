"""Data parallelism for LoRA training under ``accelerate launch``: one process per device.

    accelerate launch --num_processes 2 -m edit forget --corpus private.jsonl
    accelerate launch --cpu --num_processes 2 -m edit learn --corpus new.jsonl

Every process loads the model and reads the whole corpus; each optimizer step's batch is
split across the processes (``shard``), every process computes the loss on its share, and the
adapter's gradients are averaged over processes before the step (``average_gradients``:
one all-reduce of the flattened LoRA gradients), so all processes take identical steps from
the identical seeded initialization. The gradient is the mean of the per-process losses'
gradients (the usual data-parallel semantics). Only the main process writes the ledger; the
others wait, then check that the recorded adapter is the one they trained.

Without a launcher (``WORLD_SIZE`` unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether a launcher started several processes (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> torch.device:
    """Join the process group the launcher describes (via accelerate, which picks the backend:
    NCCL on GPUs, gloo on CPUs) and return this process's device."""
    from accelerate import PartialState

    return PartialState().device


def rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_size()[0] == 0


def shard(indices: list[int]) -> list[int]:
    """This process's share of one step's examples (every size-th, from its rank)."""
    rank, size = rank_and_size()
    return indices[rank::size]


def average_gradients(params: list[torch.Tensor]) -> None:
    """Replace each parameter's gradient by its mean over the processes."""
    _, size = rank_and_size()
    if size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= size
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def total(value: float, device: torch.device | str = "cpu") -> float:
    """The sum of ``value`` over the processes."""
    _, size = rank_and_size()
    if size == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def barrier() -> None:
    if rank_and_size()[1] > 1:
        dist.barrier()
