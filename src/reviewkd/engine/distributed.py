"""DistributedDataParallel around the trainable part of a Distiller (student + method modules)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the methods import the collectives below; avoid an import cycle
    from ..distiller import Distiller


def wrap_ddp(distiller: "Distiller", device: torch.device) -> DistributedDataParallel:
    """Wrap for gradient all-reduce; the frozen teacher is left out of DDP's parameter/buffer sync."""
    if distiller.teacher is not None:
        ignored = [f"teacher.{name}" for name in distiller.teacher.state_dict()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(distiller, ignored)
    # A pre-training stage (AB, FT, FSP) or CE-only phases leave some parameters without gradients.
    find_unused = distiller.method.pretrain_epochs > 0
    return DistributedDataParallel(
        distiller,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused,
    )


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm statistics over the global batch (PyTorch's SyncBatchNorm runs on GPUs only)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def gather_batch(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` (same shape on all ranks) along dim 0; identity alone."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out)
    return out / world_size()
