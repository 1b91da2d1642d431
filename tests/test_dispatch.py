import pytest
import torch

import fastdense.ops as ops
from fastdense.ops._dispatch import resolve


def test_backend_context_overrides_environment(monkeypatch):
    monkeypatch.setenv("FASTDENSE_BACKEND", "triton")
    with ops.backend("reference"):
        assert ops.requested_backend() == "reference"
    assert ops.requested_backend() == "triton"


def test_unknown_backend_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        with ops.backend("cuda"):
            pass
    monkeypatch.setenv("FASTDENSE_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTDENSE_BACKEND"):
        ops.requested_backend()


def test_forcing_a_missing_backend_is_an_error():
    x = torch.zeros(2)
    with ops.backend("cpp"), pytest.raises(RuntimeError, match="no cpp implementation"):
        resolve("some_op", (x,), available=("reference",))


def test_auto_picks_by_device():
    x = torch.zeros(2)
    assert resolve("op", (x,), available=("triton", "cpp")) == "cpp"
    assert resolve("op", (x,), available=("triton",)) == "reference"


def test_launch_arithmetic_matches_triton():
    # The launchers' plain-Python cdiv / next_power_of_2 stand in for Triton's (slow to call from Python).
    import triton

    from fastdense.kernels._launch import cdiv, next_power_of_2

    for value in range(0, 3000):
        assert next_power_of_2(value) == triton.next_power_of_2(value), value
        for divisor in (1, 3, 16, 64, 128):
            assert cdiv(value, divisor) == triton.cdiv(value, divisor), (value, divisor)
