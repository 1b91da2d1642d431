"""torchrun support: process-group set-up from the environment, DDP wrapping and SyncBatchNorm."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fastdense.training import sync_batchnorm


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``...).

    NCCL for GPU tensors and gloo for CPU tensors on GPUs (``"cpu:gloo,cuda:nccl"``: numbers the
    host already knows, such as SCRL's box counts and VICReg's row counts, are exchanged as CPU
    tensors, and reading them back does not wait for the kernels queued on the GPU); gloo on CPUs;
    without torchrun's variables, a single process.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo")
        global _joined_here
        _joined_here = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


# Whether init_distributed started the process group (one a caller started is the caller's to end).
_joined_here = False


def shutdown() -> None:
    """Leave the process group that :func:`init_distributed` joined, if it did. Garbage is collected
    first: trainers sit in reference cycles, and the DDP wrappers and synchronised BatchNorms in them
    hold the group; left to interpreter shutdown, its teardown can abort the process (gloo: SIGABRT,
    "terminate called without an active exception") after a run that succeeded."""
    global _joined_here
    if _joined_here and dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
    _joined_here = False


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm statistics over the global batch: PyTorch's SyncBatchNorm on GPUs, and on CPUs
    (gloo, where PyTorch's raises) :class:`fastdense.training.sync_batchnorm.CPUSyncBatchNorm`.

    Every BatchNorm of ``model`` is converted, EMA targets included, so a train-mode target
    normalises over the global batch as well."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return sync_batchnorm.convert(model)


def wrap_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool) -> nn.Module:
    """DistributedDataParallel over the online parameters (targets do not require grad, so DDP skips them).

    Batches are moved to the device before the call, so ``device_ids`` stays None and DDP does
    not copy inputs again.
    """
    return nn.parallel.DistributedDataParallel(
        model, device_ids=None, find_unused_parameters=find_unused_parameters)


def gather_objects(obj, info: DistInfo):
    """Every rank's ``obj`` as a list on every rank (a one-element list in a single process)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / info.world_size
