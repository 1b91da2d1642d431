"""Where SCRL's pooled RoIAlign spends its GPU time, and which launch configuration is fastest.

At SCRL's shape (``[256, 2048, 7, 7]``, 10 boxes per image, 1x1 output) a forward is two launches
(the plan: the boxes grouped by image and each box's bilinear weights; the pooling product) and a
backward one.
For float32 and bfloat16, NCHW and channels_last, this script times each launch alone, replayed
from a CUDA graph (GPU time, no host work), beside the memory floor of the two pooling kernels
(their bytes over the measured copy bandwidth). Then, on the two cases SCRL's call takes (float32,
NCHW and channels_last: ``bench_roi_align.py``'s ``scrl-recipe`` rows, where the issue's targets are
measured), it sweeps the pooling kernels' ``BLOCK_C``, ``num_warps``, ``num_stages``,
``CHANNEL_BLOCKS`` (channel blocks a program takes in turn) and the forward's ``CHUNK`` (pixels a
step of its pipelined product; the whole map with several channel blocks, whose loop is then the one
pipelined), each configuration on both cases before the next, in order of promise (so that a run cut
short by ``--budget-s`` has tried the likeliest on both); then the plan kernel's ``BLOCK``, ``SCAN``,
``LOADS`` and ``num_warps``; last, the detection shape's large-map backward (``[8, 256, 200, 304]``,
512 boxes, 7x7) over ``BLOCK_C``, its tile and ``num_warps`` (``detection_backward``).
Every configuration's output is checked against the package's before it is timed (a configuration
that differs, or does not compile, is listed with its error, not timed).

Nothing here changes the package. The result's ``settings`` are the fastest configuration of each
kernel by its total time over the cases swept (where that beats the package's), written as
:data:`fastdense.kernels.roi_align.TUNED_SETTINGS` values: ``bench_roi_align.py --tuned`` times them
(``kernels.apply_settings``), and they go into the module by hand, with their figures.

    PYTHONPATH=. python3 benchmarks/tune_roi_align.py                 # GPU (a few minutes: about 150 compilations)
    PYTHONPATH=. python3 benchmarks/tune_roi_align.py --budget-s 300  # GPU, what fits in 300 s
    PYTHONPATH=. python3 benchmarks/tune_roi_align.py --quick         # CPU, Triton's interpreter, tiny shapes, seconds

Writes ``benchmarks/results/roi_align_tuning_{device}.json`` (``_quick`` for --quick).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_roi_align import detection_rois, graph_ms, scrl_rois  # noqa: E402
from benchmarks.common import _fmt, help_description, measured_bandwidth, print_table, rotation_copies, write_results  # noqa: E402
from fastdense.kernels import roi_align as kernels  # noqa: E402

SPATIAL_SCALE = 1 / 32
BLOCK_CS = (16, 32, 64, 128)
NUM_WARPS = (2, 4, 8)
# The plan kernel's boxes per program, scan width and key loads in flight (num_warps 4 and 8),
# where its BLOCK x SCAN counters take at most GROUP_MAX_COUNTERS registers a thread.
GROUP_BLOCKS = (16, 32, 64)
GROUP_SCANS = (128, 256)
GROUP_LOADS = (1, 4, 8)
GROUP_MAX_COUNTERS = 64
# Each configuration compiles anew for every dtype and layout (Triton specialises unit strides), so
# the sweep runs on the two cases the targets are measured on (SCRL's call: float32, both
# layouts); the breakdown covers all four.
SWEPT = ((torch.float32, "channels_last"), (torch.float32, "nchw"))
# The backward's box loop runs once at 10 boxes an image, so software pipelining has nothing to
# overlap there, yet costs shared memory; the forward's pixel loop (CHUNK pixels a step) is what its
# pipelining overlaps. One stage is tried beside Triton's default (--stages: 1, 2 and 3).
NUM_STAGES = (1, None)
# The forward's pixels a step, each with two to four stages, at the package's channel block and warps.
CHUNKS = (16, 32, 64)
CHUNK_STAGES = (2, 3, 4)
# Channel blocks far from their warp count's sweet spot (a tile thinner than the threads, or many
# registers a thread) are left out: (BLOCK_C, num_warps).
SKIPPED = ((16, 8), (128, 2))
# Programs that take several channel blocks in turn (CHANNEL_BLOCKS, their boxes' weights loaded
# once, the blocks' loads pipelined), with Triton's default stages: (BLOCK_C, num_warps). Tried
# first: more bytes a program and the weights read once for several blocks.
STREAMING = ((64, 4), (128, 8), (32, 4), (256, 8))
CHANNEL_BLOCKS = (4, 16)
# The whole map a product (CHUNK = its padded pixels) with several channel blocks a program: the
# pixel loop folds away and Triton pipelines the channel-block loop instead, the next blocks' map
# loads in flight during this block's product (compiled for sm_90, three stages keep two blocks in
# flight; two keep none). (CHANNEL_BLOCKS, num_stages), at the package's channel block and warps.
PIPELINED_BLOCKS = ((2, 3), (4, 3), (4, 4), (16, 3), (16, 4))


# Shares of --budget-s: the pooling kernels' sweep (SCRL's targets), then the plan kernel's, then the
# detection backward's; what one family leaves unspent passes to the next.
BUDGET_SHARES = (("pooled", 0.7), ("grouping", 0.85), ("detection", 1.0))
# The detection shape's backward (a large map: tiles of LARGE_TILE pixels, each visiting only the bins
# that reach it, a rank-1 update each): each program waits on one round of loads per box and per bin,
# whatever its channel block, so wider channel blocks and larger tiles mean fewer such waits in all.
# (BLOCK_C, TILE_H, TILE_W, num_warps), besides the package's (16, 8, 16, 4): of the 4 x 4 x 2
# combinations up to 16384 accumulators, those that compile for sm_90 (triton 3.6) without spilling in
# float32, the fewest registers for each channel block and tile size.
DETECTION_BACKWARD = [(16, 16, 16, 8), (16, 8, 32, 4), (16, 8, 32, 8), (16, 16, 32, 8), (32, 8, 16, 4), (32, 16, 16, 8), (32, 8, 32, 8),
                      (64, 8, 16, 4), (64, 16, 16, 8), (128, 8, 16, 4)]


class PooledCase:
    """One dtype and layout at one shape: inputs, the package's plan, and launchers of the two pooling
    kernels that take a configuration (``BLOCK_C``, ``num_warps``, ``num_stages``, ``CHANNEL_BLOCKS``,
    the forward's ``CHUNK``; None: the package's)."""

    def __init__(self, shape, per_image, dtype, layout, device, generator):
        self.shape, self.dtype, self.layout, self.device = shape, dtype, layout, device
        num, channels, height, width = shape
        memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        nbytes = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
        self.inputs = [torch.randn(shape, generator=generator).to(device=device, dtype=dtype).contiguous(memory_format=memory_format)
                       for _ in range(rotation_copies(nbytes, device))]
        self.rois = scrl_rois(num, per_image, 224, generator).to(device)
        self.grad = torch.randn(self.rois.shape[0], channels, 1, 1, generator=generator).to(device=device, dtype=dtype)
        self.pooled = kernels.PooledMap(height, width, SPATIAL_SCALE, -1, False)
        self.order, self.offsets, self.weights = kernels.group_by_image(self.rois, num, self.pooled)
        self.package = {which: kernels._pooled_config(channels, height, width, which == "backward", dtype) for which in ("forward", "backward")}
        # bytes the pooling kernels must move: the map read (forward) or written (backward), plus the
        # pooled values written or read; weights and indices are L2-resident and small beside them.
        self.forward_bytes = nbytes + self.rois.shape[0] * channels * self.inputs[0].element_size()
        self.backward_bytes = self.forward_bytes

    def forward(self, x, block_c=None, num_warps=None, num_stages=None, channel_blocks=None, chunk=None, precision=None):
        num, channels, height, width = self.shape
        grid, constexprs, options = self._launch("forward", block_c, num_warps, num_stages, channel_blocks, precision)
        if chunk is not None:
            constexprs["CHUNK"] = kernels.pooled_forward_chunk(height, width, chunk)
        out = torch.empty(self.rois.shape[0], channels, 1, 1, dtype=x.dtype, device=x.device)
        kernels._pooled_forward_kernel[grid](x, self.order, self.offsets, self.weights, out, channels, height, width, *x.stride(), **constexprs, **options)
        return out

    def backward(self, x, block_c=None, num_warps=None, num_stages=None, channel_blocks=None, chunk=None, precision=None):
        assert chunk is None, "CHUNK is the forward's"
        num, channels, height, width = self.shape
        grid, constexprs, options = self._launch("backward", block_c, num_warps, num_stages, channel_blocks, precision)
        grad_input = torch.empty_like(x)
        kernels._pooled_backward_kernel[grid](self.grad, self.order, self.offsets, self.weights, grad_input, channels, height, width,
                                             *grad_input.stride(), **constexprs, **options)
        return grad_input

    def _launch(self, which, block_c, num_warps, num_stages, channel_blocks, precision=None):
        """``(grid, constexprs, launch options)``: the package's, with whichever of the five is given
        instead (``precision``: float32's product; 16-bit values take one TF32 product whatever it is)."""
        _, package_constexprs, package_options = self.package[which]
        given = {"BLOCK_C": block_c, "CHANNEL_BLOCKS": channel_blocks, "PRODUCT": precision if self.dtype == torch.float32 else None}
        constexprs = dict(package_constexprs, **{k: v for k, v in given.items() if v is not None})
        # as the package does: no channel block wholly past the channels
        constexprs["CHANNEL_BLOCKS"] = max(1, min(constexprs["CHANNEL_BLOCKS"], kernels.cdiv(self.shape[1], constexprs["BLOCK_C"])))
        grid = (self.shape[0], kernels.cdiv(self.shape[1], constexprs["BLOCK_C"] * constexprs["CHANNEL_BLOCKS"]))
        options = dict(package_options, **{k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None})
        return grid, constexprs, options


class DetectionBackward:
    """The large-map backward at one dtype and layout (``bench_roi_align.py``'s detection rows: 7x7
    output, two samples a side, aligned), launched with the package's configuration or another
    (``BLOCK_C``, ``TILE_H``, ``TILE_W``, ``num_warps``)."""

    def __init__(self, shape, boxes, image_size, dtype, layout, device, generator):
        self.shape, self.dtype, self.layout, self.device = shape, dtype, layout, device
        num, channels, height, width = shape
        memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        self.x = torch.empty(shape, dtype=dtype, device=device).contiguous(memory_format=memory_format)
        self.rois = detection_rois(num, boxes, image_size[0], image_size[1], generator).to(device)
        self.scale = height / image_size[0]
        self.order, self.offsets, _ = kernels.group_by_image(self.rois, num)
        self.grads = [torch.randn(boxes, channels, 7, 7, generator=generator).to(device=device, dtype=dtype)
                      for _ in range(rotation_copies(boxes * channels * 49 * self.x.element_size(), device))]
        _, _, _, self.constexprs = kernels._backward_config(channels, height, width, 7, 7, dtype, 2, True)
        assert self.constexprs["PER_BIN"], "a large map takes the per-bin backward"
        self.bytes = self.x.numel() * self.x.element_size() + self.grads[0].numel() * self.grads[0].element_size()

    def __call__(self, grad, block_c=None, tile_h=None, tile_w=None, num_warps=None):
        num, channels, height, width = self.shape
        given = {"BLOCK_C": block_c, "TILE_H": tile_h, "TILE_W": tile_w}
        constexprs = dict(self.constexprs, **{k: v for k, v in given.items() if v is not None})
        tiles_w = kernels.cdiv(width, constexprs["TILE_W"])
        grid = (num, kernels.cdiv(channels, constexprs["BLOCK_C"]), kernels.cdiv(height, constexprs["TILE_H"]) * tiles_w)
        grad_input = torch.empty_like(self.x)
        options = dict(kernels.LARGE_TILE_LAUNCH, **({"num_warps": num_warps} if num_warps else {}))
        kernels._image_backward_kernel[grid](grad, self.rois, self.order, self.offsets, grad_input, channels, height, width, *grad_input.stride(),
                                             self.scale, tiles_w, **constexprs, **options)
        return grad_input


def sweep_detection_backward(case: DetectionBackward, configs, repeats: int = 3):
    """``[(config, ms or None, error text or None)]``; every configuration must give the package's
    gradient exactly (tiles and channel blocks change who sums, not the order of any pixel's sum)."""
    expected = case(case.grads[0])
    results = []
    for block_c, tile_h, tile_w, num_warps in configs:
        config = {"BLOCK_C": block_c, "TILE_H": tile_h, "TILE_W": tile_w, "num_warps": num_warps}
        fn = lambda g, c=config: case(g, c["BLOCK_C"], c["TILE_H"], c["TILE_W"], c["num_warps"])  # noqa: E731
        same = lambda got: None if torch.equal(got, expected) else "differs from the package's gradient"  # noqa: E731
        results.append(checked_then_timed(config, lambda: fn(case.grads[0]), same, lambda: gpu_ms(fn, case.grads, case.device, repeats)))
    return results


def gpu_ms(fn, inputs, device, repeats: int = 3) -> float:
    """GPU milliseconds per call (CUDA graph replay on a GPU; on a CPU the interpreter's wall time)."""
    if device.type == "cuda":
        return graph_ms(fn, inputs, device)
    start = time.perf_counter()
    for _ in range(repeats):
        for x in inputs:
            fn(x)
    return (time.perf_counter() - start) * 1e3 / (repeats * len(inputs))


def relative_error(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def breakdown(case: PooledCase, bandwidth: float) -> dict:
    """GPU time of each launch of a forward and a backward, with the package's configuration."""
    num = case.shape[0]
    row = {
        "plan_ms": gpu_ms(lambda x: kernels.group_by_image(case.rois, num, case.pooled), case.inputs[:1], case.device),
        "forward_ms": gpu_ms(case.forward, case.inputs, case.device),
        "backward_ms": gpu_ms(case.backward, case.inputs, case.device),
    }
    row["forward_floor_ms"] = case.forward_bytes / bandwidth * 1e3
    row["backward_floor_ms"] = case.backward_bytes / bandwidth * 1e3
    row["forward_bandwidth_fraction"] = row["forward_floor_ms"] / row["forward_ms"]
    row["backward_bandwidth_fraction"] = row["backward_floor_ms"] / row["backward_ms"]
    return row


def pooled_configs(whole_map: int, stages) -> list:
    """``[(which, config)]`` in the order tried, ``config`` a dict of ``BLOCK_C``, ``num_warps``,
    ``num_stages``, ``CHANNEL_BLOCKS``, ``CHUNK`` and ``PRECISION`` (float32's product; None: the
    package's): the package's with CUDA-core products, programs that stream several channel blocks
    (both products), the whole map a product with pipelined channel blocks (forward), each channel
    block and warp count at the default stages (both products), the forward's chunks, then the other
    stages."""
    def config(block_c, num_warps, num_stages, channel_blocks, chunk, precision=None):
        return {"BLOCK_C": block_c, "num_warps": num_warps, "num_stages": num_stages, "CHANNEL_BLOCKS": channel_blocks, "CHUNK": chunk,
                "PRECISION": precision}

    def plain(stage_list, precision=None):
        return [config(block_c, warps, stage, None, None, precision)
                for stage, block_c, warps in itertools.product(stage_list, sorted(BLOCK_CS, reverse=True), NUM_WARPS) if (block_c, warps) not in SKIPPED]

    def streaming(precision=None):
        return [config(block_c, warps, None, blocks, None, precision) for blocks, (block_c, warps) in itertools.product(CHANNEL_BLOCKS, STREAMING)]

    default_stages, other_stages = [st for st in stages if st is None], [st for st in stages if st is not None]
    ordered = ([config(None, None, None, None, None, "ieee")] + streaming() + streaming("ieee")
               + [config(None, None, stage, blocks, whole_map) for blocks, stage in PIPELINED_BLOCKS]
               + plain(default_stages) + plain(default_stages, "ieee")
               + [config(None, None, stage, None, chunk) for chunk, stage in itertools.product(CHUNKS, CHUNK_STAGES)]
               + plain(other_stages))
    return [(which, c) for c in ordered for which in ("forward", "backward") if which == "forward" or c["CHUNK"] is None]


def sweep_pooled(cases, configs, tolerances):
    """``{(case index, which): [(config, ms or None, error text or None)]}``: each configuration of
    ``configs`` (:func:`pooled_configs`) on every case before the next, checked against the package's
    output to the case's tolerance (the products' sums agree to rounding)."""
    results = {}
    expected = {(i, which): getattr(case, which)(case.inputs[0]) for i, case in enumerate(cases) for which in ("forward", "backward")}
    for which, config in configs:
        for i, case in enumerate(cases):
            launch = getattr(case, which)
            fn = lambda x, c=config, launch=launch: launch(x, c["BLOCK_C"], c["num_warps"], c["num_stages"], c["CHANNEL_BLOCKS"], c["CHUNK"],  # noqa: E731
                                                           c.get("PRECISION"))

            def problem(out, want=expected[i, which], tolerance=tolerances[i]):
                error = relative_error(out, want)
                return None if error <= tolerance else f"differs from the package's configuration (relative error {error:.3g})"

            results.setdefault((i, which), []).append(
                checked_then_timed(config, lambda fn=fn, case=case: fn(case.inputs[0]), problem, lambda fn=fn, case=case: gpu_ms(fn, case.inputs, case.device)))
    return results


# A configuration becomes a setting only if it beats the package's by more than timing noise.
MARGIN = 0.98


def fastest(sweeps, package_ms: float):
    """``(config, total ms)`` of the configuration with the least total time over ``sweeps`` (lists of
    ``(config, ms, error)`` over the same configurations, one a case), among those timed in all;
    None where none takes less than ``MARGIN`` times ``package_ms``, the package's own total."""
    totals = [(entries[0][0], sum(ms for _, ms, _ in entries)) for entries in zip(*sweeps) if all(ms is not None for _, ms, _ in entries)]
    best = min(totals, key=lambda item: item[1], default=None)
    return best if best is not None and best[1] < MARGIN * package_ms else None


def pooled_settings(which: str, config: dict, case: "PooledCase") -> dict:
    """``config`` (None: the package's) as :data:`~fastdense.kernels.roi_align.TUNED_SETTINGS` values of the ``which`` pass."""
    _, constexprs, options = case.package[which]
    prefix = f"POOLED_{which.upper()}"
    settings = {f"{prefix}_BLOCK_C": config["BLOCK_C"] or constexprs["BLOCK_C"],
                f"{prefix}_CHANNEL_BLOCKS": config["CHANNEL_BLOCKS"] or constexprs["CHANNEL_BLOCKS"],
                f"{prefix}_PRECISION": config.get("PRECISION") or getattr(kernels, f"{prefix}_PRECISION"),
                f"{prefix}_LAUNCH": dict(options, **{k: config[k] for k in ("num_warps", "num_stages") if config[k] is not None})}
    if which == "forward":
        settings["POOLED_CHUNK"] = config["CHUNK"] or constexprs["CHUNK"]
    return settings


# time.monotonic() after which configurations are listed untried (--budget-s), so that a run cut
# short by its step's limit still writes what it measured.
DEADLINE = None


def checked_then_timed(config: dict, run, problem, timing):
    """``(config, ms or None, error text or None)``: ``run()`` once, and ``timing()`` only when it neither
    raised (out of shared memory or registers: that configuration does not exist) nor gave what
    ``problem(result)`` objects to (a text; None when the result is the package's)."""
    if DEADLINE is not None and time.monotonic() > DEADLINE:
        return config, None, "not tried: the run's time budget (--budget-s) was spent"
    try:
        result = run()
    except Exception as failure:
        return config, None, f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
    objection = problem(result)
    if objection is not None:
        return config, None, objection
    return config, timing(), None


def sweep_grouping(rois: torch.Tensor, num_images: int, pooled, configs, device):
    """``[(config, ms or None, error text or None)]`` of the plan kernel (grouping and pooled weights)
    over ``configs`` (``BLOCK``, ``SCAN``, ``LOADS``, ``num_warps``), each checked to give the package's order,
    offsets and weights."""
    expected = kernels.group_by_rank(rois, num_images, pooled)
    results = []
    for block, scan, loads, num_warps in configs:
        config = {"BLOCK": block, "SCAN": scan, "LOADS": loads, "num_warps": num_warps}
        fn = lambda x, c=config: kernels.group_by_rank(rois, num_images, pooled, block=c["BLOCK"], scan=c["SCAN"], loads=c["LOADS"],  # noqa: E731
                                                       num_warps=c["num_warps"])
        same = lambda got: None if all(torch.equal(g, w) for g, w in zip(got, expected)) else "differs from the package's order, offsets or weights"  # noqa: E731
        results.append(checked_then_timed(config, lambda: fn(None), same, lambda: gpu_ms(fn, [None], device)))
    return results


def set_deadline(budget_s, family: str, started: float) -> None:
    """Where ``--budget-s`` is given, the time after which ``family``'s configurations are listed untried."""
    global DEADLINE
    DEADLINE = started + budget_s * dict(BUDGET_SHARES)[family] if budget_s else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=help_description(__doc__))
    parser.add_argument("--quick", action="store_true", help="CPU: tiny shapes, two configurations per kernel (checks the script)")
    parser.add_argument("--stages", action="store_true", help="sweep num_stages (1, 2, 3) too")
    parser.add_argument("--budget-s", type=float, help="spend about this many seconds (shared out as BUDGET_SHARES), then list what is left untried")
    args = parser.parse_args(argv)
    started = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.quick:
        parser.error("needs a GPU (use --quick on a CPU)")
    generator = torch.Generator().manual_seed(0)
    shape, per_image = ((4, 32, 7, 7), 3) if args.quick else ((256, 2048, 7, 7), 10)
    whole_map = kernels.pooled_forward_chunk(*shape[2:], chunk=shape[2] * shape[3] * 4)  # the padded map's pixels
    if args.quick:
        quick = [{"BLOCK_C": 32, "num_warps": 4, "num_stages": 1, "CHANNEL_BLOCKS": None, "CHUNK": None, "PRECISION": None},
                 {"BLOCK_C": 16, "num_warps": 2, "num_stages": 2, "CHANNEL_BLOCKS": 2, "CHUNK": None, "PRECISION": "ieee"},
                 {"BLOCK_C": None, "num_warps": None, "num_stages": 2, "CHANNEL_BLOCKS": None, "CHUNK": 16, "PRECISION": None},
                 {"BLOCK_C": None, "num_warps": None, "num_stages": 3, "CHANNEL_BLOCKS": 2, "CHUNK": whole_map, "PRECISION": None}]
        configs = [(which, c) for c in quick for which in ("forward", "backward") if which == "forward" or c["CHUNK"] is None]
    else:
        configs = pooled_configs(whole_map, (1, 2, 3) if args.stages else NUM_STAGES)
    bandwidth = measured_bandwidth(device) if device.type == "cuda" else float("nan")
    group_configs = [(32, 128, 4, 4), (16, 256, 1, 8)] if args.quick else [
        (block, scan, loads, warps) for block, scan, loads, warps in itertools.product(GROUP_BLOCKS, GROUP_SCANS, GROUP_LOADS, NUM_WARPS[1:])
        if block * scan <= GROUP_MAX_COUNTERS * 32 * warps]
    rows, extra = [], {"measured_bandwidth_bytes_per_s": bandwidth, "package_settings": kernels.current_settings()}
    cases = []
    for dtype, layout in itertools.product((torch.float32, torch.bfloat16), ("nchw", "channels_last")):
        case = PooledCase(shape, per_image, dtype, layout, device, generator)
        row = {"shape": "x".join(map(str, shape)), "boxes": int(case.rois.shape[0]), "dtype": str(dtype).removeprefix("torch."), "layout": layout}
        row.update(breakdown(case, bandwidth))
        row["forward_package"] = {k: case.package["forward"][1][k] for k in ("BLOCK_C", "CHANNEL_BLOCKS", "CHUNK")}
        row["backward_package"] = {k: case.package["backward"][1][k] for k in ("BLOCK_C", "CHANNEL_BLOCKS")}
        rows.append(row)
        cases.append(case)
        print("  ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
    swept = [i for i, case in enumerate(cases) if (case.dtype, case.layout) in SWEPT or args.quick]
    set_deadline(args.budget_s, "pooled", started)
    results = sweep_pooled([cases[i] for i in swept], configs, [1e-5 if cases[i].dtype == torch.float32 else 1e-2 for i in swept])
    settings = {}
    for which in ("forward", "backward"):
        sweeps = [results[k, which] for k in range(len(swept))]
        for i, sweep in zip(swept, sweeps):
            timed = [(config, ms) for config, ms, error in sweep if ms is not None]
            best_config, best_ms = min(timed, key=lambda item: item[1]) if timed else (None, float("nan"))
            rows[i].update({f"{which}_best": best_config, f"{which}_best_ms": best_ms, f"{which}_best_speedup": rows[i][f"{which}_ms"] / best_ms,
                            f"{which}_sweep": [dict(config, ms=ms, error=error) for config, ms, error in sweep]})
        package_total = sum(rows[i][f"{which}_ms"] for i in swept)
        best = fastest(sweeps, package_total)
        extra[f"{which}_fastest_over_swept"] = None if best is None else dict(best[0], total_ms=best[1], package_total_ms=package_total)
        if best is not None:
            settings.update(pooled_settings(which, best[0], cases[swept[0]]))
    print_table(rows, ["dtype", "layout", "plan_ms", "forward_ms", "forward_bandwidth_fraction", "forward_best_ms",
                       "backward_ms", "backward_bandwidth_fraction", "backward_best_ms"])
    path = write_results("roi_align_tuning" + ("_quick" if args.quick else ""), device, rows, extra=dict(extra, settings=settings))

    # Grouping depends on the boxes alone.
    set_deadline(args.budget_s, "grouping", started)
    grouping = sweep_grouping(cases[0].rois, shape[0], cases[0].pooled, group_configs, device)
    extra["grouping_package"] = {"BLOCK": kernels.GROUP_BLOCK, "SCAN": kernels.GROUP_SCAN, "LOADS": kernels.GROUP_LOADS, "num_warps": kernels.GROUP_WARPS,
                                 "ms": rows[0]["plan_ms"]}
    timed = [(config, ms) for config, ms, error in grouping if ms is not None]
    extra["grouping_best"] = dict(min(timed, key=lambda item: item[1])[0], ms=min(ms for _, ms in timed)) if timed else None
    extra["grouping_sweep"] = [dict(config, ms=ms, error=error) for config, ms, error in grouping]
    best = fastest([grouping], rows[0]["plan_ms"])
    if best is not None:
        settings.update(GROUP_BLOCK=best[0]["BLOCK"], GROUP_SCAN=best[0]["SCAN"], GROUP_LOADS=best[0]["LOADS"], GROUP_WARPS=best[0]["num_warps"])
    print(f"grouping: package {extra['grouping_package']}, best {extra['grouping_best']}", flush=True)
    path = write_results("roi_align_tuning" + ("_quick" if args.quick else ""), device, rows, extra=dict(extra, settings=settings))

    set_deadline(args.budget_s, "detection", started)
    detection_shape, detection_boxes, image_size = ((1, 2, 24, 40), 2, (96, 160)) if args.quick else ((8, 256, 200, 304), 512, (800, 1216))
    detection_configs, repeats = ([(16, 16, 16, 8)], 1) if args.quick else (DETECTION_BACKWARD, 3)
    extra["detection_backward"], detection_sweeps, detection_package_ms = [], [], 0.0
    for dtype, layout in ((torch.float32, "nchw"), (torch.bfloat16, "channels_last")):
        case = DetectionBackward(detection_shape, detection_boxes, image_size, dtype, layout, device, generator)
        package_ms = gpu_ms(case, case.grads, device, repeats)
        results = sweep_detection_backward(case, detection_configs, repeats)
        detection_sweeps.append(results)
        detection_package_ms += package_ms
        timed = [(config, ms) for config, ms, error in results if ms is not None]
        best_config, best_ms = min(timed, key=lambda item: item[1]) if timed else (None, float("nan"))
        entry = {"shape": "x".join(map(str, detection_shape)), "boxes": detection_boxes, "dtype": str(dtype).removeprefix("torch."), "layout": layout,
                 "package": {k: case.constexprs[k] for k in ("BLOCK_C", "TILE_H", "TILE_W")}, "package_ms": package_ms,
                 "floor_ms": case.bytes / bandwidth * 1e3, "best": best_config, "best_ms": best_ms, "best_speedup": package_ms / best_ms,
                 "sweep": [dict(config, ms=ms, error=error) for config, ms, error in results]}
        extra["detection_backward"].append(entry)
        print("detection backward  " + "  ".join(f"{k}={_fmt(v)}" for k, v in entry.items() if k != "sweep"), flush=True)
    best = fastest(detection_sweeps, detection_package_ms)
    if best is not None:
        settings.update(LARGE_TILE=(best[0]["TILE_H"], best[0]["TILE_W"]), LARGE_TILE_CHANNELS=best[0]["BLOCK_C"],
                        LARGE_TILE_LAUNCH={"num_warps": best[0]["num_warps"]})
    path = write_results("roi_align_tuning" + ("_quick" if args.quick else ""), device, rows, extra=dict(extra, settings=settings))
    print("settings (each beats the package's over the cases swept; `bench_roi_align.py --tuned` times them):")
    for name, value in settings.items():
        print(f"    {name} = {value!r}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
