"""RoIAlign: fastdense's Triton kernels against ``torchvision.ops.roi_align``, forward and forward+backward.

Shapes from PERFORMANCE.md: SCRL's ``[B, 2048, 7, 7]`` (B in {64, 256}, 10 boxes per image, spatial
scale 1/32 on 224 px views) with output 1x1 (the pooled ``[K, C]`` form; baseline: torchvision + mean)
and 7x7, sampling -1 and 2, aligned False/True, float32 and bfloat16, NCHW and channels_last; and the
detection shape ``[8, 256, 200, 304]`` with 512 boxes, 7x7 output.

torchvision has no bfloat16 kernel: its bfloat16 baseline is what autocast does, a cast to float32 and
back (timed). Each row reports both medians, the ratio, and the fraction of the memory floor
(``bytes / measured copy bandwidth``), where the bytes are the input read plus the output written for
the forward, and in addition the output gradient read plus the input gradient written for the backward.
Correctness against torchvision is checked on the same inputs before timing: a case outside
CONVENTIONS.md's tolerances stops the run. fastdense is also timed
with ``check_boxes=False`` (``*_unchecked_*`` columns): no host sync for the boxes' value check, as SCRL
calls it and as torchvision always runs.
On a GPU both sides are also replayed from CUDA graphs (``*_graph_*`` columns: fastdense unchecked,
torchvision as above): the GPU time alone, whose bandwidth fraction is the kernels' own, free of the
host's per-call work that dominates these sub-millisecond calls when they are launched one by one.

By default the SCRL shapes are an 8-row orthogonal array over the six two-valued axes (B, output,
sampling, aligned, dtype, layout): every value of every axis, and every pair of values of any two
axes, appears; ``--full`` times the whole 64-row product. Either way SCRL's own call (``scrl-recipe``
rows: B 256, 1x1, sampling -1, aligned False, float32 in both layouts), where the issue's target is
measured, is timed too. Each row is printed and the JSON rewritten
as soon as it is measured, so an interrupted run keeps what it has.

    PYTHONPATH=. python3 benchmarks/bench_roi_align.py            # GPU, 8 + 2 SCRL, 2 detection rows (< 2 min)
    PYTHONPATH=. python3 benchmarks/bench_roi_align.py --full     # GPU, 64 SCRL + 4 detection rows
    PYTHONPATH=. python3 benchmarks/bench_roi_align.py --quick    # CPU (Triton interpreter), seconds
    PYTHONPATH=. python3 benchmarks/bench_roi_align.py --host     # host overhead per call (CPU or GPU)
    PYTHONPATH=. python3 benchmarks/bench_roi_align.py --tuned    # GPU, with tune_roi_align.py's settings applied

Every result records the kernels' settings it ran with (``settings``: the package's
:data:`~fastdense.kernels.roi_align.TUNED_SETTINGS`, or with ``--tuned`` those of a tuning result,
named in ``tuned_from``).

``--host`` measures what one call costs the host, at SCRL's pooled case (10 boxes per image, 1x1
output, ``check_boxes`` False and True), forward and forward+backward, with ``torch.set_num_threads(1)``:

- on CPU (no GPU), the Triton path under the interpreter with every ``*_kernel`` of
  :mod:`fastdense.kernels.roi_align` replaced by a launcher that does nothing: what remains is the
  Python, dispatcher and aten work around the launches (``us`` columns: the median over rounds of the
  mean per call), the aten ops the profiler records per call (nested ones included) and the number of
  kernel launches (each costs the host a Triton launch on a GPU, not counted in the time here); the
  box check's flags, which its stub does not write, are zeroed (one extra small op per checked call);
- on a GPU, the real kernels: ``enqueue_us`` is the host time per call while the GPU is kept busy
  (a ``torch.cuda._sleep`` queued first, so no call ever waits for the GPU: the rate at which the
  host can issue calls), ``synced_us`` the time per call with a synchronisation after each (latency:
  host and GPU work back to back). ``check_boxes=True`` syncs inside the call, so it has only
  ``synced_us``. It also times, with
  ``do_bench``, the two ways of grouping the boxes by image over a range of box counts (the threshold
  between them is ``GROUP_KERNEL_MAX_BOXES`` in the kernels' module).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchvision  # noqa: E402

import fastdense.ops as ops  # noqa: E402
from benchmarks.common import RESULTS_DIR, HostRun, _fmt, device_name, floor_ms, help_description, measured_bandwidth, print_table, slug, time_ms, write_results  # noqa: E402

L2_BYTES = 50 * 2**20
GPU_WINDOW_MS = 40  # do_bench window per timing: four timings per row keep a row near a second
COLUMNS = ["case", "shape", "output", "sampling", "aligned", "dtype", "layout", "fwd_rel_err", "bwd_rel_err", "fwd_ms", "fwd_speedup", "fwd_bandwidth_fraction", "fwdbwd_ms", "fwdbwd_speedup", "fwdbwd_bandwidth_fraction", "fwdbwd_unchecked_ms", "fwdbwd_unchecked_speedup", "fwdbwd_graph_speedup", "fwdbwd_graph_bandwidth_fraction"]


def scrl_rois(num_images: int, per_image: int, image_size: int, generator: torch.Generator) -> torch.Tensor:
    """Boxes in view pixels, at least 32 px a side, as SCRL samples them."""
    size = 32 + torch.rand(num_images * per_image, 2, generator=generator) * (image_size - 32)
    start = torch.rand(num_images * per_image, 2, generator=generator) * (image_size - size)
    index = torch.arange(num_images).repeat_interleave(per_image)[:, None].float()
    return torch.cat([index, start, start + size], dim=1)


def detection_rois(num_images: int, count: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    extent = torch.tensor([width, height], dtype=torch.float32)
    size = (0.02 + torch.rand(count, 2, generator=generator) * 0.5) * extent
    start = torch.rand(count, 2, generator=generator) * (extent - size)
    index = torch.randint(0, num_images, (count, 1), generator=generator).float()
    return torch.cat([index, start, start + size], dim=1)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


# CONVENTIONS.md's tolerances (float32: the TF32-level one, as the 7x7 kernels use tensor cores),
# here against torchvision's own float32 results on the same inputs.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2}


def check_agreement(case: str, dtype: torch.dtype, fwd_error: float, bwd_error: float) -> None:
    """Stop the run when fastdense disagrees with torchvision: a wrong kernel has no speed to report."""
    if not max(fwd_error, bwd_error) <= TOLERANCE[dtype]:
        raise AssertionError(f"{case}: fastdense differs from torchvision.ops.roi_align (relative error forward {fwd_error:.3g}, backward {bwd_error:.3g}; tolerance {TOLERANCE[dtype]:g}); not timed")


def make_case(shape, rois, output, sampling, aligned, scale, dtype, memory, device, generator):
    """Inputs (rotated copies when one is smaller than L2) and the two functions to time."""
    nbytes = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
    copies = max(1, min(8, -(-3 * L2_BYTES // nbytes))) if device.type == "cuda" else 1
    memory_format = torch.channels_last if memory == "channels_last" else torch.contiguous_format
    inputs = [torch.randn(shape, generator=generator).to(device=device, dtype=dtype).contiguous(memory_format=memory_format).requires_grad_() for _ in range(copies)]
    rois = rois.to(device)
    pooled = output == "1x1-pooled"
    size = (1, 1) if pooled else (7, 7)
    position = [0]

    def next_input():
        position[0] = (position[0] + 1) % copies
        return inputs[position[0]]

    def ours(x, check_boxes=True):
        with ops.backend("triton"):  # on CPU too: the interpreter, so --quick exercises the kernels
            if pooled:
                return ops.roi_pool_vectors(x, rois, scale, sampling, aligned, check_boxes=check_boxes)
            return ops.roi_align(x, rois, size, scale, sampling, aligned, check_boxes=check_boxes)

    def theirs(x):
        source = x if x.dtype in (torch.float32, torch.float64, torch.float16) else x.float()
        out = torchvision.ops.roi_align(source, rois.to(source.dtype), size, scale, sampling, aligned)
        out = out.mean((2, 3)) if pooled else out
        return out.to(x.dtype)

    return inputs, next_input, ours, theirs


def graph_ms(fn, inputs, device) -> float:
    """GPU milliseconds per ``fn(x)``, replayed from one CUDA graph that calls it once per rotated
    input: the kernels' time without the host's per-call work (NaN on CPU, or if capture fails)."""
    if device.type != "cuda":
        return float("nan")
    # Fresh leaves: the inputs' own gradient accumulators were made on the default stream by the
    # eager timings, and autograd reaching one from the capture stream breaks the capture (the
    # H200 run lost its first case's forward+backward graph so).
    inputs = [x.detach().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in inputs]
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile the kernels and warm the allocator outside the capture
            for x in inputs:
                fn(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for x in inputs:
                fn(x)
    except Exception as error:  # a capture failure costs these columns, not the run
        print(f"  (no CUDA graph: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})", flush=True)
        return float("nan")
    return time_ms(graph.replay, device, gpu_window_ms=GPU_WINDOW_MS) / len(inputs)


# SCRL's own calls (fastdense.methods.scrl.SCRL.pool): float32 maps, channels_last on a GPU (NCHW
# beside it), 1x1 output, sampling -1, aligned False, at PERFORMANCE.md's larger batch.
SCRL_RECIPE = [(256, "1x1-pooled", -1, False, torch.float32, "channels_last"), (256, "1x1-pooled", -1, False, torch.float32, "nchw")]


SCRL_AXES = ((64, 256), ("1x1-pooled", "7x7"), (-1, 2), (False, True), (torch.float32, torch.bfloat16), ("nchw", "channels_last"))


def scrl_settings(axes, full: bool):
    """The full product of six two-valued axes, or the 8-run two-level orthogonal array (factors
    a, b, c, ab, ac, bc): every pair of values of any two axes occurs twice; then whichever of
    :data:`SCRL_RECIPE` they lack (the array need not hold SCRL's own call, where the issue's target
    is measured)."""
    if full:
        runs = list(itertools.product(*axes))
    else:
        runs = []
        for a, b, c in itertools.product((0, 1), repeat=3):
            levels = (a, b, c, a ^ b, a ^ c, b ^ c)
            runs.append(tuple(axis[level] for axis, level in zip(axes, levels)))
    return runs + [setting for setting in SCRL_RECIPE if setting not in runs]


def tuning_result(path: str, device: torch.device) -> Path:
    """The tuning result ``--tuned`` names: ``path``, or (``auto``) this device's ``roi_align_tuning``
    JSON in ``$FASTDENSE_BENCH_OUT`` (default ``benchmarks/results``)."""
    if path != "auto":
        return Path(path)
    tuning = "roi_align_tuning" + ("" if device.type == "cuda" else "_quick")
    return Path(os.environ.get("FASTDENSE_BENCH_OUT", RESULTS_DIR)) / f"{tuning}_{slug(device_name(device))}.json"


def apply_tuning(path: Path) -> dict:
    """Sets the kernels' settings to a tuning result's (``tune_roi_align.py``'s ``settings``: only those
    that beat the package's); returns them."""
    import fastdense.kernels.roi_align as kernels

    if not path.is_file():
        raise SystemExit(f"--tuned: no tuning result at {path} (run benchmarks/tune_roi_align.py first, or name its JSON)")
    settings = json.loads(path.read_text())["settings"]
    kernels.apply_settings(settings)
    return settings


def run(args) -> None:
    import fastdense.kernels.roi_align as kernels

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(0)
    extra = {}
    if args.tuned:
        path = tuning_result(args.tuned, device)
        extra.update(tuned_from=path.name, tuned=apply_tuning(path))
        print(f"settings from {path}: {extra['tuned'] or 'none beat the package'}", flush=True)
    # The settings the kernels ran with (the package's, or the package's with a tuning result's).
    extra["settings"] = kernels.current_settings()
    bandwidth = measured_bandwidth(device)
    cases = []
    start_time = time.perf_counter()
    if args.quick:
        for output, dtype, memory in [("1x1-pooled", torch.float32, "nchw"), ("7x7", torch.bfloat16, "channels_last")]:
            cases.append(("scrl", (2, 16, 7, 7), scrl_rois(2, 3, 224, generator), output, -1, False, 1 / 32, dtype, memory))
        cases.append(("detection", (1, 2, 33, 20), detection_rois(1, 3, 132, 80, generator), "7x7", 2, True, 1 / 4, torch.float32, "nchw"))
    else:
        for batch, output, sampling, aligned, dtype, memory in scrl_settings(SCRL_AXES, args.full):
            name = "scrl-recipe" if (batch, output, sampling, aligned, dtype, memory) in SCRL_RECIPE else "scrl"
            cases.append((name, (batch, 2048, 7, 7), scrl_rois(batch, 10, 224, generator), output, sampling, aligned, 1 / 32, dtype, memory))
        axes = SCRL_AXES
        detection_settings = itertools.product(axes[4], axes[5]) if args.full else zip(axes[4], axes[5])
        for dtype, memory in detection_settings:
            cases.append(("detection", (8, 256, 200, 304), detection_rois(8, 512, 800, 1216, generator), "7x7", 2, True, 1 / 4, dtype, memory))

    cases = [case for case in cases if args.only is None or case[0].startswith(args.only)]
    name_of_results = "roi_align" + ("_quick" if args.quick else "_full" if args.full else "")
    print(f"{len(cases)} cases on {device}", flush=True)
    rows = []
    for name, shape, rois, output, sampling, aligned, scale, dtype, memory in cases:
        inputs, next_input, ours, theirs = make_case(shape, rois, output, sampling, aligned, scale, dtype, memory, device, generator)
        x = inputs[0]
        out = ours(x)
        grad = torch.randn(out.shape, generator=generator).to(device=device, dtype=dtype)
        expected = theirs(x)
        fwd_error = relative_error(out, expected)
        bwd_error = relative_error(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])
        check_agreement(f"{name} {shape} {output} sampling={sampling} aligned={aligned} {dtype} {memory}", dtype, fwd_error, bwd_error)
        elt = x.element_size()
        fwd_bytes = x.numel() * elt + out.numel() * elt
        both_bytes = 2 * fwd_bytes
        row = dict(
            case=name, shape="x".join(map(str, shape)), boxes=int(rois.shape[0]), output=output, sampling=sampling, aligned=aligned,
            dtype=str(dtype).replace("torch.", ""), layout=memory, fwd_rel_err=fwd_error, bwd_rel_err=bwd_error,
        )
        for label, nbytes, fn, on in (
            ("fwd", fwd_bytes, lambda f: f(next_input()), lambda f, x: f(x)),
            ("fwdbwd", both_bytes, lambda f: torch.autograd.grad(f(xi := next_input()), xi, grad), lambda f, x: torch.autograd.grad(f(x), x, grad)),
        ):
            ours_ms = time_ms(lambda: fn(ours), device, repeats=args.repeats, warmup=1, gpu_window_ms=GPU_WINDOW_MS)
            theirs_ms = time_ms(lambda: fn(theirs), device, repeats=args.repeats, warmup=1, gpu_window_ms=GPU_WINDOW_MS)
            floor = floor_ms(0.0, nbytes, 0.0, bandwidth)
            # Without the boxes' value check (one host sync per call), as SCRL calls it and as
            # torchvision always runs.
            unchecked_ms = time_ms(lambda: fn(lambda x: ours(x, check_boxes=False)), device, repeats=args.repeats, warmup=1, gpu_window_ms=GPU_WINDOW_MS)
            # GPU time alone (CUDA graphs, both sides): what the kernels reach once the host's
            # per-call work is out of the way (a captured training step, or a large enough batch).
            graph_ours = graph_ms(lambda x: on(lambda t: ours(t, check_boxes=False), x), inputs, device)
            graph_theirs = graph_ms(lambda x: on(theirs, x), inputs, device)
            row.update({
                f"{label}_ms": ours_ms, f"{label}_torchvision_ms": theirs_ms, f"{label}_speedup": theirs_ms / ours_ms,
                f"{label}_floor_ms": floor, f"{label}_bandwidth_fraction": floor / ours_ms if floor > 0 else float("nan"),
                f"{label}_unchecked_ms": unchecked_ms, f"{label}_unchecked_speedup": theirs_ms / unchecked_ms,
                f"{label}_graph_ms": graph_ours, f"{label}_graph_torchvision_ms": graph_theirs, f"{label}_graph_speedup": graph_theirs / graph_ours,
                f"{label}_graph_bandwidth_fraction": floor / graph_ours if floor > 0 else float("nan"),
            })
        rows.append(row)
        del inputs
        print(f"[{time.perf_counter() - start_time:5.0f} s] " + "  ".join(f"{c}={_fmt(row[c])}" for c in COLUMNS), flush=True)
        path = write_results(name_of_results, device, rows, extra={"measured_bandwidth_bytes_per_s": bandwidth, **extra})
    print_table(rows, COLUMNS)
    print(f"wrote {path} ({time.perf_counter() - start_time:.0f} s)", flush=True)


