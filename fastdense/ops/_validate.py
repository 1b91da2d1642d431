"""Argument checks shared by the ops: clear errors before anything reaches a kernel."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(x, name: str, shape: str, dims=None, float_only: bool = True) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` and the expected ``shape`` when ``x`` is not
    a tensor, has the wrong number of dimensions (``dims``: an int or a tuple of allowed ones) or a
    non-float dtype."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(x).__name__}")
    if dims is not None:
        allowed = (dims,) if isinstance(dims, int) else tuple(dims)
        if x.dim() not in allowed:
            raise ValueError(f"{name} must have shape {shape}, got {list(x.shape)}")
    if float_only and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64) of shape {shape}, got dtype {x.dtype}")


def check_same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")
