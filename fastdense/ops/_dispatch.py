"""Choosing an implementation: reference (PyTorch), triton (kernels/) or cpp (csrc/).

Automatic by default (CUDA tensor -> triton, CPU tensor -> cpp where it exists, else reference);
forced with ``FASTDENSE_BACKEND`` or :func:`backend`. A forced backend that cannot serve a call
raises instead of silently falling back, so tests and benchmarks measure what they name.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterable, Iterator

import torch

from fastdense.kernels._launch import triton_interpreted

BACKENDS = ("auto", "reference", "triton", "cpp")
_state = threading.local()


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force the implementation used by every ``fastdense.ops`` call inside the block.

    >>> import torch, fastdense.ops as ops
    >>> with ops.backend("reference"):
    ...     loss = ops.vicreg_invariance(torch.zeros(4, 8), torch.ones(4, 8))
    >>> float(loss)
    1.0
    """
    _check_name(name, "backend")
    previous = getattr(_state, "forced", None)
    _state.forced = name
    try:
        yield
    finally:
        _state.forced = previous


def requested_backend() -> str:
    """The backend asked for: the innermost :func:`backend` block, else ``FASTDENSE_BACKEND``, else ``auto``."""
    forced = getattr(_state, "forced", None)
    if forced is not None:
        return forced
    name = os.environ.get("FASTDENSE_BACKEND", "auto").strip().lower() or "auto"
    _check_name(name, "FASTDENSE_BACKEND")
    return name


def resolve(op: str, tensors: Iterable[torch.Tensor], available: Iterable[str]) -> str:
    """The backend that serves this call of ``op`` on ``tensors``.

    ``available`` names the backends the op has (``reference`` always). Triton serves CUDA tensors,
    and CPU tensors only when Triton's interpreter is on (``TRITON_INTERPRET=1``).
    """
    available = set(available) | {"reference"}
    on_cuda = any(t.is_cuda for t in tensors if torch.is_tensor(t))
    requested = requested_backend()
    if requested == "auto":
        if on_cuda and "triton" in available:
            return "triton"
        if not on_cuda and "cpp" in available:
            return "cpp"
        return "reference"
    if requested not in available:
        raise RuntimeError(f"fastdense.ops.{op}: backend {requested!r} was forced but {op} has no {requested} implementation (it has: {sorted(available)})")
    if requested == "triton" and not on_cuda and not triton_interpreted():
        raise RuntimeError(f"fastdense.ops.{op}: backend 'triton' was forced on CPU tensors; set TRITON_INTERPRET=1 before importing triton to run the kernels in Triton's interpreter")
    if requested == "cpp" and on_cuda:
        raise RuntimeError(f"fastdense.ops.{op}: backend 'cpp' was forced on CUDA tensors; the C++ implementation runs on the CPU")
    return requested


def plain_eager(*tensors: torch.Tensor) -> bool:
    """Whether this call runs eagerly on plain tensors: not traced by torch.compile or make_fx, no
    dispatch mode active, no tensor subclass and no functorch wrapper. Such calls may skip a custom
    op's Python autograd and redispatch layers, which cost the host more than the kernels' launches."""
    return (
        not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and all(type(t) is torch.Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)
    )


def _check_name(name: str, what: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
