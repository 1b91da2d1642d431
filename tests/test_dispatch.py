import pytest
import torch

import fastdense.ops as ops
from fastdense.ops._dispatch import resolve


def test_backend_context_overrides_environment(monkeypatch):
    monkeypatch.setenv("FASTDENSE_BACKEND", "triton")
    with ops.backend("reference"):
        assert ops.requested_backend() == "reference"
    assert ops.requested_backend() == "triton"


def test_nested_backend_blocks_restore_the_outer_choice(monkeypatch):
    monkeypatch.delenv("FASTDENSE_BACKEND", raising=False)
    with ops.backend("reference"):
        with ops.backend("triton"):
            assert ops.requested_backend() == "triton"
        assert ops.requested_backend() == "reference"
    assert ops.requested_backend() == "auto"


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


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_triton_ops_run_on_their_tensors_gpu_not_the_current_one():
    # Triton launches on the current device; the ops make their input's device current first.
    torch.cuda.set_device(0)
    second = torch.device("cuda", 1)
    torch.manual_seed(0)
    feats = torch.randn(2, 24, 7, 9, device=second, requires_grad=True)
    boxes = torch.tensor([[0, 0.0, 0.0, 100.0, 100.0], [1, 10.0, 20.0, 150.0, 90.0]], device=second)
    query, candidates = torch.randn(3, 9, 64, device=second), torch.randn(3, 11, 64, device=second)
    x = torch.randn(17, 31, device=second, requires_grad=True)

    def run(name):
        feats.grad = x.grad = None
        with ops.backend(name):
            pooled = ops.roi_align(feats, boxes, 2, spatial_scale=1 / 32)
            distance, index = ops.nearest_neighbor(query, candidates)
            variance, covariance = ops.vicreg_variance_covariance(x)
            (pooled.square().sum() + variance + covariance).backward()
        torch.cuda.synchronize(second)
        return pooled.detach(), distance, index, variance.detach(), covariance.detach(), feats.grad, x.grad

    fast, reference = run("triton"), run("reference")
    assert torch.cuda.current_device() == 0
    for got, want in zip(fast, reference):
        assert got.device == second
        if want.dtype == torch.int64:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
