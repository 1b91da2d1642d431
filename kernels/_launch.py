"""Host-side launch arithmetic.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``ConstexprFunction`` objects in recent Triton:
each call from Python goes through the JIT's call machinery (about 5 us on a slow core), and a
launcher computes several per call. These plain functions give the same integers.
"""

import contextlib
import os

import torch


def triton_interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, on CPU tensors):
    launchers then pick small tiles, and the ops send CPU tensors to Triton."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cdiv(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def next_power_of_2(value: int) -> int:
    """The smallest power of two ``>= value`` for ``value >= 1`` (0 for 0, as Triton's)."""
    return 1 << (int(value) - 1).bit_length() if value > 0 else 0


_NOTHING = contextlib.nullcontext()


def on_device_of(tensor: torch.Tensor):
    """A context in which ``tensor``'s CUDA device is the current one.

    Triton launches on the current device and its current stream, whatever device the arguments
    live on (torch's own CUDA ops switch with a device guard). Without this, a call on ``cuda:1``
    tensors from a thread whose current device is ``cuda:0`` would run on the wrong GPU. Backward
    passes need no guard: the autograd engine runs them with their tensors' device current.
    """
    index = tensor.device.index
    if index is None or index == torch.cuda.current_device():
        return _NOTHING
    return torch.cuda.device(index)