def host_overhead(args) -> None:
    import fastdense.kernels.roi_align as kernels

    gpu = torch.cuda.is_available()
    # On a GPU, few enough calls per round that their launches fit the device's launch queue behind
    # the sleep (a full queue would block the host and time the GPU instead).
    calls, rounds = (20, 3) if args.quick else ((50, 15) if gpu else (200, 15))
    run = HostRun("roi_align_host", kernels, args.quick, calls, rounds)
    if run.stubs:
        # The stubbed box check writes no flags: zero them (one host op) so the checked call passes.
        check = kernels.invalid_box_flags
        kernels.invalid_box_flags = lambda rois, num_images: check(rois, num_images).zero_()
    generator = torch.Generator().manual_seed(0)
    channels = 2048 if gpu else 16
    for batch in (4,) if args.quick else (64, 256):
        x = torch.randn(batch, channels, 7, 7, generator=generator).to(run.device).requires_grad_()
        rois = scrl_rois(batch, 10, 224, generator).to(run.device)
        grad = torch.randn(rois.shape[0], channels, generator=generator).to(run.device)
        for check_boxes in (False, True):
            def forward():
                with ops.backend("triton"):
                    return ops.roi_pool_vectors(x, rois, 1 / 32, check_boxes=check_boxes)

            def forward_backward():
                return torch.autograd.grad(forward(), x, grad)

            # The checked call waits for the GPU inside: it has no enqueue rate.
            row = dict(shape=f"{batch}x{channels}x7x7", boxes=int(rois.shape[0]), check_boxes=check_boxes)
            run.add(row, {"fwd": forward, "fwdbwd": forward_backward}, enqueue=not check_boxes)
    run.write({"grouping": _grouping_times(run.device, generator)} if gpu else None)


