"""Collectives over the processes of a torchrun job; each is the identity in a single process.

Methods import these (a memory bank updated from the whole global batch); the engine uses them for
gradients, buffers and metrics. Nothing here depends on the engine.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@torch.no_grad()
def gather_batch(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` (same shape on all ranks) along dim 0; identity alone."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out)
    return out


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    return sum_over_ranks(tensor) / world_size() if world_size() > 1 else tensor


@torch.no_grad()
def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Replace each gradient by its mean over the ranks: one all-reduce per dtype (coalesced).

    Done after all of a step's backward passes, so it serves recipes with several optimiser
    groups and gradient routing alike (DDP's hooks assume one backward pass per forward).
    """
    if world_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= world_size()
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


@torch.no_grad()
def broadcast_state_dicts(states: dict[str, dict], src: int = 0) -> None:
    """Every rank takes rank ``src``'s values of these state dicts in place (their tensors share
    storage with the modules' parameters and buffers, BatchNorm statistics included)."""
    if world_size() == 1:
        return
    for state in states.values():
        for tensor in state.values():
            if torch.is_tensor(tensor):
                dist.broadcast(tensor, src)
