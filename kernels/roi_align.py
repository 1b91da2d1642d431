"""RoIAlign forward and deterministic backward in Triton, with ``torchvision.ops.roi_align`` semantics.

Bilinear sampling is separable: the samples of output bin ``(ph, pw)`` of box ``k`` give input pixel
``(h, w)`` the weight ``a_y[ph, h] * a_x[pw, w] / count`` (``a_y``, ``a_x``: summed bilinear weights of
the bin's sample rows and columns). Five kernels do the pooling:

- ``_pooled_forward_kernel`` and ``_pooled_backward_kernel`` (SCRL's case: a 1x1 output, ``[K, C]``,
  from a map one program holds whole, such as ``[B, 2048, 7, 7]``): one program per (image,
  ``POOLED_*_CHANNEL_BLOCKS`` channel blocks) multiplies the image's map with its boxes' precomputed
  weights, ``POOLED_BOX_BLOCK`` boxes a tensor-core product (:func:`_pooled_product`;
  ``[channels, pixels] x [pixels, boxes]`` forward, ``[channels, boxes] x [boxes, pixels]``
  backward), instead of rebuilding each box's bilinear weights in every channel block or waiting
  on one chain of dependent loads per box. An image's first block of boxes comes from the plan's
  head rows, whose addresses need no offset, so a program's loads do not wait on one another; the
  forward sums over the pixels ``POOLED_CHUNK`` at a time, a loop Triton software-pipelines, so
  its map and weights are in flight together.
- ``_image_forward_kernel`` (other outputs from maps up to ``MAX_TILE`` pixels): one program per
  (image, channel block) holds the whole map of its channels in registers, reads it once, and
  reduces it against every box of that image, every bin of a box in one tl.dot.
- ``_box_forward_kernel`` (larger maps): one program per (box, channel block) gathers the four
  corners of each sample, vectorised over channels and output bins.
- ``_image_backward_kernel`` (other outputs, every map size): one program per (image, channel block,
  spatial tile) loops over that image's boxes and accumulates their gradients into its tile in
  registers, then writes the tile once. Whole small maps take every bin of a box in one tl.dot;
  tiles of large maps test ``SCAN_BOXES`` boxes at a time for overlap and visit only those that
  reach them, and of those only the bins that do, one rank-1 update each.

No backward uses atomics and each sums in a fixed order, so gradients are bit-identical run after
run; ``grad_input`` needs no zero-fill.

The forward also makes a plan that :func:`roi_align_forward` returns and :func:`roi_align_backward`
takes, so the backward recomputes none of it:

- ``order``, ``offsets``: the boxes grouped by image, which both per-image kernels need.
  ``_group_kernel`` computes them in one launch (each box's rank among the boxes ordered by
  (image, position); O(K^2) compares, cheap up to ``GROUP_KERNEL_MAX_BOXES``; torch.sort above).
- ``weights``: for a 1x1 output from a whole map (SCRL's case), each box's weight per pixel, in
  grouped order, and also (with the box indices in ``order``) in ``POOLED_BOX_BLOCK`` head rows per
  image (:func:`pooled_weights`). ``_group_kernel`` writes them too, so SCRL's forward is two
  launches (plan, pooling); above the limit ``_pooled_weights_kernel`` does, after the sort.

``_box_check_kernel`` checks the boxes' values for ``fastdense.ops.roi_align(check_boxes=True)`` in one
launch, where the same checks in PyTorch took a dozen (each a launch and host work on a GPU); the
flags it writes are read back once, the check's one host sync.

Input is addressed through its strides, so NCHW and channels_last are both read in place. Coordinates,
weights and sums are float32 whatever the input dtype (float16, bfloat16, float32).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from fastdense.kernels._launch import cdiv, next_power_of_2, triton_interpreted
from fastdense.kernels._tf32 import round_to_tf32

# Largest padded map (pixels) that one program keeps whole in registers (the pooled kernels, the
# image forward, the backward's whole-map branch). At 32x32, compiled for sm_90, the float32 pooled
# forward wanted 320 KiB of shared memory (an H100 gives a program 227 KiB: it could not launch) and
# every whole-map kernel spilled 1-23 KB of registers a thread (benchmarks.sm90's compile of their
# launches at 32x32 with a limit of 1024); maps past 16x16 take the box-wise forward and the tiled
# backward. The sm_90 compile test checks the kernels at this limit.
MAX_TILE = 256
# Spatial tile of the backward on larger maps: small, so each tile meets few bins of few boxes.
LARGE_TILE = (8, 16)
# Its channel block (None: _blocks' choice, 2048 values a program) and launch options (num_warps):
# benchmarks/tune_roi_align.py sweeps the three at the detection shape.
LARGE_TILE_CHANNELS = None
LARGE_TILE_LAUNCH: dict = {}
# Grouping boxes by image: up to this many boxes one launch ranks them by all-pairs comparison.
# K^2 compares over K / GROUP_BLOCK programs, one int32 compare a pair: SCRL's 2560 boxes are 6.6 M
# (on sm_90 a thread's scan of all 2560 keys is 5 trips of 447 instructions, 837 with the pooled
# plan's second count, each waiting on one round of GROUP_LOADS loads); at the limit 67 M, about what torch.sort's 3-4 launches plus
# searchsorted take, and quadratic beyond it, so above it the sort serves. `bench_roi_align.py
# --host` times both on a GPU around this limit (an estimate until then).
GROUP_KERNEL_MAX_BOXES = 8192
GROUP_BLOCK = 32
GROUP_SCAN = 128
# Blocks of GROUP_SCAN keys a grouping program reads before comparing any (loads in flight at once).
GROUP_LOADS = 4
GROUP_WARPS = 4
# Boxes per program of the pooled weights' own launch (above GROUP_KERNEL_MAX_BOXES).
POOLED_WEIGHT_BOXES = 32
# Boxes per product in the pooled (1x1) form: SCRL's 10 boxes per image take one.
POOLED_BOX_BLOCK = 16
# The pooled kernels' settings, each pass its own: the channel block (None: _blocks' choice, about
# 2048 map values a program), the channel blocks one program takes in turn (its boxes' weights loaded
# once for all of them), the forward's pixels a step of its product (its K loop, software-pipelined;
# at most the padded map's) and the launch options (num_warps, num_stages). These are _blocks' rule
# and Triton's defaults until a GPU run of benchmarks/tune_roi_align.py, which sweeps them all and
# prints its fastest as these lines (TUNED_SETTINGS), shows others to be faster.
POOLED_FORWARD_BLOCK_C = None
POOLED_BACKWARD_BLOCK_C = None
POOLED_FORWARD_CHANNEL_BLOCKS = 1
POOLED_BACKWARD_CHANNEL_BLOCKS = 1
POOLED_CHUNK = 32
POOLED_FORWARD_LAUNCH: dict = {}
POOLED_BACKWARD_LAUNCH: dict = {}
# The pooled products' precision for float32 values (:func:`_pooled_product`): "tf32x3" (tensor
# cores) or "ieee" (CUDA cores, exact; compiled for sm_90 it takes 64 registers a thread where tf32x3
# takes 116, so twice the programs an SM). 16-bit values take one TF32 product either way.
POOLED_FORWARD_PRECISION = "tf32x3"
POOLED_BACKWARD_PRECISION = "tf32x3"
FLOAT32_PRODUCTS = ("tf32x3", "ieee")
# Boxes a backward tile of a large map tests for overlap at once (vector loads) before visiting those
# that reach it.
SCAN_BOXES = 16
# The module's settings that benchmarks/tune_roi_align.py sweeps on a GPU and can set (apply_settings).
TUNED_SETTINGS = (
    "POOLED_FORWARD_BLOCK_C", "POOLED_BACKWARD_BLOCK_C", "POOLED_FORWARD_CHANNEL_BLOCKS", "POOLED_BACKWARD_CHANNEL_BLOCKS", "POOLED_CHUNK",
    "POOLED_FORWARD_LAUNCH", "POOLED_BACKWARD_LAUNCH", "POOLED_FORWARD_PRECISION", "POOLED_BACKWARD_PRECISION", "GROUP_BLOCK", "GROUP_SCAN", "GROUP_LOADS", "GROUP_WARPS",
    "LARGE_TILE", "LARGE_TILE_CHANNELS", "LARGE_TILE_LAUNCH",
)
# Triton's interpreter (3.8) returns garbage from a bfloat16 tl.dot, so there bfloat16 sums in float32.


@triton.jit
def _box_geometry(rois_ptr, j, spatial_scale, PH: tl.constexpr, PW: tl.constexpr, SAMPLING: tl.constexpr, ALIGNED: tl.constexpr):
    """Batch index (as stored: only the box-wise forward reads it), start, bin size and sample grid
    of box ``j``, in torchvision's arithmetic order."""
    base = rois_ptr + j * 5
    image = tl.load(base)
    if ALIGNED:
        offset = 0.5
    else:
        offset = 0.0
    start_x = tl.load(base + 1) * spatial_scale - offset
    start_y = tl.load(base + 2) * spatial_scale - offset
    width = (tl.load(base + 3) * spatial_scale - offset) - start_x
    height = (tl.load(base + 4) * spatial_scale - offset) - start_y
    if not ALIGNED:
        width = tl.maximum(width, 1.0)
        height = tl.maximum(height, 1.0)
    if SAMPLING > 0:
        grid_h = tl.full((), SAMPLING, tl.int32)
        grid_w = tl.full((), SAMPLING, tl.int32)
    else:
        grid_h = tl.ceil(height / PH).to(tl.int32)
        grid_w = tl.ceil(width / PW).to(tl.int32)
    count = tl.maximum(grid_h * grid_w, 1).to(tl.float32)
    return image, start_y, start_x, height / PH, width / PW, grid_h, grid_w, count


