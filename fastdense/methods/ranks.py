"""Terms computed over the batch of every process: VICReg's variance and covariance, counts."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist

from fastdense.ops import vicreg_variance_covariance
from fastdense.ops.vicreg_distributed import exchange_device


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def variance_covariance_over_ranks(x: torch.Tensor, eps: float = 1e-4) -> Tuple[torch.Tensor, torch.Tensor]:
    """VICReg's variance and covariance terms of ``x`` (``[n, D]`` or ``[n, S, D]``, this rank's rows)
    over the batch of every rank, as the references compute them on their all-gathered embeddings,
    gradient included; :func:`fastdense.ops.vicreg_variance_covariance` of ``x`` itself in a single
    process.

    With several processes the op's row-block form (``group="world"``) runs: each rank computes its
    own rows' share of the covariance rather than the whole, and nothing is communicated in the
    backward. The op gives each rank the full-batch gradient of its rows; the references' gather
    (VICReg's FullGatherLayer) sums every rank's copy of it in its backward, ``world`` times as much,
    which DDP's averaging over ranks turns into the full-batch gradient of the weights. The same
    scale is applied here, so a step equals the single-process step on the whole batch.

    >>> variance, covariance = variance_covariance_over_ranks(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), eps=0.0)
    >>> [round(float(variance), 4), round(float(covariance), 4)]  # single process
    [0.0, 4.0]
    """
    world = world_size()
    if world == 1:
        return vicreg_variance_covariance(x, eps)
    variance, covariance = vicreg_variance_covariance(x, eps, group="world")
    return _ScaleGradient.apply(variance, world), _ScaleGradient.apply(covariance, world)


def world_size() -> int:
    """Processes in the default group; 1 without an initialised torch.distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_over_ranks(value: int, device=None) -> int:
    """``value`` summed over every rank (``value`` itself in a single process), through a CPU tensor
    where the process group carries them (:func:`fastdense.ops.vicreg_distributed.exchange_device`:
    no wait for the kernels queued on the GPU), else a tensor on ``device`` (NCCL alone).

    >>> sum_over_ranks(3)  # single process
    3
    """
    if world_size() == 1:
        return int(value)
    total = torch.tensor([int(value)], dtype=torch.int64, device=exchange_device(dist.group.WORLD, torch.device(device or "cpu")))
    dist.all_reduce(total)
    return int(total.item())
