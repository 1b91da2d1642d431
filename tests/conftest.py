"""Test set-up: Triton kernels run in Triton's interpreter on CPU tensors when there is no GPU.

TRITON_INTERPRET must be set before triton is imported, and importing torch does not import triton,
so setting it here, first, covers every test module.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where kernels run: the GPU when present, else the CPU under Triton's interpreter."""
    return DEVICE