@triton.jit
def _bin_weights(start, bin_size, grid, samples, p, idx, extent):
    """Summed bilinear weights that the ``grid`` samples of bin ``p`` (one axis) give to positions
    ``idx``; ``p`` and ``idx`` broadcast (a scalar bin, or ``[BINS, 1]`` against ``[1, PIXELS]``).
    ``start``, ``bin_size`` and ``grid`` may be one per row (``[BOXES, 1]``, several boxes at once);
    ``samples``, a scalar at least every ``grid``, bounds the loop."""
    acc = tl.zeros_like(p + idx + start).to(tl.float32)
    grid_f = tl.maximum(grid, 1).to(tl.float32)
    for s in range(0, samples):
        pos = start + p * bin_size + (s + 0.5) * bin_size / grid_f
        inside = (pos >= -1.0) & (pos <= extent) & (s < grid)
        pos = tl.maximum(pos, 0.0)
        low = pos.to(tl.int32)
        at_edge = low >= extent - 1
        low = tl.where(at_edge, extent - 1, low)
        high = tl.where(at_edge, low, low + 1)
        frac = tl.where(at_edge, 0.0, pos - low.to(tl.float32))
        w_low = tl.where(inside, 1.0 - frac, 0.0)
        w_high = tl.where(inside, frac, 0.0)
        acc += tl.where(idx == low, w_low, 0.0) + tl.where(idx == high, w_high, 0.0)
    return acc


