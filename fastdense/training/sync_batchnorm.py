"""BatchNorm over the global batch for CPU tensors (gloo), where ``torch.nn.SyncBatchNorm`` raises.

PyTorch's SyncBatchNorm synchronises statistics only for GPU-like tensors; on CPU it raises as soon
as a process group of more than one rank exists. :class:`CPUSyncBatchNorm` is that module with one
more branch: CPU input in training mode, with more than one rank, is normalised with the mean and
biased variance of the whole (all-rank) batch, computed from per-channel sums, sums of squares and
counts all-reduced by an autograd function whose backward all-reduces the gradient, so
gradients equal those of one BatchNorm over the concatenated batch
(DDP then averages them over ranks, as it does for CUDA SyncBatchNorm). GPU input runs PyTorch's
SyncBatchNorm forward unchanged; eval mode and a single process are plain BatchNorm.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


def _torch_syncs(device: torch.device) -> bool:
    """Whether PyTorch's SyncBatchNorm synchronises tensors on ``device`` itself."""
    return device.type in ("cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name())


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of every rank's output gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllReduceSum.apply(grad.contiguous(), ctx.group), None


def global_batch_norm(
    input: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    momentum: float,
    eps: float,
    group=None,
) -> torch.Tensor:
    """Training-mode batch norm of ``input [N, C, ...]`` with statistics over every rank's batch.

    The sums are accumulated and all-reduced in float64, so the variance ``E[x^2] - E[x]^2`` keeps
    float32 inputs' precision. Running statistics follow :func:`torch.nn.functional.batch_norm`:
    ``r <- (1 - momentum) r + momentum s`` with the unbiased variance over the global count. A rank
    may hold no rows (count 0) as long as the global count exceeds 1.
    """
    channels = input.shape[1]
    dims = [0] + list(range(2, input.dim()))
    wide = input.to(torch.float64)
    local = torch.cat([wide.sum(dims), (wide * wide).sum(dims), wide.new_full((1,), input.numel() // max(channels, 1))])
    total = _AllReduceSum.apply(local, group or dist.group.WORLD)
    count = int(total[-1].item())
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training over all ranks, got {count} (input size {list(input.shape)})")
    mean = total[:channels] / count
    var = (total[channels : 2 * channels] / count - mean * mean).clamp_min(0.0)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.double())
            running_var.copy_(momentum * var * (count / (count - 1)) + (1 - momentum) * running_var.double())
    compute = torch.promote_types(input.dtype, torch.float32)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shape = [1, channels] + [1] * (input.dim() - 2)
    out = (input.to(compute) - mean.to(compute).view(shape)) * scale.to(compute).view(shape)
    if bias is not None:
        out = out + bias.to(compute).view(shape)
    return out.to(input.dtype)


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """:class:`torch.nn.SyncBatchNorm` for modules whose tensors live on the CPU (gloo).

    Same constructor, parameters, buffers and state-dict layout as PyTorch's; :func:`convert` swaps
    the modules that ``nn.SyncBatchNorm.convert_sync_batchnorm`` creates. It is not a subclass of
    ``nn.SyncBatchNorm`` because DistributedDataParallel refuses CPU modules that contain one.
    Training-mode CPU input with more than one rank uses :func:`global_batch_norm`; input on a device
    PyTorch synchronises itself (CUDA) runs ``nn.SyncBatchNorm.forward``; everything else (eval
    mode, a single process) is plain BatchNorm.

    >>> model = convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    >>> type(model[1]).__name__, model(torch.randn(2, 3, 5, 5)).shape
    ('CPUSyncBatchNorm', torch.Size([2, 4, 5, 5]))
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if _torch_syncs(input.device):
            return nn.SyncBatchNorm.forward(self, input)
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        group = self.process_group or dist.group.WORLD
        if dist.get_world_size(group) == 1:
            return super().forward(input)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / self.num_batches_tracked.item()
        track = self.track_running_stats
        return global_batch_norm(
            input, self.weight, self.bias, self.running_mean if track else None, self.running_var if track else None,
            factor, self.eps, group,
        )


def convert(module: nn.Module, process_group=None) -> nn.Module:
    """Every BatchNorm in ``module`` as :class:`CPUSyncBatchNorm` (PyTorch's conversion, then a class swap)."""
    module = nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for sub in module.modules():
        if type(sub) is nn.SyncBatchNorm:
            sub.__class__ = CPUSyncBatchNorm
    return module
