"""Projection heads shared by the methods, written once.

- :func:`mlp` builds the Linear-BN-ReLU stacks of BYOL (projector/predictor, one hidden layer) and
  VICReg(L) (expander ``8192-8192-8192``, local projector ``512-512-512``, last Linear without bias).
  Heads that run "per location" (VICRegL's local projector, LEWEL's 1x1-conv neck) are the same
  module on ``[N * positions, C]`` rows: a 1x1 convolution with BatchNorm over ``B * HW`` positions is
  exactly a Linear with BatchNorm over those rows. :func:`per_location` applies a head that way.
- :class:`DINOHead` is DINO's head: MLP with GELU, L2-normalised bottleneck, weight-normalised last
  layer whose gain is fixed to 1 (so each output unit is a unit vector).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_dim: int, dims: Sequence[int], last_bias: bool = True, norm: str = "batch") -> nn.Sequential:
    """Linear-BN-ReLU blocks through ``dims[:-1]``, then a Linear to ``dims[-1]``.

    ``mlp(2048, [4096, 256])`` is BYOL's projector; ``mlp(2048, [8192, 8192, 8192], last_bias=False)``
    is VICReg's expander (the spec string ``"8192-8192-8192"``). ``norm="layer"`` puts LayerNorm in
    place of BatchNorm (VICRegL's heads on a ConvNeXt).

    >>> head = mlp(8, [16, 4])
    >>> head(torch.randn(5, 8)).shape
    torch.Size([5, 4])
    """
    dims = [int(d) for d in dims]
    if not dims or min(dims) < 1 or in_dim < 1:
        raise ValueError(f"mlp needs a positive in_dim and at least one positive output size, got in_dim={in_dim}, dims={dims}")
    norms = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}
    if norm not in norms:
        raise ValueError(f"mlp: norm must be one of {sorted(norms)}, got {norm!r}")
    layers = []
    width = in_dim
    for hidden in dims[:-1]:
        layers += [nn.Linear(width, hidden), norms[norm](hidden), nn.ReLU(inplace=True)]
        width = hidden
    layers.append(nn.Linear(width, dims[-1], bias=last_bias))
    return nn.Sequential(*layers)


def parse_spec(spec) -> list:
    """``"8192-8192-8192"`` or a sequence of ints -> a list of ints (VICRegL's way of writing heads)."""
    if isinstance(spec, str):
        try:
            return [int(part) for part in spec.split("-")]
        except ValueError as e:
            raise ValueError(f"head spec must look like '512-512-512', got {spec!r}") from e
    return [int(d) for d in spec]


def per_location(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Apply a row-wise head to every position of ``features [B, C, P]``; returns ``[B, D, P]``.

    Batch-norm statistics run over all ``B * P`` positions, as a 1x1 convolution's would.
    """
    batch, channels, positions = features.shape
    rows = features.transpose(1, 2).reshape(batch * positions, channels)
    return head(rows).reshape(batch, positions, -1).transpose(1, 2)


class DINOHead(nn.Module):
    """DINO's projection head: ``hidden`` GELU MLP -> ``bottleneck``, L2-normalise, then a
    weight-normalised bias-free Linear to ``out_dim`` whose gain is fixed to 1.

    >>> head = DINOHead(16, 32, hidden_dim=8, bottleneck_dim=4)
    >>> head(torch.randn(3, 16)).shape
    torch.Size([3, 32])
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden_dim), nn.GELU()]
            width = hidden_dim
        layers.append(nn.Linear(width, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        # The direction V of weight_norm; with g fixed to 1 the effective weight is V / ||V|| per row.
        self.last_direction = nn.Parameter(nn.Linear(bottleneck_dim, out_dim, bias=False).weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last_direction, dim=1))