@triton.jit
def _box_weights(start_y, start_x, bin_h, bin_w, grid_h, grid_w, top, left, H, W,
                 PH: tl.constexpr, PW: tl.constexpr, PH_PAD: tl.constexpr, PW_PAD: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """``[PH_PAD * PW_PAD, TILE_H * TILE_W]``: the weight output bin ``ph * PW_PAD + pw`` of a box gives
    pixel ``(top + r, left + c)`` at column ``r * TILE_W + c`` (zero for padding bins). Built as the
    outer product of one matrix per axis, so the per-sample work is per row and per column only."""
    bin_rows = tl.arange(0, PH_PAD)
    bin_cols = tl.arange(0, PW_PAD)
    weight_y = _bin_weights(start_y, bin_h, grid_h, grid_h, bin_rows[:, None], (top + tl.arange(0, TILE_H))[None, :], H)
    weight_x = _bin_weights(start_x, bin_w, grid_w, grid_w, bin_cols[:, None], (left + tl.arange(0, TILE_W))[None, :], W)
    weight_y = tl.where((bin_rows < PH)[:, None], weight_y, 0.0)
    weight_x = tl.where((bin_cols < PW)[:, None], weight_x, 0.0)
    return tl.reshape(weight_y[:, None, :, None] * weight_x[None, :, None, :], (PH_PAD * PW_PAD, TILE_H * TILE_W))


@triton.jit
def _bin_offsets(PH: tl.constexpr, PW: tl.constexpr, PH_PAD: tl.constexpr, PW_PAD: tl.constexpr):
    """Offset of each padded bin in a ``[PH, PW]`` output, and whether it is a real bin."""
    bins = tl.arange(0, PH_PAD * PW_PAD)
    return (bins // PW_PAD) * PW + bins % PW_PAD, ((bins // PW_PAD) < PH) & ((bins % PW_PAD) < PW)


@triton.jit
def _weighted_sum(values, weights, DOT_FP32: tl.constexpr):
    """``values @ weights`` accumulated in float32, on tensor cores. ``DOT_FP32`` (float32 values):
    three TF32 products of split operands (``tf32x3``: float32-level error, about 1e-7 relative),
    not the CUDA-core ``ieee`` dot, which made the 7x7 float32 forward slower than torchvision's;
    otherwise float16/bfloat16 values with the weights rounded to the same type (relative error
    about 2^-8, inside those types' tolerance)."""
    if DOT_FP32:
        return tl.dot(values.to(tl.float32), weights, input_precision="tf32x3")
    return tl.dot(values, weights.to(values.dtype), out_dtype=tl.float32)


@triton.jit
def _pooled_product(values, weights, acc, PRODUCT: tl.constexpr):
    """``acc + values @ weights``, float32 operands: the pooled form's product, ``PRODUCT`` its
    ``input_precision``. Values read from float16 or bfloat16 are exact in TF32, so one TF32 product
    on tensor cores serves them (``tf32``), given weights already rounded to TF32 (:func:`_box_block`
    rounds them: 2^-11 relative, unbiased, finer than those types' own rounding; the tensor cores
    would truncate them, 2^-10 and biased low). Float32 values take three TF32 products (``tf32x3``,
    float32-level error, twice the operand registers) or CUDA-core FMAs (``ieee``, exact float32: the
    pooled product is 16 boxes a pixel, little enough work for them): ``POOLED_*_PRECISION``."""
    return tl.dot(values, weights, acc, input_precision=PRODUCT)


@triton.jit
def _image_forward_kernel(
    x_ptr, rois_ptr, order_ptr, offsets_ptr, out_ptr,
    C, H, W, stride_n, stride_c, stride_h, stride_w, spatial_scale,
    PH: tl.constexpr, PW: tl.constexpr, SAMPLING: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_C: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, PH_PAD: tl.constexpr, PW_PAD: tl.constexpr, DOT_FP32: tl.constexpr,
):
    image = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pixel = tl.arange(0, TILE_H * TILE_W)
    rows = pixel // TILE_W
    cols = pixel % TILE_W
    c_ok = channels < C
    tile_ptrs = x_ptr + image.to(tl.int64) * stride_n + channels[:, None].to(tl.int64) * stride_c + (rows * stride_h + cols * stride_w)[None, :]
    tile_mask = c_ok[:, None] & ((rows < H) & (cols < W))[None, :]
    tile = tl.load(tile_ptrs, mask=tile_mask, other=0.0)
    first = tl.load(offsets_ptr + image)
    last = tl.load(offsets_ptr + image + 1)
    for j in range(first, last):
        box = tl.load(order_ptr + j)
        out_base = out_ptr + box.to(tl.int64) * C * PH * PW + channels * (PH * PW)
        _, start_y, start_x, bin_h, bin_w, grid_h, grid_w, count = _box_geometry(rois_ptr, box, spatial_scale, PH, PW, SAMPLING, ALIGNED)
        weights = _box_weights(start_y, start_x, bin_h, bin_w, grid_h, grid_w, 0, 0, H, W, PH, PW, PH_PAD, PW_PAD, TILE_H, TILE_W)
        # Every bin at once: [channels, pixels] x [pixels, bins].
        values = tile
        if DOT_FP32:
            # Read again (from cache) per box: a float32 tile kept live across the loop next to
            # tl.dot's operand copies spills registers (ptxas, sm_90).
            values = tl.load(tile_ptrs, mask=tile_mask, other=0.0)
        value = _weighted_sum(values, tl.trans(weights), DOT_FP32) / count
        offsets, real = _bin_offsets(PH, PW, PH_PAD, PW_PAD)
        tl.store(out_base[:, None] + offsets[None, :], value.to(out_ptr.dtype.element_ty), mask=c_ok[:, None] & real[None, :])


@triton.jit
def _box_forward_kernel(
    x_ptr, rois_ptr, out_ptr,
    C, H, W, stride_n, stride_c, stride_h, stride_w, spatial_scale,
    PH: tl.constexpr, PW: tl.constexpr, SAMPLING: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_BINS: tl.constexpr,
):
    box = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    bins = tl.arange(0, BLOCK_BINS)
    bin_y = (bins // PW).to(tl.float32)
    bin_x = (bins % PW).to(tl.float32)
    c_ok = channels < C
    bins_ok = bins < PH * PW
    image, start_y, start_x, bin_h, bin_w, grid_h, grid_w, count = _box_geometry(rois_ptr, box, spatial_scale, PH, PW, SAMPLING, ALIGNED)
    base = x_ptr + image.to(tl.int32).to(tl.int64) * stride_n + channels[:, None].to(tl.int64) * stride_c
    grid_hf = tl.maximum(grid_h, 1).to(tl.float32)
    grid_wf = tl.maximum(grid_w, 1).to(tl.float32)
    acc = tl.zeros((BLOCK_C, BLOCK_BINS), tl.float32)
    for sy in range(0, grid_h):
        y = start_y + bin_y * bin_h + (sy + 0.5) * bin_h / grid_hf
        y_in = (y >= -1.0) & (y <= H)
        y = tl.maximum(y, 0.0)
        y_low = y.to(tl.int32)
        y_edge = y_low >= H - 1
        y_low = tl.where(y_edge, H - 1, y_low)
        y_high = tl.where(y_edge, y_low, y_low + 1)
        ly = tl.where(y_edge, 0.0, y - y_low.to(tl.float32))
        for sx in range(0, grid_w):
            x = start_x + bin_x * bin_w + (sx + 0.5) * bin_w / grid_wf
            inside = y_in & (x >= -1.0) & (x <= W) & bins_ok
            x = tl.maximum(x, 0.0)
            x_low = x.to(tl.int32)
            x_edge = x_low >= W - 1
            x_low = tl.where(x_edge, W - 1, x_low)
            x_high = tl.where(x_edge, x_low, x_low + 1)
            lx = tl.where(x_edge, 0.0, x - x_low.to(tl.float32))
            mask = c_ok[:, None] & inside[None, :]
            row_low = y_low * stride_h
            row_high = y_high * stride_h
            v1 = tl.load(base + (row_low + x_low * stride_w)[None, :], mask=mask, other=0.0).to(tl.float32)
            v2 = tl.load(base + (row_low + x_high * stride_w)[None, :], mask=mask, other=0.0).to(tl.float32)
            v3 = tl.load(base + (row_high + x_low * stride_w)[None, :], mask=mask, other=0.0).to(tl.float32)
            v4 = tl.load(base + (row_high + x_high * stride_w)[None, :], mask=mask, other=0.0).to(tl.float32)
            hy = 1.0 - ly
            hx = 1.0 - lx
            acc += (hy * hx)[None, :] * v1 + (hy * lx)[None, :] * v2 + (ly * hx)[None, :] * v3 + (ly * lx)[None, :] * v4
    out = out_ptr + box.to(tl.int64) * C * PH * PW + channels[:, None] * (PH * PW) + bins[None, :]
    tl.store(out, (acc / count).to(out_ptr.dtype.element_ty), mask=c_ok[:, None] & bins_ok[None, :])


@triton.jit
def _boxes_near_tile(rois_ptr, boxes, real, spatial_scale, top, left, TILE_H: tl.constexpr, TILE_W: tl.constexpr, ALIGNED: tl.constexpr):
    """For a vector of box indices: whether each box can reach the tile at ``(top, left)``. A superset
    of what :func:`_box_gradient` tests exactly (a margin of 3 pixels where it has 2, the extent of
    either sign), so rounding can only let a box through, never keep one out."""
    base = rois_ptr + boxes.to(tl.int64) * 5
    if ALIGNED:
        offset = 0.5
    else:
        offset = 0.0
    x1 = tl.load(base + 1, mask=real, other=0.0) * spatial_scale - offset
    y1 = tl.load(base + 2, mask=real, other=0.0) * spatial_scale - offset
    x2 = tl.load(base + 3, mask=real, other=0.0) * spatial_scale - offset
    y2 = tl.load(base + 4, mask=real, other=0.0) * spatial_scale - offset
    if not ALIGNED:  # torchvision's smallest box: one pixel a side
        x2 = tl.maximum(x2, x1 + 1.0)
        y2 = tl.maximum(y2, y1 + 1.0)
    rows = (tl.minimum(y1, y2) - 3.0 < top + TILE_H) & (tl.maximum(y1, y2) + 3.0 >= top)
    cols = (tl.minimum(x1, x2) - 3.0 < left + TILE_W) & (tl.maximum(x1, x2) + 3.0 >= left)
    return rows & cols


@triton.jit
def _reaches(start, length, tile_start, TILE: tl.constexpr):
    """Whether samples between ``start`` and ``start + length`` (``length`` of either sign) can give
    weight to the tile ``[tile_start, tile_start + TILE)`` of one axis: 2 pixels of margin."""
    low = tl.minimum(start, start + length)
    high = tl.maximum(start, start + length)
    return (low - 2.0 < tile_start + TILE) & (high + 2.0 >= tile_start)


@triton.jit
def _box_gradient(acc, box, grad_ptr, rois_ptr, channels, c_ok, C, H, W, spatial_scale, top, left,
                  PH: tl.constexpr, PW: tl.constexpr, SAMPLING: tl.constexpr, ALIGNED: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                  PH_PAD: tl.constexpr, PW_PAD: tl.constexpr, DOT_FP32: tl.constexpr, PER_BIN: tl.constexpr):
    """``acc`` (``[channels, tile pixels]``) plus what box ``box``'s output gradient gives the tile."""
    _, start_y, start_x, bin_h, bin_w, grid_h, grid_w, count = _box_geometry(rois_ptr, box, spatial_scale, PH, PW, SAMPLING, ALIGNED)
    # Samples of the box lie between start and start + PH * bin (either way round: an inverted box,
    # which check_boxes=False lets through, has a negative bin); each touches its floor and floor + 1
    # (after clamping to the map), so a margin of 2 pixels bounds every pixel it can reach.
    if _reaches(start_y, bin_h * PH, top, TILE_H) & _reaches(start_x, bin_w * PW, left, TILE_W):
        grad_base = grad_ptr + box.to(tl.int64) * C * PH * PW + channels * (PH * PW)
        if PH * PW == 1:
            weights = _box_weights(start_y, start_x, bin_h, bin_w, grid_h, grid_w, top, left, H, W, PH, PW, PH_PAD, PW_PAD, TILE_H, TILE_W)
            g = tl.load(grad_base, mask=c_ok, other=0.0).to(tl.float32) / count
            acc += g[:, None] * weights
        elif PER_BIN:
            # A tile of a large map meets few bins of a box: visit only those, a rank-1 update
            # each, rather than multiplying by the mostly-zero weights of every bin.
            for ph in range(0, PH):
                if _reaches(start_y + ph * bin_h, bin_h, top, TILE_H):
                    weight_y = _bin_weights(start_y, bin_h, grid_h, grid_h, ph, top + tl.arange(0, TILE_H), H)
                    for pw in range(0, PW):
                        if _reaches(start_x + pw * bin_w, bin_w, left, TILE_W):
                            weight_x = _bin_weights(start_x, bin_w, grid_w, grid_w, pw, left + tl.arange(0, TILE_W), W)
                            weight = tl.reshape(weight_y[:, None] * weight_x[None, :], (TILE_H * TILE_W,))
                            g = tl.load(grad_base + ph * PW + pw, mask=c_ok, other=0.0).to(tl.float32) / count
                            acc += g[:, None] * weight[None, :]
        else:
            weights = _box_weights(start_y, start_x, bin_h, bin_w, grid_h, grid_w, top, left, H, W, PH, PW, PH_PAD, PW_PAD, TILE_H, TILE_W)
            offsets, real = _bin_offsets(PH, PW, PH_PAD, PW_PAD)
            g = tl.load(grad_base[:, None] + offsets[None, :], mask=c_ok[:, None] & real[None, :], other=0.0)
            acc += _weighted_sum(g, weights, DOT_FP32) / count
    return acc


@triton.jit
def _image_backward_kernel(
    grad_ptr, rois_ptr, order_ptr, offsets_ptr, grad_x_ptr,
    C, H, W, stride_n, stride_c, stride_h, stride_w, spatial_scale, tiles_w,
    PH: tl.constexpr, PW: tl.constexpr, SAMPLING: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_C: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, PH_PAD: tl.constexpr, PW_PAD: tl.constexpr, DOT_FP32: tl.constexpr,
    PER_BIN: tl.constexpr, SCAN_BOXES: tl.constexpr,
):
    image = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    top = (tl.program_id(2) // tiles_w) * TILE_H
    left = (tl.program_id(2) % tiles_w) * TILE_W
    pixel = tl.arange(0, TILE_H * TILE_W)
    rows = top + pixel // TILE_W
    cols = left + pixel % TILE_W
    c_ok = channels < C
    acc = tl.zeros((BLOCK_C, TILE_H * TILE_W), tl.float32)
    first = tl.load(offsets_ptr + image)
    last = tl.load(offsets_ptr + image + 1)
    if PER_BIN:
        # A tile of a large map meets few of its image's boxes. Test SCAN_BOXES of them at a time
        # with vector loads and visit only those that can reach the tile, instead of one chain of
        # dependent loads (index, then coordinates) per box to find out.
        lanes = tl.arange(0, SCAN_BOXES)
        for j in range(first, last, SCAN_BOXES):
            real = j + lanes < last
            boxes = tl.load(order_ptr + j + lanes, mask=real, other=0)
            near = real & _boxes_near_tile(rois_ptr, boxes, real, spatial_scale, top, left, TILE_H, TILE_W, ALIGNED)
            if tl.max(near.to(tl.int32), axis=0) > 0:
                for b in range(0, SCAN_BOXES):
                    if tl.max(tl.where(lanes == b, near, False).to(tl.int32), axis=0) > 0:
                        acc = _box_gradient(acc, tl.load(order_ptr + j + b), grad_ptr, rois_ptr, channels, c_ok, C, H, W, spatial_scale, top, left,
                                            PH, PW, SAMPLING, ALIGNED, TILE_H, TILE_W, PH_PAD, PW_PAD, DOT_FP32, PER_BIN)
    else:
        for j in range(first, last):
            acc = _box_gradient(acc, tl.load(order_ptr + j), grad_ptr, rois_ptr, channels, c_ok, C, H, W, spatial_scale, top, left,
                                PH, PW, SAMPLING, ALIGNED, TILE_H, TILE_W, PH_PAD, PW_PAD, DOT_FP32, PER_BIN)
    dst = grad_x_ptr + image.to(tl.int64) * stride_n + channels[:, None].to(tl.int64) * stride_c + (rows * stride_h + cols * stride_w)[None, :]
    tl.store(dst, acc.to(grad_x_ptr.dtype.element_ty), mask=c_ok[:, None] & ((rows < H) & (cols < W))[None, :])


@triton.jit
def _map_block(x_ptr, image, channels, C, H, W, stride_n, stride_c, stride_h, stride_w, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Pointers to, and mask of, ``[channels, TILE_H * TILE_W]`` of image ``image``'s whole map."""
    pixel = tl.arange(0, TILE_H * TILE_W)
    rows = pixel // TILE_W
    cols = pixel % TILE_W
    ptrs = x_ptr + image.to(tl.int64) * stride_n + channels[:, None].to(tl.int64) * stride_c + (rows * stride_h + cols * stride_w)[None, :]
    return ptrs, (channels < C)[:, None] & ((rows < H) & (cols < W))[None, :]


@triton.jit
def _box_block(order_ptr, weights_ptr, start, last, BOX_BLOCK: tl.constexpr, PIXELS: tl.constexpr, PRODUCT: tl.constexpr):
    """``(boxes, real, weights)`` of the grouped slots ``start .. start + BOX_BLOCK`` (up to ``last``):
    box indices and weight rows in one load each, the rows read beside the indices, not after them
    (they are stored in grouped order)."""
    slots = start + tl.arange(0, BOX_BLOCK)
    real = slots < last
    boxes = tl.load(order_ptr + slots, mask=real, other=0).to(tl.int64)
    weights = tl.load(weights_ptr + slots[:, None].to(tl.int64) * PIXELS + tl.arange(0, PIXELS)[None, :], mask=real[:, None], other=0.0)
    if PRODUCT == "tf32":
        weights = round_to_tf32(weights)  # for the one-pass product of 16-bit values (_pooled_product)
    return boxes, real, weights


@triton.jit
def _pool_rows(x_ptr, image, channels, C, H, W, stride_n, stride_c, stride_h, stride_w, weights_ptr, rows, rows_real,
               TILE_H: tl.constexpr, TILE_W: tl.constexpr, CHUNK: tl.constexpr, PRODUCT: tl.constexpr):
    """``[channels, boxes]``: image ``image``'s map times the weights of plan rows ``rows``, summed over
    the pixels ``CHUNK`` at a time: a K loop, which Triton software-pipelines, so the map's and the
    weights' loads of the first chunks are all in flight at once (as straight-line code, each
    operand's trip through shared memory waited for its load before the other's was issued)."""
    acc = tl.zeros((channels.shape[0], rows.shape[0]), tl.float32)
    for start in range(0, TILE_H * TILE_W, CHUNK):
        pixel = start + tl.arange(0, CHUNK)
        map_rows = pixel // TILE_W
        map_cols = pixel % TILE_W
        tile = tl.load(x_ptr + image.to(tl.int64) * stride_n + channels[:, None].to(tl.int64) * stride_c + (map_rows * stride_h + map_cols * stride_w)[None, :],
                       mask=(channels < C)[:, None] & ((map_rows < H) & (map_cols < W))[None, :], other=0.0)
        weights = tl.load(weights_ptr + rows[:, None].to(tl.int64) * (TILE_H * TILE_W) + pixel[None, :], mask=rows_real[:, None], other=0.0)
        if PRODUCT == "tf32":
            weights = round_to_tf32(weights)  # for the one-pass product of 16-bit values (_pooled_product)
        acc = _pooled_product(tile.to(tl.float32), tl.trans(weights), acc, PRODUCT)
    return acc


@triton.jit
def _store_pooled(out_ptr, boxes, real, channels, C, value):
    tl.store(out_ptr + boxes[None, :] * C + channels[:, None], value.to(out_ptr.dtype.element_ty), mask=(channels < C)[:, None] & real[None, :])


@triton.jit
def _head_block(order_ptr, offsets_ptr, weights_ptr, image, BOX_BLOCK: tl.constexpr, PIXELS: tl.constexpr, PRODUCT: tl.constexpr):
    """``(boxes, real, weights, first, last)``: image ``image``'s first ``BOX_BLOCK`` boxes, from the
    plan's head rows (:func:`pooled_weights`; an unused row holds box -1, zero weights), and its
    boxes' grouped slots ``first .. last``. Every load's address depends on the image alone, so all
    are requested at once, not the rows after the offsets."""
    first = tl.load(offsets_ptr + image)
    last = tl.load(offsets_ptr + image + 1)
    slots = image * BOX_BLOCK + tl.arange(0, BOX_BLOCK)
    boxes = tl.load(order_ptr + slots).to(tl.int64)
    weights = tl.load(weights_ptr + slots[:, None].to(tl.int64) * PIXELS + tl.arange(0, PIXELS)[None, :])
    if PRODUCT == "tf32":
        weights = round_to_tf32(weights)  # as _box_block
    real = boxes >= 0
    return boxes, real, weights, first, last


@triton.jit
def _pooled_forward_kernel(
    x_ptr, order_ptr, offsets_ptr, weights_ptr, out_ptr, C, H, W, stride_n, stride_c, stride_h, stride_w,
    BLOCK_C: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BOX_BLOCK: tl.constexpr, CHANNEL_BLOCKS: tl.constexpr,
    CHUNK: tl.constexpr, PRODUCT: tl.constexpr,
):
    """SCRL's 1x1 output, ``out [K, C]``: one program per (image, ``CHANNEL_BLOCKS`` blocks of
    ``BLOCK_C`` channels) multiplies the image's whole map with its boxes' weights (:func:`pooled_weights`),
    ``BOX_BLOCK`` boxes a product (:func:`_pool_rows`): the image's first block from the plan's head
    rows, whose addresses need no offset, and any further blocks (an image with more boxes) from the
    grouped rows. Those further blocks have a loop nest of their own because Triton software-pipelines
    innermost loops only: with the whole map a product (``CHUNK`` its padded pixels) the pixel loop
    folds away, the head rows' channel-block loop is innermost, and the next blocks' map loads are in
    flight during this block's product."""
    image = tl.program_id(0)
    first_channel = tl.program_id(1) * (CHANNEL_BLOCKS * BLOCK_C)
    heads = tl.num_programs(0) * BOX_BLOCK
    head_rows = image * BOX_BLOCK + tl.arange(0, BOX_BLOCK)
    boxes = tl.load(order_ptr + head_rows).to(tl.int64)
    first = tl.load(offsets_ptr + image)
    last = tl.load(offsets_ptr + image + 1)
    for block in range(0, CHANNEL_BLOCKS):
        channels = first_channel + block * BLOCK_C + tl.arange(0, BLOCK_C)
        value = _pool_rows(x_ptr, image, channels, C, H, W, stride_n, stride_c, stride_h, stride_w, weights_ptr, head_rows,
                           head_rows >= 0, TILE_H, TILE_W, CHUNK, PRODUCT)  # every head row is set: no mask waits on the boxes
        _store_pooled(out_ptr, boxes, boxes >= 0, channels, C, value)
    for j in range(first + BOX_BLOCK, last, BOX_BLOCK):
        slots = j + tl.arange(0, BOX_BLOCK)
        real = slots < last
        for block in range(0, CHANNEL_BLOCKS):
            channels = first_channel + block * BLOCK_C + tl.arange(0, BLOCK_C)
            value = _pool_rows(x_ptr, image, channels, C, H, W, stride_n, stride_c, stride_h, stride_w, weights_ptr, heads + slots, real,
                               TILE_H, TILE_W, CHUNK, PRODUCT)
            _store_pooled(out_ptr, tl.load(order_ptr + heads + slots, mask=real, other=0).to(tl.int64), real, channels, C, value)


@triton.jit
def _box_block_gradient(grad_ptr, boxes, real, weights, channels, C, acc, PRODUCT: tl.constexpr):
    """``acc`` plus the ``[channels, boxes] x [boxes, pixels]`` product of the boxes' output gradients and weights."""
    g = tl.load(grad_ptr + boxes[None, :] * C + channels[:, None], mask=(channels < C)[:, None] & real[None, :], other=0.0)
    return _pooled_product(g.to(tl.float32), weights, acc, PRODUCT)


@triton.jit
def _store_map_block(ptr, image, channels, values, C, H, W, stride_n, stride_c, stride_h, stride_w, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    ptrs, mask = _map_block(ptr, image, channels, C, H, W, stride_n, stride_c, stride_h, stride_w, TILE_H, TILE_W)
    tl.store(ptrs, values.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pooled_backward_kernel(
    grad_ptr, order_ptr, offsets_ptr, weights_ptr, grad_x_ptr, C, H, W, stride_n, stride_c, stride_h, stride_w,
    BLOCK_C: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BOX_BLOCK: tl.constexpr, CHANNEL_BLOCKS: tl.constexpr, PRODUCT: tl.constexpr,
):
    """Gradient of :func:`_pooled_forward_kernel`'s output with respect to the map: one program per
    (image, ``CHANNEL_BLOCKS`` channel blocks) sums its boxes' contributions, ``BOX_BLOCK`` a product,
    in a fixed order, and writes each block of the map once: no atomics (bit-identical run after
    run), no zero-fill first. The first block's rows and boxes come with the offsets (:func:`_head_block`),
    so the gradients' gather waits on one round of loads, not two."""
    image = tl.program_id(0)
    first_channel = tl.program_id(1) * (CHANNEL_BLOCKS * BLOCK_C)
    PIXELS: tl.constexpr = TILE_H * TILE_W
    boxes, real, weights, first, last = _head_block(order_ptr, offsets_ptr, weights_ptr, image, BOX_BLOCK, PIXELS, PRODUCT)
    heads = tl.num_programs(0) * BOX_BLOCK
    if CHANNEL_BLOCKS > 1 and last - first <= BOX_BLOCK:  # every box in the head rows (SCRL's case)
        _pooled_gradient_blocks(grad_ptr, order_ptr, weights_ptr, grad_x_ptr, image, first_channel, boxes, real, weights, first, last, heads,
                                    C, H, W, stride_n, stride_c, stride_h, stride_w, BLOCK_C, TILE_H, TILE_W, BOX_BLOCK, CHANNEL_BLOCKS, True, PRODUCT)
    else:
        _pooled_gradient_blocks(grad_ptr, order_ptr, weights_ptr, grad_x_ptr, image, first_channel, boxes, real, weights, first, last, heads,
                                    C, H, W, stride_n, stride_c, stride_h, stride_w, BLOCK_C, TILE_H, TILE_W, BOX_BLOCK, CHANNEL_BLOCKS, False, PRODUCT)


@triton.jit
def _pooled_gradient_blocks(grad_ptr, order_ptr, weights_ptr, grad_x_ptr, image, first_channel, boxes, real, weights, first, last, heads,
                            C, H, W, stride_n, stride_c, stride_h, stride_w, BLOCK_C: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                            BOX_BLOCK: tl.constexpr, CHANNEL_BLOCKS: tl.constexpr, HEADS_ONLY: tl.constexpr, PRODUCT: tl.constexpr):
    """:func:`_pooled_backward_kernel`'s channel blocks, one after the other. ``HEADS_ONLY`` (the image's
    boxes all in its head rows): no loop over further boxes inside, so Triton, which pipelines
    innermost loops only, pipelines this one: the next blocks' gradients are in flight during this
    block's product."""
    PIXELS: tl.constexpr = TILE_H * TILE_W
    for block in range(0, CHANNEL_BLOCKS):
        channels = first_channel + block * BLOCK_C + tl.arange(0, BLOCK_C)
        acc = _box_block_gradient(grad_ptr, boxes, real, weights, channels, C, tl.zeros((BLOCK_C, PIXELS), tl.float32), PRODUCT)
        if not HEADS_ONLY:
            for j in range(first + BOX_BLOCK, last, BOX_BLOCK):
                more_boxes, more_real, more_weights = _box_block(order_ptr + heads, weights_ptr + heads.to(tl.int64) * PIXELS, j, last, BOX_BLOCK, PIXELS, PRODUCT)
                acc = _box_block_gradient(grad_ptr, more_boxes, more_real, more_weights, channels, C, acc, PRODUCT)
        _store_map_block(grad_x_ptr, image, channels, acc, C, H, W, stride_n, stride_c, stride_h, stride_w, TILE_H, TILE_W)


@triton.jit
def _pooled_weight_rows(rois_ptr, boxes, H, W, spatial_scale, BOXES: tl.constexpr, SAMPLING: tl.constexpr, ALIGNED: tl.constexpr,
                        TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """``[BOXES, TILE_H * TILE_W]``: row ``i`` holds what each pixel of the whole map contributes to box
    ``boxes[i]``'s 1x1 output, already over the sample count. ``boxes``: valid indices."""
    _, start_y, start_x, height, width, grid_h, grid_w, _ = _box_geometry(rois_ptr, boxes, spatial_scale, 1, 1, SAMPLING, ALIGNED)
    # One grid per box even where SAMPLING fixes it; the loop runs to the block's largest.
    grid_h = grid_h + tl.zeros((BOXES,), tl.int32)
    grid_w = grid_w + tl.zeros((BOXES,), tl.int32)
    weight_y = _bin_weights(start_y[:, None], height[:, None], grid_h[:, None], tl.max(grid_h, axis=0), 0, tl.arange(0, TILE_H)[None, :], H)
    weight_x = _bin_weights(start_x[:, None], width[:, None], grid_w[:, None], tl.max(grid_w, axis=0), 0, tl.arange(0, TILE_W)[None, :], W)
    rows = tl.reshape(weight_y[:, :, None] * weight_x[:, None, :], (BOXES, TILE_H * TILE_W))
    return rows / tl.maximum(grid_h * grid_w, 1).to(tl.float32)[:, None]


@triton.jit
def _store_weight_rows(weights_ptr, slots, rows, real, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    tl.store(weights_ptr + slots[:, None].to(tl.int64) * (TILE_H * TILE_W) + tl.arange(0, TILE_H * TILE_W)[None, :], rows, mask=real[:, None])


@triton.jit
def _place_pooled_rows(rois_ptr, order_ptr, weights_ptr, boxes, slots, within, image, real, num_images, H, W, spatial_scale,
                       BOXES: tl.constexpr, HEAD: tl.constexpr, SAMPLING: tl.constexpr, ALIGNED: tl.constexpr,
                       TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Puts ``boxes`` (at grouped ``slots``, ``within`` their rank among image ``image``'s boxes) into a
    pooled plan (:func:`pooled_weights`): every box's weights into its grouped row, and an image's
    first ``HEAD`` boxes into its head rows of ``order`` and ``weights`` too."""
    head = real & (image >= 0) & (image < num_images) & (within < HEAD)
    head_slot = image * HEAD + within
    tl.store(order_ptr + head_slot, boxes, mask=head)
    rows = _pooled_weight_rows(rois_ptr, tl.where(real, boxes, 0), H, W, spatial_scale, BOXES, SAMPLING, ALIGNED, TILE_H, TILE_W)
    _store_weight_rows(weights_ptr, num_images * HEAD + slots, rows, real, TILE_H, TILE_W)
    _store_weight_rows(weights_ptr, head_slot, rows, head, TILE_H, TILE_W)


@triton.jit
def _fill_unused_heads(order_ptr, weights_ptr, images, counts, real, HEAD: tl.constexpr, PIXELS: tl.constexpr):
    """Head rows of ``images`` (``counts`` boxes each) that no box takes: box -1, zero weights, so the
    plan holds no unset value."""
    for within in tl.static_range(HEAD):
        unused = real & (counts <= within)
        tl.store(order_ptr + images * HEAD + within, tl.full(images.shape, -1, tl.int32), mask=unused)
        rows = (images * HEAD + within).to(tl.int64)
        tl.store(weights_ptr + rows[:, None] * PIXELS + tl.arange(0, PIXELS)[None, :], tl.zeros((images.shape[0], PIXELS), tl.float32), mask=unused[:, None])


@triton.jit
def _pooled_weights_kernel(rois_ptr, order_ptr, offsets_ptr, weights_ptr, K, num_images, H, W, spatial_scale,
                           BOXES: tl.constexpr, HEAD: tl.constexpr, SAMPLING: tl.constexpr, ALIGNED: tl.constexpr,
                           TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """The pooled plan's rows (:func:`pooled_weights`) of grouped slots ``slots``, ``BOXES`` per program,
    from its grouped ``order`` and ``offsets``."""
    slots = tl.program_id(0) * BOXES + tl.arange(0, BOXES)
    real = slots < K
    boxes = tl.load(order_ptr + num_images * HEAD + slots, mask=real, other=0)
    image = _image_index(rois_ptr, boxes, real, num_images)
    first = tl.load(offsets_ptr + image, mask=real & (image >= 0) & (image < num_images), other=0)
    _place_pooled_rows(rois_ptr, order_ptr, weights_ptr, boxes, slots, slots - first, image, real, num_images, H, W, spatial_scale,
                       BOXES, HEAD, SAMPLING, ALIGNED, TILE_H, TILE_W)


class PooledMap(NamedTuple):
    """The map and sampling whose pooled weights (:func:`pooled_weights`) a plan also computes."""

    height: int
    width: int
    spatial_scale: float
    sampling_ratio: int
    aligned: bool


def uses_pooled_weights(height: int, width: int, out_h: int, out_w: int) -> bool:
    """SCRL's case, a 1x1 output from a map that one program holds whole: each box's bilinear weights
    are computed once (:func:`pooled_weights`) and read by every channel block of both passes,
    instead of being recomputed by each (64 blocks at C = 2048)."""
    tile_h, tile_w = _whole_map_tile(height, width, out_h * out_w)
    return out_h * out_w == 1 and tile_h * tile_w <= MAX_TILE


def plan_shapes(boxes: int, num_images: int, height: int, width: int, out_h: int, out_w: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Shapes of the forward's ``order`` and ``weights``: ``[N * POOLED_BOX_BLOCK + K]`` and
    ``[N * POOLED_BOX_BLOCK + K, TILE_H * TILE_W]`` where :func:`uses_pooled_weights` (a pooled plan,
    :func:`pooled_weights`), else ``[K]`` and ``[0]``."""
    if not uses_pooled_weights(height, width, out_h, out_w):
        return (boxes,), (0,)
    tile_h, tile_w = _whole_map_tile(height, width, 1)
    rows = num_images * POOLED_BOX_BLOCK + boxes
    return (rows,), (rows, tile_h * tile_w)


def pooled_weights(rois: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, num_images: int, height: int, width: int,
                   spatial_scale: float, sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """A pooled plan's ``weights``, ``[N * HEAD + K, TILE_H * TILE_W]`` float32 (``HEAD``:
    ``POOLED_BOX_BLOCK``; the map padded to powers of two): each box's weight per pixel in its 1x1
    RoIAlign output, the sample count included, and the head rows of ``order`` (``[N * HEAD + K]``,
    its grouped part, from row ``N * HEAD``, and ``offsets`` already set).

    Row ``N * HEAD + j`` of both is the box in grouped slot ``j``; image ``b``'s ``i``-th box
    (``i < HEAD``) is also in row ``b * HEAD + i``, so a pooling program reads its image's first block
    of boxes at addresses that need no offset first, all its loads at once (the grouped rows serve
    an image's further boxes). Head rows past an image's box count hold box -1 and zero weights.
    Three launches here (two fills, then the rows, ``POOLED_WEIGHT_BOXES`` boxes a program);
    :func:`group_by_rank` makes the same plan in its one launch."""
    pooled = PooledMap(height, width, spatial_scale, sampling_ratio, aligned)
    tile_h, tile_w = _whole_map_tile(height, width, 1)
    weights = _empty_weights(rois, num_images, pooled)
    heads = num_images * POOLED_BOX_BLOCK
    order[:heads].fill_(-1)
    weights[:heads].zero_()
    if rois.shape[0]:
        _pooled_weights_kernel[(cdiv(rois.shape[0], POOLED_WEIGHT_BOXES),)](
            rois, order, offsets, weights, rois.shape[0], num_images, height, width, float(spatial_scale),
            BOXES=POOLED_WEIGHT_BOXES, HEAD=POOLED_BOX_BLOCK, SAMPLING=max(int(sampling_ratio), 0), ALIGNED=bool(aligned),
            TILE_H=tile_h, TILE_W=tile_w, num_warps=4,
        )
    return weights


def _empty_weights(rois: torch.Tensor, num_images: int, pooled: Optional[PooledMap]) -> torch.Tensor:
    if pooled is None:
        return rois.new_empty(0)
    return torch.empty(plan_shapes(rois.shape[0], num_images, pooled.height, pooled.width, 1, 1)[1], dtype=torch.float32, device=rois.device)


def group_by_image(rois: torch.Tensor, num_images: int, pooled: Optional[PooledMap] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(order, offsets, weights)``: ``order`` and ``offsets`` (int32) group the boxes by image: ``rois[order]``
    is grouped by image (the batch index truncated to an integer, as ``.long()`` does; indices
    outside ``[0, num_images)``, NaN among them, go first if negative or NaN, last otherwise), and
    image ``b``'s boxes are ``order[offsets[b]:offsets[b + 1]]``, in their original order;
    with ``pooled``, ``order`` and ``weights`` are a pooled plan (:func:`pooled_weights`: ``order``'s
    grouped part starts at row ``N * POOLED_BOX_BLOCK``), else ``weights`` is empty. On the device,
    without a host sync; one launch for all three up to ``GROUP_KERNEL_MAX_BOXES`` (while the int32
    keys of :func:`group_by_rank` fit). ``rois``: ``[K, 5]`` float32, contiguous."""
    if rois.shape[0] <= GROUP_KERNEL_MAX_BOXES and (num_images + 2) * rois.shape[0] < 2**31:
        return group_by_rank(rois, num_images, pooled)
    return group_by_sort(rois, num_images, pooled)


@triton.jit
def _image_index(rois_ptr, boxes, real, num_images):
    """Box ``boxes``' batch index truncated to an integer and clamped to ``[-1, num_images]``, NaN to
    -1 (int32; -1 where not ``real``)."""
    image = tl.load(rois_ptr + boxes.to(tl.int64) * 5, mask=real, other=-1.0)
    image = tl.where(image == image, image, -1.0)
    # num_images * 1.0, not .to(): a launch with one image passes it as the constant 1, a Python int
    return tl.minimum(tl.maximum(image, -1.0), num_images * 1.0).to(tl.int32)


@triton.jit
def _grouping_keys(rois_ptr, boxes, K, num_images):
    """``(image + 1) * K + box`` (int32) for each box index in ``boxes``, ``image`` its
    :func:`_image_index`: one total order that puts boxes by image, each image's in their original
    order. Indices past ``K`` get the largest int32, so nothing ranks after them."""
    real = boxes < K
    return tl.where(real, (_image_index(rois_ptr, boxes, real, num_images) + 1) * K + boxes, 2147483647)


@triton.jit
def _group_kernel(rois_ptr, order_ptr, offsets_ptr, weights_ptr, K, num_images, rank_programs, H, W, spatial_scale,
                  BLOCK: tl.constexpr, SCAN: tl.constexpr, LOADS: tl.constexpr, WEIGHTS: tl.constexpr, HEAD: tl.constexpr,
                  SAMPLING: tl.constexpr, ALIGNED: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Programs below ``rank_programs`` place ``BLOCK`` boxes each: box ``j`` goes to ``order[rank]``,
    ``rank`` being the number of boxes whose key (:func:`_grouping_keys`) is below its own, a
    permutation whatever the batch indices hold, with each image's boxes in their original order.
    The others write ``offsets[b]``, the number of keys below ``(b + 1) * K`` (boxes of an image
    below ``b``), for ``BLOCK`` images each.

    With ``WEIGHTS`` the launch makes a pooled plan (:func:`pooled_weights`, ``HEAD`` head rows an
    image), counting a second bound per lane: a box's rank within its image comes from the keys
    below its image's first (``(image + 1) * K``), and image ``b``'s box count from those below
    ``(b + 2) * K``, so the programs of the offsets fill the head rows its boxes leave."""
    program = tl.program_id(0)
    if program < rank_programs:
        mine = program * BLOCK + tl.arange(0, BLOCK)
        key = _grouping_keys(rois_ptr, mine, K, num_images)
    else:
        mine = (program - rank_programs) * BLOCK + tl.arange(0, BLOCK)
        key = (mine + 1) * K
    if program < rank_programs:
        second = key - mine  # (image + 1) * K: the first key of the box's image
    else:
        second = key + K  # the next image's offset
    # One int32 compare a pair (two with WEIGHTS, both counts in one word: low and high 16 bits, as
    # K < 2^15). LOADS blocks of keys are read before any is compared, so their latencies overlap
    # (the loop is not software-pipelined: no tl.dot consumes the loads); the counts are summed
    # across lanes once after the loop, not once an iteration.
    before_counts = tl.zeros((BLOCK, SCAN), tl.int32)
    for start in range(0, K, SCAN * LOADS):
        for part in tl.static_range(LOADS):
            other_key = _grouping_keys(rois_ptr, start + part * SCAN + tl.arange(0, SCAN), K, num_images)
            before_counts += (other_key[None, :] < key[:, None]).to(tl.int32)
            if WEIGHTS:
                before_counts += (other_key[None, :] < second[:, None]).to(tl.int32) << 16
    counts = tl.sum(before_counts, axis=1)
    count = counts & 0xFFFF if WEIGHTS else counts
    if program < rank_programs:
        real = mine < K
        if WEIGHTS:
            tl.store(order_ptr + num_images * HEAD + count, mine, mask=real)
            _place_pooled_rows(rois_ptr, order_ptr, weights_ptr, mine, count, count - (counts >> 16), second // K - 1, real, num_images,
                               H, W, spatial_scale, BLOCK, HEAD, SAMPLING, ALIGNED, TILE_H, TILE_W)
        else:
            tl.store(order_ptr + count, mine, mask=real)
    else:
        tl.store(offsets_ptr + mine, count, mask=mine <= num_images)
        if WEIGHTS:
            _fill_unused_heads(order_ptr, weights_ptr, mine, (counts >> 16) - count, mine < num_images, HEAD, TILE_H * TILE_W)


def group_by_rank(rois: torch.Tensor, num_images: int, pooled: Optional[PooledMap] = None, block: Optional[int] = None, scan: Optional[int] = None,
                  loads: Optional[int] = None, num_warps: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`group_by_image` in one launch of ``_group_kernel``, the pooled plan included (any
    number of boxes while ``(num_images + 2) * K < 2**31``, and below ``2**15`` with ``pooled``, but
    quadratic work); ``block``, ``scan``, ``loads`` and ``num_warps`` (None: ``GROUP_BLOCK``,
    ``GROUP_SCAN``, ``GROUP_LOADS``, ``GROUP_WARPS`` as they are at the call) change only its speed
    (``benchmarks/tune_roi_align.py``)."""
    block, scan, loads, num_warps = block or GROUP_BLOCK, scan or GROUP_SCAN, loads or GROUP_LOADS, num_warps or GROUP_WARPS
    boxes = rois.shape[0]
    if pooled is not None and boxes >= 2**15:
        raise ValueError(f"group_by_rank packs two counts of the boxes in an int32: at most {2**15 - 1} boxes with pooled weights, got {boxes}")
    order_shape = (boxes,) if pooled is None else plan_shapes(boxes, num_images, pooled.height, pooled.width, 1, 1)[0]
    order = torch.empty(order_shape, dtype=torch.int32, device=rois.device)
    offsets = torch.empty(num_images + 1, dtype=torch.int32, device=rois.device)
    weights = _empty_weights(rois, num_images, pooled)
    rank_programs = cdiv(boxes, block)
    height, width, spatial_scale, sampling_ratio, aligned = pooled or (1, 1, 1.0, 0, False)
    tile_h, tile_w = _whole_map_tile(height, width, 1)
    _group_kernel[(rank_programs + cdiv(num_images + 1, block),)](
        rois, order, offsets, weights, boxes, num_images, rank_programs, height, width, float(spatial_scale),
        BLOCK=block, SCAN=scan, LOADS=loads, WEIGHTS=pooled is not None, HEAD=POOLED_BOX_BLOCK, SAMPLING=max(int(sampling_ratio), 0), ALIGNED=bool(aligned),
        TILE_H=tile_h, TILE_W=tile_w, num_warps=num_warps,
    )
    return order, offsets, weights


def group_by_sort(rois: torch.Tensor, num_images: int, pooled: Optional[PooledMap] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`group_by_image` with a stable torch.sort and searchsorted (several launches, O(K log K)),
    then :func:`pooled_weights` (with a copy of the order into the plan's)."""
    image = rois[:, 0].nan_to_num(-1.0, posinf=num_images, neginf=-1.0).clamp(-1, num_images).to(torch.int64)  # as _grouping_keys
    sorted_image, order = torch.sort(image, stable=True)
    offsets = torch.searchsorted(sorted_image, torch.arange(num_images + 1, device=rois.device, dtype=torch.int64))
    order, offsets = order.to(torch.int32), offsets.to(torch.int32)
    if pooled is None:
        return order, offsets, _empty_weights(rois, num_images, None)
    plan_order = torch.empty(plan_shapes(rois.shape[0], num_images, pooled.height, pooled.width, 1, 1)[0], dtype=torch.int32, device=rois.device)
    plan_order[num_images * POOLED_BOX_BLOCK:] = order
    return plan_order, offsets, pooled_weights(rois, plan_order, offsets, num_images, *pooled)


# Bits of :func:`invalid_box_flags`.
BAD_BATCH_INDEX = 1
INVERTED_BOX = 2
NOT_FINITE = 4
# Boxes checked per program of ``_box_check_kernel``; SCRL's 2560 take one program.
CHECK_BOXES_PER_PROGRAM = 8192
CHECK_BLOCK = 1024
INFINITY = tl.constexpr(float("inf"))


@triton.jit
def _box_check_kernel(rois_ptr, flags_ptr, K, stride_k, stride_col, last_image,
                      BOXES_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr, IN_FLOAT64: tl.constexpr):
    """``flags[program]``: the OR of :data:`BAD_BATCH_INDEX`, :data:`INVERTED_BOX` and
    :data:`NOT_FINITE` over this program's boxes. NaN fails every ordered comparison, so a NaN batch
    index is a bad index and a NaN coordinate is not finite (never an inverted box)."""
    program = tl.program_id(0)
    compute = tl.float64 if IN_FLOAT64 else tl.float32
    bad_index = tl.zeros((BLOCK,), tl.int32)
    inverted = tl.zeros((BLOCK,), tl.int32)
    not_finite = tl.zeros((BLOCK,), tl.int32)
    for start in range(program * BOXES_PER_PROGRAM, tl.minimum(K, (program + 1) * BOXES_PER_PROGRAM), BLOCK):
        box = start + tl.arange(0, BLOCK)
        real = box < K
        row = rois_ptr + box.to(tl.int64) * stride_k
        index = tl.load(row, mask=real, other=0.0).to(compute)
        x1 = tl.load(row + stride_col, mask=real, other=0.0).to(compute)
        y1 = tl.load(row + 2 * stride_col, mask=real, other=0.0).to(compute)
        x2 = tl.load(row + 3 * stride_col, mask=real, other=0.0).to(compute)
        y2 = tl.load(row + 4 * stride_col, mask=real, other=0.0).to(compute)
        integral = (index >= 0) & (index <= last_image) & (index == tl.floor(index))
        bad_index |= (real & ~integral).to(tl.int32)
        inverted |= (real & ((x2 < x1) | (y2 < y1))).to(tl.int32)
        finite = (tl.abs(x1) < INFINITY) & (tl.abs(y1) < INFINITY) & (tl.abs(x2) < INFINITY) & (tl.abs(y2) < INFINITY)
        not_finite |= (real & ~finite).to(tl.int32)
    flags = tl.max(bad_index, axis=0) * 1 + tl.max(inverted, axis=0) * 2 + tl.max(not_finite, axis=0) * 4
    tl.store(flags_ptr + program, flags)


def invalid_box_flags(rois: torch.Tensor, num_images: int) -> torch.Tensor:
    """What is wrong with ``rois [K, 5]`` (any float dtype and strides) as boxes of ``num_images``
    images: int32 flags, one word per ``CHECK_BOXES_PER_PROGRAM`` boxes, whose OR holds
    :data:`BAD_BATCH_INDEX` (a batch index that is not an integer in ``[0, num_images)``),
    :data:`INVERTED_BOX` (``x2 < x1`` or ``y2 < y1``) and :data:`NOT_FINITE` (a coordinate). One
    launch, on the device: reading the words back is the check's only host synchronisation."""
    programs = max(1, cdiv(rois.shape[0], CHECK_BOXES_PER_PROGRAM))
    flags = torch.empty(programs, dtype=torch.int32, device=rois.device)
    _box_check_kernel[(programs,)](
        rois, flags, rois.shape[0], rois.stride(0), rois.stride(1), num_images - 1,
        BOXES_PER_PROGRAM=CHECK_BOXES_PER_PROGRAM, BLOCK=CHECK_BLOCK, IN_FLOAT64=rois.dtype == torch.float64, num_warps=4,
    )
    return flags


def prepare_rois(rois: torch.Tensor) -> torch.Tensor:
    """``rois`` as the kernels read them: float32, contiguous (no copy, no op when already so)."""
    if rois.dtype == torch.float32 and rois.is_contiguous():
        return rois
    return rois.to(torch.float32).contiguous()


def _whole_map_tile(height: int, width: int, bins: int) -> Tuple[int, int]:
    tile_h, tile_w = next_power_of_2(height), next_power_of_2(width)
    # tl.dot needs at least 16 along every dimension, pixels included (the pooled form multiplies too)
    tile_w = max(tile_w, 16 // min(tile_h, 16))
    return tile_h, tile_w


def _dot_in_float32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and triton_interpreted())


def _blocks(channels: int, tile: int, out_h: int, out_w: int) -> dict:
    """``BLOCK_C``, ``PH_PAD``, ``PW_PAD``: about 2048 float32 values of the tile per program (ptxas
    for sm_90 then needs 63-156 registers, no spills, at 7x7 maps), not far more channels than
    exist, and tl.dot's minimum of 16 (channels always, bins when there is more than one)."""
    bins_minimum = 16 if out_h * out_w > 1 else 1
    block_c = max(16, min(next_power_of_2(channels), max(1, 2048 // tile)))
    ph_pad = next_power_of_2(out_h)
    pw_pad = max(next_power_of_2(out_w), bins_minimum // min(ph_pad, bins_minimum))
    return dict(BLOCK_C=block_c, PH_PAD=ph_pad, PW_PAD=pw_pad)


# The launch configurations depend on shapes and dtype only; a training loop repeats a few of them.
@functools.lru_cache(maxsize=256)
def _pooled_config(channels: int, height: int, width: int, backward: bool, dtype: torch.dtype):
    """``(grid_channels, constexprs, launch options)`` of the pooled forward or backward
    (:func:`uses_pooled_weights`) of ``dtype`` values, from its ``POOLED_*`` settings."""
    tile_h, tile_w = _whole_map_tile(height, width, 1)
    block_c = (POOLED_BACKWARD_BLOCK_C if backward else POOLED_FORWARD_BLOCK_C) or _blocks(channels, tile_h * tile_w, 1, 1)["BLOCK_C"]
    block_c = max(16, min(block_c, next_power_of_2(channels)))  # tl.dot's minimum; no more than the channels
    channel_blocks = max(1, min(POOLED_BACKWARD_CHANNEL_BLOCKS if backward else POOLED_FORWARD_CHANNEL_BLOCKS, cdiv(channels, block_c)))
    product = (POOLED_BACKWARD_PRECISION if backward else POOLED_FORWARD_PRECISION) if dtype == torch.float32 else "tf32"
    constexprs = dict(BLOCK_C=block_c, TILE_H=tile_h, TILE_W=tile_w, BOX_BLOCK=POOLED_BOX_BLOCK, CHANNEL_BLOCKS=channel_blocks, PRODUCT=product)
    if not backward:
        constexprs["CHUNK"] = pooled_forward_chunk(height, width)
    return cdiv(channels, block_c * channel_blocks), constexprs, dict(POOLED_BACKWARD_LAUNCH if backward else POOLED_FORWARD_LAUNCH)


def apply_settings(settings: dict) -> None:
    """Sets this module's :data:`TUNED_SETTINGS` named in ``settings`` (``{name: value}``, as
    ``benchmarks/tune_roi_align.py`` writes them) for the launches that follow."""
    unknown = sorted(set(settings) - set(TUNED_SETTINGS))
    if unknown:
        raise ValueError(f"not a tuned setting of fastdense.kernels.roi_align: {', '.join(unknown)} (settings: {', '.join(TUNED_SETTINGS)})")
    for name in ("POOLED_FORWARD_PRECISION", "POOLED_BACKWARD_PRECISION"):
        if settings.get(name, "ieee") not in FLOAT32_PRODUCTS:
            raise ValueError(f"{name} must be one of {FLOAT32_PRODUCTS}, got {settings[name]!r}")
    for name, value in settings.items():
        globals()[name] = tuple(value) if name == "LARGE_TILE" else value
    for cached in (_pooled_config, _forward_config, _backward_config):
        cached.cache_clear()


def current_settings() -> dict:
    """This module's :data:`TUNED_SETTINGS` as they are now (what a benchmark records beside its figures)."""
    return {name: globals()[name] for name in TUNED_SETTINGS}


def pooled_forward_chunk(height: int, width: int, chunk: int = None) -> int:
    """The pooled forward's ``CHUNK``: ``POOLED_CHUNK`` (or ``chunk``) pixels, at most the padded map's."""
    tile_h, tile_w = _whole_map_tile(height, width, 1)
    return min(chunk or POOLED_CHUNK, tile_h * tile_w)


@functools.lru_cache(maxsize=256)
def _forward_config(channels: int, height: int, width: int, out_h: int, out_w: int, dtype: torch.dtype, sampling_ratio: int, aligned: bool):
    """``(whole_map, grid_channels, constexprs)`` of the forward launch where the output is not pooled."""
    common = dict(PH=out_h, PW=out_w, SAMPLING=max(sampling_ratio, 0), ALIGNED=aligned)
    tile_h, tile_w = _whole_map_tile(height, width, out_h * out_w)
    if tile_h * tile_w <= MAX_TILE:
        blocks = _blocks(channels, tile_h * tile_w, out_h, out_w)
        return True, cdiv(channels, blocks["BLOCK_C"]), dict(TILE_H=tile_h, TILE_W=tile_w, DOT_FP32=_dot_in_float32(dtype), **blocks, **common)
    block_bins = next_power_of_2(out_h * out_w)
    # Four gathered corners live beside the accumulator: half the usual block keeps them in registers.
    block_c = max(1, min(next_power_of_2(channels), 2048 // max(block_bins, 16)))
    return False, cdiv(channels, block_c), dict(BLOCK_C=block_c, BLOCK_BINS=block_bins, **common)


@functools.lru_cache(maxsize=256)
def _backward_config(channels: int, height: int, width: int, out_h: int, out_w: int, dtype: torch.dtype, sampling_ratio: int, aligned: bool):
    """``(grid_channels, grid_tiles, tiles_w, constexprs)`` of the backward launch where the output is not pooled."""
    tile_h, tile_w = _whole_map_tile(height, width, out_h * out_w)
    per_bin = tile_h * tile_w > MAX_TILE
    if per_bin:
        tile_h = min(tile_h, LARGE_TILE[0])
        tile_w = max(min(tile_w, LARGE_TILE[1]), 16 // tile_h)
    tiles_w = cdiv(width, tile_w)
    blocks = _blocks(channels, tile_h * tile_w, out_h, out_w)
    if per_bin and LARGE_TILE_CHANNELS:
        blocks["BLOCK_C"] = max(16, min(next_power_of_2(channels), LARGE_TILE_CHANNELS))
    constexprs = dict(
        PH=out_h, PW=out_w, SAMPLING=max(sampling_ratio, 0), ALIGNED=aligned, TILE_H=tile_h, TILE_W=tile_w,
        DOT_FP32=_dot_in_float32(dtype), PER_BIN=per_bin, SCAN_BOXES=SCAN_BOXES, **blocks,
    )
    return cdiv(channels, blocks["BLOCK_C"]), cdiv(height, tile_h) * tiles_w, tiles_w, constexprs


def roi_align_forward(input: torch.Tensor, rois: torch.Tensor, output_size: Tuple[int, int], spatial_scale: float, sampling_ratio: int, aligned: bool):
    """``(out, order, offsets, weights)``: ``out [K, C, PH, PW]`` is the RoIAlign of ``input [N, C, H, W]``
    (any strides) over ``rois [K, 5]``; ``(order, offsets)`` is :func:`group_by_image` of the boxes and
    ``weights`` their :func:`pooled_weights` where :func:`uses_pooled_weights` (else empty), both for
    :func:`roi_align_backward`."""
    num, channels, height, width = input.shape
    out_h, out_w = output_size
    rois = prepare_rois(rois)
    pooled = PooledMap(height, width, spatial_scale, sampling_ratio, aligned) if uses_pooled_weights(height, width, out_h, out_w) else None
    order, offsets, weights = group_by_image(rois, num, pooled)
    out = torch.empty(rois.shape[0], channels, out_h, out_w, dtype=input.dtype, device=input.device)
    if out.numel() == 0:
        return out, order, offsets, weights
    if pooled is not None:
        grid_channels, constexprs, options = _pooled_config(channels, height, width, False, input.dtype)
        _pooled_forward_kernel[(num, grid_channels)](input, order, offsets, weights, out, channels, height, width, *input.stride(), **constexprs, **options)
        return out, order, offsets, weights
    whole_map, grid_channels, constexprs = _forward_config(channels, height, width, out_h, out_w, input.dtype, int(sampling_ratio), bool(aligned))
    if whole_map:
        _image_forward_kernel[(num, grid_channels)](
            input, rois, order, offsets, out, channels, height, width, *input.stride(), float(spatial_scale), **constexprs,
        )
    else:
        _box_forward_kernel[(rois.shape[0], grid_channels)](
            input, rois, out, channels, height, width, *input.stride(), float(spatial_scale), **constexprs,
        )
    return out, order, offsets, weights


def roi_align_backward(grad: torch.Tensor, input: torch.Tensor, rois: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                       weights: torch.Tensor, spatial_scale: float, sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """Gradient of :func:`roi_align_forward` with respect to ``input`` (same shape, dtype and strides),
    deterministic; ``order``, ``offsets`` and ``weights`` are what the forward returned with it."""
    num, channels, height, width = input.shape
    out_h, out_w = grad.shape[-2:]
    grad_input = torch.empty_like(input)
    if grad_input.numel() == 0:
        return grad_input
    rois = prepare_rois(rois)
    if grad.dtype != input.dtype or not grad.is_contiguous():
        grad = grad.to(input.dtype).contiguous()
    if uses_pooled_weights(height, width, out_h, out_w):
        grid_channels, constexprs, options = _pooled_config(channels, height, width, True, input.dtype)
        _pooled_backward_kernel[(num, grid_channels)](grad, order, offsets, weights, grad_input, channels, height, width, *grad_input.stride(),
                                                      **constexprs, **options)
        return grad_input
    grid_channels, grid_tiles, tiles_w, constexprs = _backward_config(channels, height, width, out_h, out_w, input.dtype, int(sampling_ratio), bool(aligned))
    _image_backward_kernel[(num, grid_channels, grid_tiles)](
        grad, rois, order, offsets, grad_input, channels, height, width, *grad_input.stride(), float(spatial_scale), tiles_w, **constexprs,
        **(LARGE_TILE_LAUNCH if constexprs["PER_BIN"] else {}),
    )
    return grad_input
