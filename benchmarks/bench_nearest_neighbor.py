"""Nearest-neighbour matching (VICRegL): the Triton kernels against what users run today.

Baseline: ``torch.cdist`` + ``topk(1)`` + the row selection (sort, keep k, sort rows), one call per
view pair, in float32 with TF32 off (PyTorch's default). Also timed: the package reference, and the
kernel on float32 input (exact float32 products) and on bfloat16 input (tensor cores). Shapes from
PERFORMANCE.md plus a whole VICRegL step (2 global 7x7 + 6 local 3x3 views, features D = 512 and
locations D = 2: 56 matchings) as one figure. On the GPU, timed calls cycle through copies of
inputs smaller than L2 (``benchmarks.common.rotation_copies``), so they read them from memory.

    PYTHONPATH=. python3 benchmarks/bench_nearest_neighbor.py           # GPU, full table (about 150 s on an H200, autotuning included)
    PYTHONPATH=. python3 benchmarks/bench_nearest_neighbor.py --quick   # CPU interpreter, seconds
    PYTHONPATH=. python3 benchmarks/bench_nearest_neighbor.py --host    # host time per call (CPU or GPU)

``--host``: what a VICRegL step's 56 matchings (one ``nearest_neighbor_pairs_many`` call; float32,
and bfloat16 features beside float32 locations) and one pair cost the host, with
``torch.set_num_threads(1)``; on a CPU with the kernels stubbed (see ``host_cost`` in
``benchmarks/common.py`` and ``bench_vicreg.py --host``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the kernels can only run in Triton's interpreter here
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastdense.ops as ops  # noqa: E402
from benchmarks.common import HostRun, cycling, floor_ms, help_description, measured_bandwidth, peak_extra_bytes, print_table, rotation_copies, time_ms, write_results  # noqa: E402

# H100 SXM datasheet peaks (PERFORMANCE.md): dense bf16 tensor cores and plain fp32.
PEAK_FLOPS = {torch.bfloat16: 990e12, torch.float32: 67e12}


def baseline_pairs(query, candidates, k):
    """What VICRegL implementations run: a full B x N x M distance matrix, then topk and two sorts."""
    distances = torch.cdist(query, candidates)
    nn_distance, nn_index = distances.topk(1, dim=2, largest=False)
    order = torch.sort(nn_distance.squeeze(2), dim=1, stable=True).indices[:, :k]
    rows = torch.sort(order, dim=1).values
    return rows, nn_index.squeeze(2).gather(1, rows)


def vicregl_step_pairs(b, device, feature_dtype=torch.float32, seed=0, k_global=20, k_local=4):
    """The 56 matchings of a VICRegL step as ``(queries, candidates, ks)``, plus the 8 feature maps.

    2 global 7x7 and 6 local 3x3 views; for each global view ``i`` and each other view ``j``, both
    directions, in feature space (D = 512) and on the cells' source positions (D = 2); a 49-row
    query keeps ``k_global`` matches, a 9-row query ``k_local``.
    """
    g = torch.Generator().manual_seed(seed)
    grids = [7, 7] + [3] * 6
    features = [torch.randn(b, s * s, 512, generator=g).to(feature_dtype).to(device) for s in grids]
    locations = []
    for s in grids:
        top_left = torch.rand(b, 1, 2, generator=g) * 100
        size = 50 + torch.rand(b, 1, 2, generator=g) * 100
        ij = torch.stack(torch.meshgrid(torch.arange(s), torch.arange(s), indexing="xy"), -1).reshape(1, s * s, 2)
        locations.append((top_left + (ij + 0.5) * size / s).to(device))
    queries, candidates, ks = [], [], []
    for i in range(2):
        for j in range(8):
            if i == j:
                continue
            for space in (features, locations):
                for a, c in ((i, j), (j, i)):
                    queries.append(space[a])
                    candidates.append(space[c])
                    ks.append(k_global if space[a].shape[1] == 49 else k_local)
    return features, queries, candidates, ks


TIMING = {"repeats": 20, "warmup": 3}  # CPU repeats; --quick lowers them


def _time(fn, device):
    """Median milliseconds. On the GPU a shorter do_bench window than benchmarks.common's default
    (about 220 timings must fit the 90 s budget); the median of CUDA-event timings all the same."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    return time_ms(fn, device, **TIMING)


def _agreement(index, expected):
    return float((index == expected).float().mean())


def _floor(flops, nbytes, dtype, bandwidth):
    return floor_ms(flops, nbytes, PEAK_FLOPS[dtype], bandwidth)