# (boxes per image, images): SCRL's 640 and 2560 boxes, then up to 4x past the kernel's limit.
GROUPING_CASES = ((10, 64), (10, 256), (16, 256), (32, 256), (64, 256), (128, 256))


def _grouping_times(device, generator):
    """GPU: device time of grouping the boxes by image with the Triton kernel and with torch.sort,
    over box counts around ``GROUP_KERNEL_MAX_BOXES`` (where the kernel hands over to the sort)."""
    import fastdense.kernels.roi_align as kernels

    if not hasattr(kernels, "GROUP_KERNEL_MAX_BOXES"):
        return []
    results = []
    for per_image, images in GROUPING_CASES:
        rois = scrl_rois(images, per_image, 224, generator)
        rois = rois[torch.randperm(rois.shape[0], generator=generator)].to(device)
        kernel_order, kernel_offsets, _ = kernels.group_by_rank(rois, images)
        sort_order, sort_offsets, _ = kernels.group_by_sort(rois, images)
        assert torch.equal(kernel_order, sort_order) and torch.equal(kernel_offsets, sort_offsets)
        entry = dict(boxes=int(rois.shape[0]), images=images)
        entry["kernel_ms"] = time_ms(lambda: kernels.group_by_rank(rois, images), device, gpu_window_ms=GPU_WINDOW_MS)
        entry["sort_ms"] = time_ms(lambda: kernels.group_by_sort(rois, images), device, gpu_window_ms=GPU_WINDOW_MS)
        print(f"grouping {entry}", flush=True)
        results.append(entry)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=help_description(__doc__))
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few cases (CPU, seconds)")
    parser.add_argument("--full", action="store_true", help="GPU: every combination of the SCRL axes (64 rows) and 4 detection rows")
    parser.add_argument("--only", choices=("scrl", "scrl-recipe", "detection"), help="run one family of shapes (scrl: the recipe's rows too)")
    parser.add_argument("--repeats", type=int, default=3, help="CPU timing repeats (GPU uses do_bench)")
    parser.add_argument("--host", action="store_true", help="host time per call at the SCRL pooled case (see the module docstring); --quick: B=4")
    parser.add_argument("--tuned", nargs="?", const="auto", metavar="JSON",
                        help="first apply a tune_roi_align.py result's settings (default: this device's in $FASTDENSE_BENCH_OUT); recorded in the JSON")
    args = parser.parse_args()
    host_overhead(args) if args.host else run(args)


if __name__ == "__main__":
    main()
