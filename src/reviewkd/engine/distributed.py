"""DistributedDataParallel around the trainable part of a Distiller (student + method modules)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..distiller import Distiller


def wrap_ddp(distiller: Distiller, device: torch.device) -> DistributedDataParallel:
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