def bench_shape(b, n, m, d, ks, device, bandwidth, time_reference, tensor_core_fp32=False):
    g = torch.Generator(device=device).manual_seed(b + n + d)
    # Timed calls cycle through copies of the inputs, so that small shapes read them from memory
    # rather than from L2 (PERFORMANCE.md), the baseline and the reference alike.
    inputs32 = [(torch.randn(b, n, d, device=device, generator=g), torch.randn(b, m, d, device=device, generator=g))
                for _ in range(rotation_copies((b * n * d + b * m * d) * 4, device))]
    inputs16 = [(q.bfloat16(), c.bfloat16()) for q, c in inputs32]
    (q32, c32), (q16, c16) = inputs32[0], inputs16[0]
    # correctness before timing: nearest indices against the reference on the same (rounded) values
    with ops.backend("reference"):
        ref32 = ops.nearest_neighbor(q32, c32)[1]
        ref16 = ops.nearest_neighbor(q16, c16)[1]
    with ops.backend("triton"):
        agree32 = _agreement(ops.nearest_neighbor(q32, c32)[1], ref32)
        agree16 = _agreement(ops.nearest_neighbor(q16, c16)[1], ref16)
    baseline_agree = _agreement(torch.cdist(q32, c32).argmin(dim=2), ref32)
    flops = 2.0 * b * n * m * d
    rows = []
    if tensor_core_fp32:
        rows.append(bench_fp32_precisions(b, n, m, d, q32, c32, ref32, flops, device))
    for k in ks:
        pairs = lambda q, c: ops.nearest_neighbor_pairs(q, c, k)  # noqa: E731
        with ops.backend("triton"):
            kernel32, kernel16 = cycling(pairs, inputs32), cycling(pairs, inputs16)
            t32, t16 = _time(kernel32, device), _time(kernel16, device)
            mem32 = peak_extra_bytes(kernel32, device)
        base = cycling(lambda q, c: baseline_pairs(q, c, k), inputs32)
        t_base = _time(base, device)
        mem_base = peak_extra_bytes(base, device)
        t_ref = float("nan")
        if time_reference and k == ks[0]:  # the reference's cost hardly depends on k
            with ops.backend("reference"):
                t_ref = _time(cycling(pairs, inputs32), device)
        out_bytes = b * n * 12 + b * k * 16
        rows.append({
            "case": "pair", "B": b, "N": n, "M": m, "D": d, "k": k,
            "baseline_ms": t_base, "reference_ms": t_ref, "kernel_fp32_ms": t32, "kernel_bf16_ms": t16,
            "speedup_fp32": t_base / t32, "speedup_bf16": t_base / t16,
            "speedup_fp32_vs_reference": t_ref / t32,
            "floor_fraction_fp32": _floor(flops, (b * n * d + b * m * d) * 4 + out_bytes, torch.float32, bandwidth) / t32,
            "floor_fraction_bf16": _floor(flops, (b * n * d + b * m * d) * 2 + out_bytes, torch.bfloat16, bandwidth) / t16,
            "peak_extra_bytes_kernel": mem32, "peak_extra_bytes_baseline": mem_base,
            "index_agreement_fp32": agree32, "index_agreement_bf16": agree16, "index_agreement_baseline": baseline_agree,
        })
    return rows


def bench_fp32_precisions(b, n, m, d, q32, c32, ref32, flops, device):
    """float32 search on TF32 tensor cores (kernels.FP32_INPUT_PRECISION; the default is "ieee"):
    time, throughput and index agreement with the reference for each mode."""
    from fastdense.kernels import nearest_neighbor as nn_kernels

    row = {"case": "fp32_precision", "B": b, "N": n, "M": m, "D": d, "k": ""}
    default = nn_kernels.FP32_INPUT_PRECISION
    try:
        for precision in ("ieee", "tf32x3", "tf32"):
            nn_kernels.FP32_INPUT_PRECISION = precision
            with ops.backend("triton"):
                row[f"index_agreement_{precision}"] = _agreement(ops.nearest_neighbor(q32, c32)[1], ref32)
                ms = _time(lambda: ops.nearest_neighbor(q32, c32), device)
            row[f"kernel_fp32_{precision}_ms"] = ms
            row[f"tflops_{precision}"] = flops / ms / 1e9
    finally:
        nn_kernels.FP32_INPUT_PRECISION = default
    q16, c16 = q32.bfloat16(), c32.bfloat16()
    with ops.backend("triton"):
        ms16 = _time(lambda: ops.nearest_neighbor(q16, c16), device)
    row["kernel_bf16_ms"], row["tflops_bf16"] = ms16, flops / ms16 / 1e9
    row["baseline_ms"] = _time(lambda: torch.cdist(q32, c32).argmin(dim=2), device)
    print(row, flush=True)
    return row


