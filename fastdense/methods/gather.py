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
    and covariance): the backward relies on it.

    >>> gather_rows(torch.ones(2, 3)).shape  # single process
    torch.Size([2, 3])
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherRows.apply(x)
