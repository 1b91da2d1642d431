"""All-gather with a gradient, for losses computed on the whole (all-GPU) batch."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank, ctx.rows, ctx.world = dist.get_rank(), x.shape[0], world
        pieces = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(pieces, x.contiguous())
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank computes the same loss from the same gathered rows, so every rank holds the
        # same gradient for them: the all-reduce that VICReg's FullGatherLayer runs would just sum
        # `world` identical copies. Scaling the local slice gives that result without the traffic.
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows] * ctx.world


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [n, ...]`` from every rank, concatenated in rank order (``[world * n, ...]``), with a
    gradient; ``x`` itself when torch.distributed is not initialised (single process).

    Use only for terms that every rank computes identically from the gathered rows (VICReg's variance
    and covariance): the backward relies on it. Every rank must hold the same number of rows, as the
    training loop's loaders give them (``drop_last``, whole batches); nothing checks it here, since
    that would cost a collective and a host synchronisation per call.

    >>> gather_rows(torch.ones(2, 3)).shape  # single process
    torch.Size([2, 3])
    """
    if world_size() == 1:
        return x
    return _GatherRows.apply(x)


def world_size() -> int:
    """Processes in the default group; 1 without an initialised torch.distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_over_ranks(value: int, device=None) -> int:
    """``value`` summed over every rank (``value`` itself in a single process), through a tensor on
    ``device`` (the device the process group's backend reduces: CUDA for NCCL, CPU for gloo).

    >>> sum_over_ranks(3)  # single process
    3
    """
    if world_size() == 1:
        return int(value)
    total = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())