def bench_step(b, device, bandwidth):
    features, queries, candidates, ks = vicregl_step_pairs(b, device)
    step_bytes = sum({id(t): t.numel() * t.element_size() for t in queries}.values())
    copies = rotation_copies(step_bytes, device)  # as in bench_shape: timed calls read from memory
    steps32 = [(queries, candidates)] + [vicregl_step_pairs(b, device, seed=i)[1:3] for i in range(1, copies)]
    steps16 = [vicregl_step_pairs(b, device, torch.bfloat16, seed=i)[1:3] for i in range(copies)]
    with ops.backend("reference"):
        reference = ops.nearest_neighbor_pairs_many(queries, candidates, ks)
    with ops.backend("triton"):
        kernel = ops.nearest_neighbor_pairs_many(queries, candidates, ks)
    rows_agree = sum(int((r == rr).sum()) for (r, _), (rr, _) in zip(kernel, reference)) / sum(r.numel() for r, _ in reference)

    baseline = cycling(lambda qs, cs: [baseline_pairs(q, c, k) for q, c, k in zip(qs, cs, ks)], steps32)
    step = lambda qs, cs: ops.nearest_neighbor_pairs_many(qs, cs, ks)  # noqa: E731

    with ops.backend("triton"):
        k32, k16 = cycling(step, steps32), cycling(step, steps16)
        t32, t16 = _time(k32, device), _time(k16, device)
        mem32 = peak_extra_bytes(k32, device)
    with ops.backend("reference"):
        t_ref = _time(cycling(step, steps32), device)
    t_base = _time(baseline, device)
    mem_base = peak_extra_bytes(baseline, device)
    flops = sum(2.0 * q.shape[0] * q.shape[1] * c.shape[1] * q.shape[2] for q, c in zip(queries, candidates))
    nbytes = sum(f.numel() * 4 for f in features)
    return {
        "case": "vicregl_step_56_pairs", "B": b, "N": "49/9", "M": "49/9", "D": "512+2", "k": "20/4",
        "baseline_ms": t_base, "reference_ms": t_ref, "kernel_fp32_ms": t32, "kernel_bf16_ms": t16,
        "speedup_fp32": t_base / t32, "speedup_bf16": t_base / t16, "speedup_fp32_vs_reference": t_ref / t32,
        "floor_fraction_fp32": _floor(flops, nbytes, torch.float32, bandwidth) / t32,
        "floor_fraction_bf16": _floor(flops, nbytes / 2, torch.bfloat16, bandwidth) / t16,
        "peak_extra_bytes_kernel": mem32, "peak_extra_bytes_baseline": mem_base,
        "selected_row_agreement_fp32": rows_agree,
    }


def host_overhead(args) -> None:
    import fastdense.kernels.nearest_neighbor as kernels

    run = HostRun("nearest_neighbor_host", kernels, args.quick, *((10, 3) if args.quick else (30, 15)))
    for b in (8,) if args.quick else (64, 256):
        _, queries, candidates, ks = vicregl_step_pairs(b, run.device)
        # a bf16 training step: bfloat16 features beside float32 locations
        _, queries16, candidates16, _ = vicregl_step_pairs(b, run.device, torch.bfloat16)

        def step():
            with ops.backend("triton"):
                return ops.nearest_neighbor_pairs_many(queries, candidates, ks)

        def step_bf16():
            with ops.backend("triton"):
                return ops.nearest_neighbor_pairs_many(queries16, candidates16, ks)

        def one_pair():
            with ops.backend("triton"):
                return ops.nearest_neighbor_pairs(queries[0], candidates[0], ks[0])

        run.add(dict(B=b), {"vicregl_step_56_pairs": step, "vicregl_step_56_pairs_bf16": step_bf16, "one_pair": one_pair})
    run.write()


def main(argv=None):
    parser = argparse.ArgumentParser(description=help_description(__doc__))
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU interpreter, seconds)")
    parser.add_argument("--host", action="store_true", help="host time per call (see the module docstring)")
    args = parser.parse_args(argv)
    if args.host:
        return host_overhead(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default; the baseline as users run it
    bandwidth = measured_bandwidth(device)
    if args.quick:
        batches, sizes, widths, ks, step_batches = (2,), (9, 49), (2, 64), (1, 4), (1,)
        TIMING.update(repeats=2, warmup=0)
    else:
        batches, sizes, widths, ks, step_batches = (64, 256), (9, 49, 196, 784), (2, 512, 2048), (1, 4, 20), (64, 256)
    rows = []
    for b in batches:
        for n in sizes:
            for d in widths:
                largest = n == sizes[-1] and d == widths[-1] and b == batches[-1]
                rows += bench_shape(b, n, n, d, [k for k in ks if k <= n], device, bandwidth, time_reference=True, tensor_core_fp32=largest)
    for b in step_batches:
        rows.append(bench_step(b, device, bandwidth))
    columns = ["case", "B", "N", "D", "k", "baseline_ms", "reference_ms", "kernel_fp32_ms", "kernel_bf16_ms", "speedup_fp32", "speedup_bf16",
               "floor_fraction_bf16", "peak_extra_bytes_kernel", "peak_extra_bytes_baseline"]
    print_table(rows, columns)
    path = write_results("nearest_neighbor" + ("_quick" if args.quick else ""), device, rows,
                         extra={"measured_bandwidth_Bps": bandwidth, "peak_flops": {str(k): v for k, v in PEAK_FLOPS.items()}, "tf32": False})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
