"""VICReg's three terms (Bardes et al.): invariance, variance hinge and covariance penalty."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdense.ops._dispatch import resolve
from fastdense.ops._validate import check_same_device, check_tensor


def vicreg_invariance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``mean((x - y)^2)`` over every element, for ``x`` and ``y`` of the same shape.

    >>> import torch, fastdense.ops as ops
    >>> float(ops.vicreg_invariance(torch.zeros(2, 3), torch.full((2, 3), 2.0)))
    4.0
    """
    check_tensor(x, "x", "[n, D] or [n, S, D]", dims=(2, 3))
    check_tensor(y, "y", "the shape of x", dims=(2, 3))
    check_same_device("x", x, "y", y)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {list(x.shape)} and {list(y.shape)}")
    return F.mse_loss(x, y)


def vicreg_variance_reference(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    std = torch.sqrt(x.var(dim=0, unbiased=True) + eps)
    return F.relu(1 - std).mean()


def vicreg_covariance_reference(x: torch.Tensor) -> torch.Tensor:
    n, dim = x.shape[0], x.shape[-1]
    slots = x.reshape(n, -1, dim).transpose(0, 1)  # [S, n, D]
    centred = slots - slots.mean(dim=1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred / (n - 1)  # [S, D, D]
    off_diagonal = cov.pow(2).sum(dim=(1, 2)) - torch.diagonal(cov, dim1=1, dim2=2).pow(2).sum(dim=1)
    return (off_diagonal / dim).mean()


def vicreg_variance(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Variance hinge ``mean_d relu(1 - sqrt(var_d + eps))`` with the unbiased variance over rows.

    For ``x [n, D]`` the mean runs over the ``D`` columns; for ``x [n, S, D]`` each of the ``S`` slots
    is regularised on its own and the slots are averaged.

    >>> import torch, fastdense.ops as ops
    >>> x = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    >>> round(float(ops.vicreg_variance(x, eps=0.0)), 4)  # column 0 collapsed, column 1 spread
    0.5
    """
    _check_rows(x, "x")
    resolve("vicreg_variance", (x,), available=())
    return vicreg_variance_reference(x, eps)


def vicreg_covariance(x: torch.Tensor) -> torch.Tensor:
    """Covariance penalty: the sum of squared off-diagonal entries of ``Xc^T Xc / (n - 1)``, over ``D``.

    ``Xc`` is ``x`` centred over its ``n`` rows. For ``x [n, S, D]`` the penalty is computed per slot
    and averaged over the ``S`` slots.

    >>> import torch, fastdense.ops as ops
    >>> x = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])  # perfectly correlated columns
    >>> float(ops.vicreg_covariance(x))  # cov = [[2, 2], [2, 2]]: (2^2 + 2^2) / 2
    4.0
    """
    _check_rows(x, "x")
    resolve("vicreg_covariance", (x,), available=())
    return vicreg_covariance_reference(x)


def _check_rows(x, name: str) -> None:
    check_tensor(x, name, "[n, D] or [n, S, D]", dims=(2, 3))
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs n >= 2 rows for an unbiased variance, got shape {list(x.shape)}")
    if x.shape[-1] < 1 or (x.dim() == 3 and x.shape[1] < 1):
        raise ValueError(f"{name} must have at least one slot and one column, got shape {list(x.shape)}")
