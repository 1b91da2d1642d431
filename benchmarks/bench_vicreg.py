"""VICReg variance + covariance, forward and forward+backward: fastdense's Triton kernels vs plain PyTorch.

Baselines (TF32 off, as the reference code runs by default):
- ``eager``: the reference code's form: centre, ``(x.T @ x) / (n - 1)``, off-diagonal copy through the
  flatten/view trick, square, sum (per slot with ``bmm`` for the local ``[n, S, D]`` case);
- ``gram_torch``: the same terms through ``‖Xc Xcᵀ‖² − Σ d²`` in plain PyTorch when ``n < D``
  (the direct form otherwise), i.e. the algebra without the fused kernels.

Reported per shape: medians, speed-ups over eager, peak extra memory of forward+backward (the
gradient itself excluded), the loss error against float64, and the fraction of the roofline floor
(FLOPs of the chosen form at the measured tensor-core rate, bytes at the measured copy bandwidth).
A second table counts covariance FLOPs and bytes communicated per rank for the distributed form.

    PYTHONPATH=. python3 benchmarks/bench_vicreg.py            # GPU: PERFORMANCE.md shapes
    PYTHONPATH=. python3 benchmarks/bench_vicreg.py --quick    # CPU (Triton interpreter), tiny shapes
    PYTHONPATH=. python3 benchmarks/bench_vicreg.py --host     # host time per call (CPU or GPU)

``--host`` measures what one call of ``vicreg_variance_covariance`` (and its backward) costs the host,
with ``torch.set_num_threads(1)``. Sub-millisecond calls launched one by one are bound by it: the
GPU waits for the host. On CPU (no GPU) every ``*_kernel`` of :mod:`fastdense.kernels.vicreg` is
replaced by a launcher that does nothing, so what remains is the Python, dispatcher and aten work
around the launches (``us``), with the aten ops the profiler records (nested ones included) and the
kernel launches per call (each costs the host a Triton launch on a GPU, not counted here). On a GPU,
with the real kernels: ``enqueue_us``, the host time per call while a queued ``torch.cuda._sleep``
keeps the GPU busy, and ``synced_us``, host and GPU back to back.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python3 benchmarks/<script>.py` imports the repository's packages

import fastdense.ops as ops  # noqa: E402
from benchmarks.common import HostRun, floor_ms, help_description, measured_bandwidth, peak_extra_bytes, print_table, time_ms, write_results  # noqa: E402
from fastdense.kernels import vicreg as kernels  # noqa: E402
from fastdense.ops.vicreg_distributed import communication_bytes, covariance_flops_per_rank  # noqa: E402

EPS = 1e-4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _slots(x: torch.Tensor) -> torch.Tensor:
    return (x.unsqueeze(1) if x.dim() == 2 else x).transpose(0, 1)  # [S, n, D]


def _variance(centred: torch.Tensor, n: int) -> torch.Tensor:
    return torch.relu(1 - torch.sqrt(centred.pow(2).sum(dim=1) / (n - 1) + EPS)).mean()


def eager_terms(x: torch.Tensor):
    """The reference code's eager form, per slot: the full ``D x D`` covariance and its off-diagonal copy."""
    xs = _slots(x).float()
    slots, n, dim = xs.shape
    centred = xs - xs.mean(dim=1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred / (n - 1)
    off = cov.flatten(1)[:, :-1].view(slots, dim - 1, dim + 1)[:, :, 1:]
    return _variance(centred, n), (off.pow(2).sum(dim=(1, 2)) / dim).mean()


def gram_torch_terms(x: torch.Tensor):
    """The Gram identity ``‖XcᵀXc‖² = ‖Xc Xcᵀ‖²`` in plain PyTorch (direct form when ``n >= D``)."""
    xs = _slots(x).float()
    slots, n, dim = xs.shape
    centred = xs - xs.mean(dim=1, keepdim=True)
    d = centred.pow(2).sum(dim=1)
    if n < dim:
        squares = (centred @ centred.transpose(1, 2)).pow(2).sum(dim=(1, 2))
    else:
        squares = (centred.transpose(1, 2) @ centred).pow(2).sum(dim=(1, 2))
    off = squares - d.pow(2).sum(dim=1)
    return _variance(centred, n), (off / ((n - 1) ** 2 * dim)).mean()


def fastdense_terms(x: torch.Tensor):
    with ops.backend("triton"):
        return ops.vicreg_variance_covariance(x, eps=EPS)


METHODS = {"eager": eager_terms, "gram_torch": gram_torch_terms, "fastdense": fastdense_terms}


def float64_terms(x: torch.Tensor):
    xs = _slots(x).double()
    slots, n, dim = xs.shape
    centred = xs - xs.mean(dim=1, keepdim=True)
    d = centred.pow(2).sum(dim=1)
    small = centred @ centred.transpose(1, 2) if n < dim else centred.transpose(1, 2) @ centred
    off = small.pow(2).sum(dim=(1, 2)) - d.pow(2).sum(dim=1)
    return _variance(centred, n), (off / ((n - 1) ** 2 * dim)).mean()


def kernel_cost(x: torch.Tensor):
    """(forward FLOPs, forward+backward FLOPs, forward bytes, forward+backward bytes) of the kernels."""
    xs = _slots(x)
    slots, n, dim, itemsize = xs.shape[0], xs.shape[1], xs.shape[2], x.element_size()
    side, inner = (n, dim) if kernels.use_gram_form(n, dim) else (dim, n)
    product = 2.0 * side * side * inner * slots
    forward = product / 2  # the upper triangle of the symmetric product
    kept = kernels.packed_product_fits(xs.transpose(0, 1), side)
    backward = product * (1 if kept else 2)  # (recompute +) apply
    x_bytes = n * slots * dim * itemsize
    return forward, forward + backward, 3 * x_bytes, 3 * x_bytes + 4 * x_bytes


def bench_shape(n, slots, dim, dtype, device, repeats, tf32_flops, bandwidth, precision):
    kernels.FP32_DOT_PRECISION = precision
    peak_flops = tf32_flops / {"tf32": 1, "tf32x3": 3}.get(precision, 8)
    shape = (n, dim) if slots == 1 else (n, slots, dim)
    x = (torch.randn(*shape, device=device) * torch.linspace(0.3, 1.5, dim, device=device)).to(dtype)
    ref_var, ref_cov = float64_terms(x)
    row = {"n": n, "slots": slots, "dim": dim, "dtype": str(dtype).replace("torch.", ""), "precision": precision, "form": "gram" if kernels.use_gram_form(n, dim) else "direct"}
    xg = x.clone().requires_grad_(True)
    for name, fn in METHODS.items():

        def forward():
            with torch.no_grad():
                return fn(x)

        def forward_backward():
            xg.grad = None
            variance, covariance = fn(xg)
            (25 * variance + covariance).backward()

        row[f"{name}_fwd_ms"] = time_ms(forward, device, repeats=repeats, warmup=1)
        row[f"{name}_fwdbwd_ms"] = time_ms(forward_backward, device, repeats=repeats, warmup=1)
        xg.grad = None
        extra = peak_extra_bytes(forward_backward, device)
        row[f"{name}_extra_MiB"] = (extra - xg.numel() * xg.element_size()) / 2**20 if extra >= 0 else float("nan")
        variance, covariance = fn(x)
        row[f"{name}_cov_err"] = abs(float(covariance) - float(ref_cov)) / max(abs(float(ref_cov)), 1e-300)
        row[f"{name}_var_err"] = abs(float(variance) - float(ref_var)) / max(abs(float(ref_var)), 1e-300)
    row["speedup_fwd"] = row["eager_fwd_ms"] / row["fastdense_fwd_ms"]
    row["speedup_fwdbwd"] = row["eager_fwdbwd_ms"] / row["fastdense_fwdbwd_ms"]
    row["speedup_vs_gram_torch_fwdbwd"] = row["gram_torch_fwdbwd_ms"] / row["fastdense_fwdbwd_ms"]
    fwd_flops, total_flops, fwd_bytes, total_bytes = kernel_cost(x)
    row["floor_fwd_ms"] = floor_ms(fwd_flops, fwd_bytes, peak_flops, bandwidth)
    row["floor_fwdbwd_ms"] = floor_ms(total_flops, total_bytes, peak_flops, bandwidth)
    row["floor_fraction_fwdbwd"] = row["floor_fwdbwd_ms"] / row["fastdense_fwdbwd_ms"] if row["floor_fwdbwd_ms"] else float("nan")
    return row


def measured_tf32_rate(device) -> float:
    """FLOP/s of TF32 tensor cores, measured with a large matmul (``tf32x3`` does three such
    products per tile, ``ieee`` runs without tensor cores: counted as 1/8 of the rate)."""
    if device.type != "cuda":
        return 0.0
    a = torch.randn(8192, 8192, device=device)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        ms = time_ms(lambda: a @ a, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * 8192**3 / (ms * 1e-3)


def distributed_rows(world: int, rows_per_rank: int, dim: int, device, repeats: int):
    """FLOPs and bytes per rank, row-block form vs all-gather + full covariance; and, on a GPU, the
    time of one rank's share (its rows' products against the gathered batch, no communication)."""
    flops = covariance_flops_per_rank(world, rows_per_rank, dim)
    comm = communication_bytes(world, rows_per_rank, dim)
    row = {"world": world, "rows_per_rank": rows_per_rank, "dim": dim, **flops, **{f"bytes_{k}": v for k, v in comm.items()}}
    row["comm_ratio_beyond_gather"] = comm["reference_all_reduce"] / comm["row_block_all_reduce"]
    n = world * rows_per_rank
    x = torch.randn(n, 1, dim, device=device)
    mean = x.mean(dim=0).contiguous()
    own, every = kernels.Operand(x[:rows_per_rank], False), kernels.Operand(x, False)
    row["rank_share_fwd_ms"] = time_ms(lambda: kernels.product_square_sums(own, every, mean, symmetric=False), device, repeats=repeats, warmup=1)
    row["full_covariance_fwd_ms"] = time_ms(lambda: torch.no_grad()(eager_terms)(x[:, 0]), device, repeats=repeats, warmup=1)
    return row


HOST_SHAPES = ((2048, 1, 8192), (256, 1, 2048), (2048, 49, 512))  # the target, a small Gram form, VICRegL's local slots


def host_overhead(args) -> None:
    run = HostRun("vicreg_host", kernels, args.quick, *((20, 5) if args.quick else (50, 15)))
    for n, slots, dim in HOST_SHAPES[:1] if args.quick else HOST_SHAPES:
        shape = (n, dim) if slots == 1 else (n, slots, dim)
        xg = torch.randn(*shape, device=run.device).requires_grad_(True)

        def forward():
            with ops.backend("triton"):
                return ops.vicreg_variance_covariance(xg)

        def forward_backward():
            variance, covariance = forward()
            return torch.autograd.grad(25 * variance + covariance, xg)

        run.add(dict(n=n, slots=slots, dim=dim), {"fwd": forward, "fwdbwd": forward_backward})
    run.write()


def main():
    parser = argparse.ArgumentParser(description=help_description(__doc__))
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU / Triton interpreter), seconds")
    parser.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16, fp16 (every shape)")
    parser.add_argument("--host", action="store_true", help="host time per call (see the module docstring); --quick: the first shape only")
    args = parser.parse_args()
    if args.host:
        return host_overhead(args)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if args.quick:
        shapes = [(48, 1, 96), (96, 1, 40), (40, 3, 24)]
        dist_case, repeats = (4, 16, 96), 2
    else:
        shapes = [(n, 1, d) for n in (256, 512, 1024, 2048) for d in (2048, 4096, 8192)] + [(2048, 49, 512)]
        dist_case, repeats = (8, 256, 8192), 20
    peak, bandwidth = measured_tf32_rate(device), measured_bandwidth(device)
    default_precision = kernels.FP32_DOT_PRECISION
    runs = [(DTYPES[name], shape, default_precision) for name in args.dtypes.split(",") for shape in shapes]
    # At the largest [n, D]: float32-level accuracy (tf32x3), and bfloat16 input.
    runs += [(torch.float32, shapes[-2], "tf32x3"), (torch.bfloat16, shapes[-2], default_precision)]
    rows = []
    for dtype, (n, slots, dim), precision in runs:
        rows.append(bench_shape(n, slots, dim, dtype, device, repeats, peak, bandwidth, precision))
        r = rows[-1]
        print(f"{r['dtype']:8s} {precision:6s} n={n:5d} S={slots:3d} D={dim:5d}  fwd x{r['speedup_fwd']:.1f}  fwd+bwd x{r['speedup_fwdbwd']:.1f}  cov err {r['fastdense_cov_err']:.1e}", flush=True)
    kernels.FP32_DOT_PRECISION = default_precision
    print_table(rows, ["dtype", "precision", "n", "slots", "dim", "form", "eager_fwdbwd_ms", "gram_torch_fwdbwd_ms", "fastdense_fwd_ms", "fastdense_fwdbwd_ms",
                       "speedup_fwd", "speedup_fwdbwd", "fastdense_extra_MiB", "eager_extra_MiB", "fastdense_cov_err", "floor_fraction_fwdbwd"])
    distributed = [distributed_rows(*dist_case, device, repeats)]
    print_table(distributed, ["world", "rows_per_rank", "dim", "reference_forward", "row_block_forward", "forward_ratio", "total_ratio",
                              "bytes_row_block_total", "bytes_reference_total", "comm_ratio_beyond_gather", "rank_share_fwd_ms", "full_covariance_fwd_ms"])
    path = write_results("vicreg" + ("_quick" if args.quick else ""), device, rows, extra={
        "distributed": distributed, "quick": args.quick, "fp32_dot_precision": default_precision,
        "tf32_flops_per_s": peak, "bandwidth_bytes_per_s": bandwidth,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
