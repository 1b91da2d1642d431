"""Triton kernels for VICReg's variance hinge and covariance penalty, forward and backward.

Notation: ``X`` is one slot's ``[n, D]`` batch, ``Xc`` its column-centred copy (never stored),
``d = diag(Xcᵀ Xc)`` the centred column sums of squares. The covariance penalty needs
``off = Σ_{a≠b} (Xcᵀ Xc)_ab²``. With ``A`` either ``Xc`` (the *Gram* form, ``n < D``) or ``Xcᵀ``
(the *direct* form, ``n >= D``), ``‖A Aᵀ‖²_F = ‖Xcᵀ Xc‖²_F`` and ``∂‖A Aᵀ‖²/∂A = 4 (A Aᵀ) A``,
so one set of kernels serves both forms:

- Gram form: ``off = ‖A Aᵀ‖² − Σ d²`` (``A Aᵀ`` is ``n x n``, ``n²D`` multiply-adds), and the
  gradient ``4 (A Aᵀ A − A diag(d))``: the ``diag(d)`` part is a per-column coefficient.
- Direct form: ``A Aᵀ`` is the ``D x D`` covariance itself; its diagonal is masked inside the tile,
  so ``off`` is summed directly with no cancellation (``nD²`` multiply-adds).

Neither form materialises ``Xc``; the product is tiled and reduced to one partial sum per tile,
which a one-program kernel adds up (in float64) with the column hinges into the two terms. The
backward's per-column coefficients come from ``d`` and the two incoming gradients inside its
kernel: a forward+backward is four launches and a handful of allocations, not dozens of small ops.
When the backward will need ``A Aᵀ`` and its upper triangle fits the memory budget, the forward
also writes the upper-triangle tiles (packed, ``[S, T(T+1)/2, BLOCK, BLOCK]``), and the backward
reads the lower ones transposed: it then costs one product, not two (recompute and apply).
The gradient needs no centring projection: the rows of ``Xc`` sum to zero, hence so do the columns
of ``4 (A Aᵀ) A`` and of the variance gradient.

Everything accumulates in float32 (float64 for float64 input). Products run on TF32 tensor cores
with operands *rounded* to TF32 first (tensor cores truncate, which would bias every square, and
so ``‖K‖²``, low by about 1e-3): measured against float64, loss error about 5e-5 and gradient
error about 4e-4 (the 1e-3 TF32 tolerance). ``FP32_DOT_PRECISION = "tf32x3"`` gives float32-level
accuracy (about 1e-7) at three times the product cost. Half-precision inputs are centred in float32
and take the same path.

Those figures hold while ``Σ d²`` is not much larger than ``off`` (columns of comparable variance:
then ``Σ d² / off`` is about ``n / D``, below 1 in the Gram form). The Gram form's error is the
products' rounding error times ``‖A Aᵀ‖² / off``, so it grows when a few columns' variances dominate
(n 64, D 256, one column with 10x the others' std: loss error 7e-4 in TF32; 30x: 2e-2 in TF32,
2e-5 in ``tf32x3``; 100x: 0.45 in TF32, 7e-4 in ``tf32x3`` or ``ieee``). Deciding per call would
need the data on the host (a synchronisation); such inputs want ``FP32_DOT_PRECISION = "tf32x3"``
or float64. The direct form masks the diagonal and has no such loss.
Float64 tiles avoid ``tl.dot`` (not every GPU lowers it) and multiply by broadcast-and-sum.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastdense.kernels._launch import cdiv, triton_interpreted
from fastdense.kernels._tf32 import round_to_tf32


# How float32 tiles are multiplied: "tf32" (operands rounded to TF32; ~4e-4 relative gradient
# error), "tf32x3" (float32-level accuracy, 3x the tensor-core work) or "ieee" (no tensor cores).
FP32_DOT_PRECISION = "tf32"
# Fewer columns than this use "tf32x3" instead of "tf32" (2 columns: 5e-3 error in TF32).
TF32_MIN_COLUMNS = 64
# The forward keeps A·Aᵀ (its upper-triangle tiles) for the backward when they take at most this
# much, or at most SAVED_PRODUCT_FRACTION of x itself (counted in the accumulator dtype) if that is
# more; otherwise the backward recomputes it in row chunks of at most SAVED_PRODUCT_BYTES. 12 MiB keeps
# the whole product of n = 2048 rows (8.5 MiB of tiles) inside the op's 16 MiB extra-memory budget; a
# quarter of x keeps VICRegL's 49 local slots of 512 columns (31 MiB of tiles against 196 MiB of x),
# which would otherwise be recomputed in 8 chunks, two launches each.
SAVED_PRODUCT_BYTES = 12 << 20
SAVED_PRODUCT_FRACTION = 0.25
# A product with fewer tiles than the GPU has multiprocessors leaves most of them idle for the whole
# inner loop (n 256 at D 8192: 3 of 132 busy). Such tiles have their inner axis cut into ranges of at
# least SPLIT_MIN_DEPTH, each summed by its own program, when it is at least SPLIT_MIN_INNER long
# (shorter loops cost less than the second launch that adds the ranges up).
SPLIT_MIN_INNER = 1024
SPLIT_MIN_DEPTH = 256
SPLIT_SUMS_BYTES = 12 << 20  # the ranges' tile sums, held until they are added up
INTERPRETER_MULTIPROCESSORS = 1  # the interpreter runs one program at a time: no splits (tests raise it)
# The backward's ``(A Aᵀ) A`` tiles on a GPU. Its loop is issue-bound on the CUDA-core work per element
# it loads, centres and rounds: a 128x128 output tile does 64 multiply-adds per such element, 128x64
# only 43 (sm_90 PTX: 122-143 against 88-107 multiply-adds per warp instruction). 16 deep, not 32:
# at 32 ptxas spills (255 registers); at 16 it does not. Both divide the packed product's tiles.
GPU_APPLY_BLOCKS = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=16)


@triton.jit
def _load_centred(ptr, rows, cols, row_stride, col_stride, n_rows, n_cols, mean_ptr, MEAN_ON_ROWS: tl.constexpr, ACC: tl.constexpr, ROUND_TF32: tl.constexpr,
                  EVEN: tl.constexpr = False):
    """A ``[len(rows), len(cols)]`` tile of ``A`` (``Xc`` or ``Xcᵀ``), centred, zero outside.

    ``EVEN``: the caller knows the tile lies inside (the blocks divide the shape), so no masks: in
    the product's inner loop they are a third of the instructions besides the MMAs (sm_90 PTX)."""
    if EVEN:
        tile = tl.load(ptr + rows[:, None] * row_stride + cols[None, :] * col_stride).to(ACC)
        if MEAN_ON_ROWS:
            tile = tile - tl.load(mean_ptr + rows)[:, None]
        else:
            tile = tile - tl.load(mean_ptr + cols)[None, :]
    else:
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        tile = tl.load(ptr + rows[:, None] * row_stride + cols[None, :] * col_stride, mask=mask, other=0.0).to(ACC)
        if MEAN_ON_ROWS:
            mean = tl.load(mean_ptr + rows, mask=rows < n_rows, other=0.0)
            tile = tile - mean[:, None]
        else:
            mean = tl.load(mean_ptr + cols, mask=cols < n_cols, other=0.0)
            tile = tile - mean[None, :]
        tile = tl.where(mask, tile, 0.0)
    if ROUND_TF32:
        tile = round_to_tf32(tile)
    return tile


@triton.jit
def _matmul_tile(a, b, acc, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    if USE_DOT:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _eps(eps_hi, eps_lo, ACC: tl.constexpr):
    """``eps`` in ``ACC``, from the two float32 halves :func:`eps_halves` passes."""
    return _as_acc(eps_hi, ACC) + _as_acc(eps_lo, ACC)


@triton.jit
def _column_stats_kernel(
    x_ptr, mean_ptr, sumsq_ptr, hinge_ptr,
    n, D, stride_n, stride_s, stride_d, eps_hi, eps_lo,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """Per column of one slot: the mean, the centred sum of squares ``d`` and the variance hinge.

    Two passes over the rows (sum, then centred squares) so the variance never cancels."""
    slot = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    base = x_ptr + slot * stride_s + cols[None, :] * stride_d
    total = tl.zeros([BLOCK_D], dtype=ACC)
    for start in range(0, n, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < n) & col_mask[None, :]
        total += tl.sum(tl.load(base + rows[:, None] * stride_n, mask=mask, other=0.0).to(ACC), axis=0)
    mean = total / n
    squares = tl.zeros([BLOCK_D], dtype=ACC)
    for start in range(0, n, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < n) & col_mask[None, :]
        centred = tl.load(base + rows[:, None] * stride_n, mask=mask, other=0.0).to(ACC) - mean[None, :]
        centred = tl.where(mask, centred, 0.0)
        squares += tl.sum(centred * centred, axis=0)
    std = tl.sqrt(squares / (n - 1) + _eps(eps_hi, eps_lo, ACC))
    out = slot * D + cols
    tl.store(mean_ptr + out, mean, mask=col_mask)
    tl.store(sumsq_ptr + out, squares, mask=col_mask)
    tl.store(hinge_ptr + out, tl.maximum(1.0 - std, 0.0, propagate_nan=tl.PropagateNan.ALL), mask=col_mask)


@triton.jit
def _packed_tile_index(tile_row, tile_col, tiles_per_side):
    """Slot of upper-triangle tile ``(tile_row <= tile_col)`` when the tiles are stored row by row."""
    return tile_row * tiles_per_side - (tile_row * (tile_row - 1)) // 2 + (tile_col - tile_row)


@triton.jit
def _store_tile_results(
    acc, partial, slot, pid_m, pid_n, tiles_m, rows_a, rows_b, row_offset, product_ptr, sp_s, sp_r, sp_c,
    SYMMETRIC: tl.constexpr, MASK_DIAGONAL: tl.constexpr, STORE_PRODUCT: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """A finished ``[BLOCK_M, BLOCK_N]`` tile of ``P``: its ``Σ P²`` into ``partial`` (doubled for
    off-diagonal tiles when ``A = B`` and only the upper triangle is visited) and, when asked, the
    tile into ``product``: its packed upper-triangle slot when ``PACKED`` (symmetric only), else its
    place in a dense ``[S, rows_a, rows_b]`` (and its mirror)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if MASK_DIAGONAL:
        acc = tl.where(rows[:, None] + row_offset == cols[None, :], 0.0, acc)
    squares = tl.sum(acc * acc)
    if SYMMETRIC:
        squares = tl.where(pid_n != pid_m, 2.0 * squares, squares)
    tl.store(partial, squares)
    if STORE_PRODUCT:
        base = product_ptr + slot * sp_s
        if PACKED:
            # Rows and columns past the data are zero (masked loads), so whole tiles are stored.
            tile = _packed_tile_index(pid_m, pid_n, tiles_m)
            local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            tl.store(base + tile * (BLOCK_M * BLOCK_N) + local, acc)
        else:
            mask = (rows[:, None] < rows_a) & (cols[None, :] < rows_b)
            tl.store(base + rows[:, None] * sp_r + cols[None, :] * sp_c, acc, mask=mask)
            if SYMMETRIC:
                mirror = mask & (pid_n != pid_m)
                tl.store(base + cols[None, :] * sp_r + rows[:, None] * sp_c, acc, mask=mirror)


@triton.jit
def _product_tiles_kernel(
    a_ptr, b_ptr, mean_ptr, partial_ptr, product_ptr, split_ptr,
    rows_a, rows_b, inner, row_offset, mean_s, splits, split_depth,
    sa_s, sa_r, sa_k, sb_s, sb_r, sb_k,
    sp_s, sp_r, sp_c,
    SYMMETRIC: tl.constexpr, MEAN_ON_ROWS: tl.constexpr, MASK_DIAGONAL: tl.constexpr, STORE_PRODUCT: tl.constexpr,
    PACKED: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, EVEN: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` tile of ``P = A Bᵀ`` (centred on the fly), or with ``SPLIT`` its sum
    over one ``split_depth`` range of the inner axis (a multiple of ``BLOCK_K``), stored raw into
    ``split_ptr`` for :func:`_combine_splits_kernel`. Axis 0 of the grid runs over slots x splits."""
    slot = tl.program_id(0) // splits
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    partial = partial_ptr + (slot * tl.num_programs(1) + pid_m) * tl.num_programs(2) + pid_n
    if SYMMETRIC:
        if pid_n < pid_m:
            if not SPLIT:
                tl.store(partial, tl.zeros([], dtype=ACC))  # its mirror counts it twice
            return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_base = a_ptr + slot * sa_s
    b_base = b_ptr + slot * sb_s
    # A may be a row chunk starting at global row ``row_offset`` (means and the diagonal use global rows).
    a_mean = mean_ptr + slot * mean_s + (row_offset if MEAN_ON_ROWS else 0)
    b_mean = mean_ptr + slot * mean_s
    k_start = (tl.program_id(0) % splits) * split_depth
    k_end = tl.minimum(k_start + split_depth, inner)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for start in range(k_start, k_end, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        a = _load_centred(a_base, rows, ks, sa_r, sa_k, rows_a, inner, a_mean, MEAN_ON_ROWS, ACC, ROUND_TF32, EVEN)
        # The Bᵀ tile [BLOCK_K, BLOCK_N] holds B's rows as columns, so its mean runs the other way.
        if MEAN_ON_ROWS:
            b = _load_centred(b_base, ks, cols, sb_k, sb_r, inner, rows_b, b_mean, False, ACC, ROUND_TF32, EVEN)
        else:
            b = _load_centred(b_base, ks, cols, sb_k, sb_r, inner, rows_b, b_mean, True, ACC, ROUND_TF32, EVEN)
        acc = _matmul_tile(a, b, acc, USE_DOT, DOT_PRECISION)
    if SPLIT:
        tile = (tl.program_id(0) * tl.num_programs(1) + pid_m) * tl.num_programs(2) + pid_n
        local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(split_ptr + tile * (BLOCK_M * BLOCK_N) + local, acc)
    else:
        _store_tile_results(acc, partial, slot, pid_m, pid_n, tl.num_programs(1), rows_a, rows_b, row_offset, product_ptr, sp_s, sp_r, sp_c,
                            SYMMETRIC, MASK_DIAGONAL, STORE_PRODUCT, PACKED, BLOCK_M, BLOCK_N)


@triton.jit
def _combine_splits_kernel(
    split_ptr, partial_ptr, product_ptr, splits, rows_a, rows_b, row_offset, sp_s, sp_r, sp_c,
    SYMMETRIC: tl.constexpr, MASK_DIAGONAL: tl.constexpr, STORE_PRODUCT: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """A tile of ``P`` from its split sums, added in split order (the result does not depend on which
    split finished first), then finished like an unsplit tile."""
    slot = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    partial = partial_ptr + (slot * tl.num_programs(1) + pid_m) * tl.num_programs(2) + pid_n
    if SYMMETRIC:
        if pid_n < pid_m:
            tl.store(partial, tl.zeros([], dtype=ACC))
            return
    local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for split in range(0, splits):
        tile = ((slot * splits + split) * tl.num_programs(1) + pid_m) * tl.num_programs(2) + pid_n
        acc += tl.load(split_ptr + tile * (BLOCK_M * BLOCK_N) + local)
    _store_tile_results(acc, partial, slot, pid_m, pid_n, tl.num_programs(1), rows_a, rows_b, row_offset, product_ptr, sp_s, sp_r, sp_c,
                        SYMMETRIC, MASK_DIAGONAL, STORE_PRODUCT, PACKED, BLOCK_M, BLOCK_N)


@triton.jit
def _finish_forward_kernel(
    partial_ptr, sumsq_ptr, hinge_ptr, out_ptr, tiles, slots_dim, batch_rows,
    WITH_COVARIANCE: tl.constexpr, GRAM: tl.constexpr, BLOCK: tl.constexpr,
):
    """``out = [variance, covariance]`` from the per-column hinges, the product's per-tile square
    sums and (Gram form) ``d``: one program, sums in float64, because ``‖A Aᵀ‖² − Σ d²`` cancels."""
    offsets = tl.arange(0, BLOCK)
    hinge = tl.zeros([BLOCK], dtype=tl.float64)
    squares = tl.zeros([BLOCK], dtype=tl.float64)
    diagonal = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, slots_dim, BLOCK):
        mask = start + offsets < slots_dim
        hinge += tl.load(hinge_ptr + start + offsets, mask=mask, other=0.0).to(tl.float64)
        if WITH_COVARIANCE and GRAM:
            d = tl.load(sumsq_ptr + start + offsets, mask=mask, other=0.0).to(tl.float64)
            diagonal += d * d
    if WITH_COVARIANCE:
        for start in range(0, tiles, BLOCK):
            squares += tl.load(partial_ptr + start + offsets, mask=start + offsets < tiles, other=0.0).to(tl.float64)
    count = _as_acc(slots_dim, tl.float64)
    dof = _as_acc(batch_rows, tl.float64) - 1.0
    # Mean over slots of each slot's off-diagonal sum / ((n - 1)² D): one sum over every slot.
    covariance = (tl.sum(squares) - tl.sum(diagonal)) / (dof * dof * count)
    tl.store(out_ptr, tl.sum(hinge) / count)
    tl.store(out_ptr + 1, covariance)


@triton.jit
def _accumulate_product(p, b_base, js, cols, sb_r, sb_k, rows_b, inner, b_mean, acc,
                        MEAN_ON_ROWS: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr,
                        EVEN: tl.constexpr):
    """``acc + p @ B[js, cols]`` with ``B`` centred on the fly (``p``: a ``[rows, js]`` block of ``P``)."""
    if ROUND_TF32:
        p = round_to_tf32(p)
    b = _load_centred(b_base, js, cols, sb_r, sb_k, rows_b, inner, b_mean, MEAN_ON_ROWS, ACC, ROUND_TF32, EVEN)
    return _matmul_tile(p, b, acc, USE_DOT, DOT_PRECISION)


@triton.jit
def _as_acc(count, ACC: tl.constexpr):
    """A scalar argument as an ``ACC`` scalar (Triton passes an integer equal to 1 as a constant)."""
    return count + tl.zeros([], dtype=ACC)


@triton.jit
def _gradient_coefficients(sumsq, grad_variance_ptr, scale, batch_rows, dim, eps_hi, eps_lo, GRAM_COVARIANCE: tl.constexpr, ACC: tl.constexpr):
    """Per column of ``X``: ``coef`` in ``∂L/∂X = scale (A Aᵀ) A + coef ⊙ Xc``. The hinge's part is
    ``-g_var / (S D (n - 1)) / std`` where ``std < 1`` (relu'(0) = 0, as in autograd); the Gram form
    adds the covariance's ``-scale d`` (the ``A diag(d)`` term). ``S`` is the grid's slot count."""
    dof = _as_acc(batch_rows, ACC) - 1.0
    std = tl.sqrt(sumsq / dof + _eps(eps_hi, eps_lo, ACC))
    hinge_scale = tl.load(grad_variance_ptr).to(ACC) / (_as_acc(tl.num_programs(0), ACC) * _as_acc(dim, ACC) * dof)
    coef = tl.where(std < 1.0, -hinge_scale / std, 0.0)
    if GRAM_COVARIANCE:
        coef = coef - scale * sumsq
    return coef


@triton.jit
def _apply_product_kernel(
    a_ptr, b_ptr, product_ptr, mean_ptr, sumsq_ptr, grad_variance_ptr, grad_covariance_ptr, out_ptr,
    rows_a, rows_b, inner, row_offset, mean_s, batch_rows, dim, eps_hi, eps_lo,
    sa_s, sa_r, sa_k, sb_s, sb_r, sb_k, sp_s, sp_r, sp_c, so_s, so_r, so_k,
    HAS_PRODUCT: tl.constexpr, PACKED_BLOCK: tl.constexpr, MEAN_ON_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, EVEN: tl.constexpr,
):
    """``out = scale · (P B) + coef ⊙ A`` for a ``[BLOCK_M, BLOCK_N]`` tile of ``A``'s shape, with
    ``P = A Bᵀ`` given and ``A``, ``B`` centred on the fly; ``coef`` (per column of ``X``) and
    ``scale`` come from ``d`` and the two terms' gradients (:func:`_gradient_coefficients`).

    ``PACKED_BLOCK > 0``: ``P`` is symmetric and given as its packed upper-triangle tiles of that
    size (``BLOCK_M`` and ``BLOCK_K`` divide it); blocks left of the diagonal are read transposed."""
    slot = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    a_offset = row_offset if MEAN_ON_ROWS else 0
    b_mean = mean_ptr + slot * mean_s
    a = _load_centred(a_ptr + slot * sa_s, rows, cols, sa_r, sa_k, rows_a, inner, b_mean + a_offset, MEAN_ON_ROWS, ACC, False)
    dof = _as_acc(batch_rows, ACC) - 1.0
    scale = 4.0 * tl.load(grad_covariance_ptr).to(ACC) / (dof * dof * _as_acc(dim, ACC) * _as_acc(tl.num_programs(0), ACC))
    if MEAN_ON_ROWS:
        sumsq = tl.load(sumsq_ptr + slot * mean_s + a_offset + rows, mask=rows < rows_a, other=0.0)
        coef = _gradient_coefficients(sumsq, grad_variance_ptr, scale, batch_rows, dim, eps_hi, eps_lo, False, ACC)[:, None]
    else:
        sumsq = tl.load(sumsq_ptr + slot * mean_s + cols, mask=cols < inner, other=0.0)
        # With the covariance (HAS_PRODUCT), the Gram form's coefficient carries its -scale d.
        coef = _gradient_coefficients(sumsq, grad_variance_ptr, scale, batch_rows, dim, eps_hi, eps_lo, HAS_PRODUCT, ACC)[None, :]
    result = coef * a
    if HAS_PRODUCT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        p_base = product_ptr + slot * sp_s
        b_base = b_ptr + slot * sb_s
        if PACKED_BLOCK > 0:
            tiles_per_side = tl.cdiv(rows_b, PACKED_BLOCK)
            tile_row = (tl.program_id(1) * BLOCK_M) // PACKED_BLOCK
            local_rows = (tl.program_id(1) * BLOCK_M) % PACKED_BLOCK + tl.arange(0, BLOCK_M)
            diagonal_start = tile_row * PACKED_BLOCK
            # Left of the diagonal block: P[rows, js] = tile(js's, rows')[js, rows], read transposed.
            for start in range(0, diagonal_start, BLOCK_K):
                js = start + tl.arange(0, BLOCK_K)
                tile = _packed_tile_index(start // PACKED_BLOCK, tile_row, tiles_per_side)
                local_js = start % PACKED_BLOCK + tl.arange(0, BLOCK_K)
                p = tl.load(p_base + tile * (PACKED_BLOCK * PACKED_BLOCK) + local_js[None, :] * PACKED_BLOCK + local_rows[:, None]).to(ACC)
                acc = _accumulate_product(p, b_base, js, cols, sb_r, sb_k, rows_b, inner, b_mean, acc, MEAN_ON_ROWS, ACC, USE_DOT, DOT_PRECISION, ROUND_TF32, EVEN)
            for start in range(diagonal_start, rows_b, BLOCK_K):
                js = start + tl.arange(0, BLOCK_K)
                tile = _packed_tile_index(tile_row, start // PACKED_BLOCK, tiles_per_side)
                local_js = start % PACKED_BLOCK + tl.arange(0, BLOCK_K)
                p = tl.load(p_base + tile * (PACKED_BLOCK * PACKED_BLOCK) + local_rows[:, None] * PACKED_BLOCK + local_js[None, :]).to(ACC)
                acc = _accumulate_product(p, b_base, js, cols, sb_r, sb_k, rows_b, inner, b_mean, acc, MEAN_ON_ROWS, ACC, USE_DOT, DOT_PRECISION, ROUND_TF32, EVEN)
        else:
            for start in range(0, rows_b, BLOCK_K):
                js = start + tl.arange(0, BLOCK_K)
                p_mask = (rows[:, None] < rows_a) & (js[None, :] < rows_b)
                p = tl.load(p_base + rows[:, None] * sp_r + js[None, :] * sp_c, mask=p_mask, other=0.0).to(ACC)
                acc = _accumulate_product(p, b_base, js, cols, sb_r, sb_k, rows_b, inner, b_mean, acc, MEAN_ON_ROWS, ACC, USE_DOT, DOT_PRECISION, ROUND_TF32, EVEN)
        result += scale * acc
    mask = (rows[:, None] < rows_a) & (cols[None, :] < inner)
    tl.store(out_ptr + slot * so_s + rows[:, None] * so_r + cols[None, :] * so_k, result, mask=mask)


# ----------------------------------------------------------------------------- launchers


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _tile_config(x: torch.Tensor):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, use_dot) for products on ``x``."""
    return tiles_for(x.dtype, on_gpu=x.is_cuda and not triton_interpreted())


def tiles_for(dtype: torch.dtype, on_gpu: bool):
    """:func:`_tile_config` for compiled kernels (``on_gpu``) or for Triton's interpreter."""
    if dtype == torch.float64:
        return (16, 16, 16, 4, 1, False) if on_gpu else (32, 32, 32, 4, 1, False)
    if on_gpu:
        return 128, 128, 32, 8, 3, True
    # The interpreter pays per block operation, not per element: few, large tiles.
    return 64, 64, 64, 4, 1, True


def _apply_blocks(x: torch.Tensor):
    """(BLOCK_M, BLOCK_N, BLOCK_K) of the backward's ``(A Aᵀ) A`` tiles on ``x``."""
    if x.is_cuda and not triton_interpreted() and x.dtype != torch.float64:
        return GPU_APPLY_BLOCKS["BLOCK_M"], GPU_APPLY_BLOCKS["BLOCK_N"], GPU_APPLY_BLOCKS["BLOCK_K"]
    return _tile_config(x)[:3]


def _dot_precision(x: torch.Tensor, dim: int) -> str:
    """TF32 only where its rounding errors average out over many columns: with few columns the
    penalty is a handful of (possibly cancelling) dot products, and the products are cheap anyway."""
    if x.dtype == torch.float64:
        return "ieee"
    if FP32_DOT_PRECISION == "tf32" and dim < TF32_MIN_COLUMNS:
        return "tf32x3"
    return FP32_DOT_PRECISION


def eps_halves(eps: float) -> Tuple[float, float]:
    """``eps`` as a float32 value plus the float32 remainder: Triton passes a Python float as float32,
    which moves ``1e-4`` by 2.5e-12 and a float64 hinge by as much (thousands of float64 ulps)."""
    hi = struct.unpack("f", struct.pack("f", eps))[0]
    return hi, eps - hi


def column_stats(x: torch.Tensor, eps: float):
    """``(mean, d, hinge)``, each ``[S, D]`` in the accumulator dtype, for ``x [n, S, D]``."""
    n, slots, dim = x.shape
    acc = accumulator_dtype(x.dtype)
    mean, sumsq, hinge = torch.empty(3, slots, dim, device=x.device, dtype=acc).unbind()
    block_d = 64 if x.is_cuda and not triton_interpreted() else 128
    block_n = 32 if x.is_cuda and not triton_interpreted() else 64
    grid = (slots, cdiv(dim, block_d))
    _column_stats_kernel[grid](
        x, mean, sumsq, hinge, n, dim, x.stride(0), x.stride(1), x.stride(2), *eps_halves(eps),
        BLOCK_N=block_n, BLOCK_D=block_d, ACC=_tl_dtype(x.dtype), num_warps=4,
    )
    return mean, sumsq, hinge


@dataclass
class Operand:
    """``A`` (or ``B``) as a strided view of ``x [n, S, D]``: ``Xc`` when ``transposed`` is False
    (rows = samples), ``Xcᵀ`` when True (rows = columns of ``X``)."""

    x: torch.Tensor
    transposed: bool
    offset: int = 0  # global index of the first row, for row chunks

    @property
    def rows(self) -> int:
        return self.x.shape[2] if self.transposed else self.x.shape[0]

    @property
    def inner(self) -> int:
        return self.x.shape[0] if self.transposed else self.x.shape[2]

    def strides(self):
        s_n, s_s, s_d = self.x.stride()
        return (s_s, s_d, s_n) if self.transposed else (s_s, s_n, s_d)

    def row_slice(self, start: int, stop: int) -> "Operand":
        if self.transposed:
            return Operand(self.x[:, :, start:stop], True, self.offset + start)
        return Operand(self.x[start:stop], False, self.offset + start)


def use_gram_form(n: int, dim: int) -> bool:
    """Gram form (``n x n`` products) when it takes fewer multiply-adds than the direct ``D x D`` one."""
    return n < dim


def packed_product_shape(x: torch.Tensor, side: int) -> Tuple[int, int, int, int]:
    """``[S, T(T+1)/2, BLOCK, BLOCK]``: the upper-triangle tiles of a symmetric ``[side, side]`` product
    per slot of ``x [n, S, D]``, in the tile size its products run with (``T = ceil(side / BLOCK)``)."""
    block = _tile_config(x)[0]
    per_side = cdiv(side, block)
    return x.shape[1], per_side * (per_side + 1) // 2, block, block


def packed_product_fits(x: torch.Tensor, side: int) -> bool:
    itemsize = torch.finfo(accumulator_dtype(x.dtype)).bits // 8
    shape = packed_product_shape(x, side)
    budget = max(SAVED_PRODUCT_BYTES, SAVED_PRODUCT_FRACTION * x.numel() * itemsize)
    return shape[0] * shape[1] * shape[2] * shape[3] * itemsize <= budget


def multiprocessors(device: torch.device) -> int:
    """How many programs run at once, about: the GPU's multiprocessor count (one product tile each:
    their registers allow no second). The interpreter runs programs one by one."""
    if device.type == "cuda" and not triton_interpreted():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_MULTIPROCESSORS


def inner_splits(active_tiles: int, grid_tiles: int, inner: int, block_k: int, tile_bytes: int, device: torch.device) -> Tuple[int, int]:
    """``(splits, depth)``: into how many ranges of ``depth`` (a multiple of ``block_k``) the inner
    axis is cut so that ``active_tiles`` product tiles (of a grid of ``grid_tiles``) fill the GPU
    (1: not cut). Only long inner axes are cut, and only as far as the split sums of the whole grid
    fit ``SPLIT_SUMS_BYTES``."""
    if inner < SPLIT_MIN_INNER:
        return 1, inner
    splits = min(multiprocessors(device) // active_tiles, inner // SPLIT_MIN_DEPTH, SPLIT_SUMS_BYTES // (grid_tiles * tile_bytes))
    if splits < 2:
        return 1, inner
    depth = cdiv(cdiv(inner, splits), block_k) * block_k
    return cdiv(inner, depth), depth


def product_tile_squares(a: Operand, b: Operand, mean: torch.Tensor, symmetric: bool, product: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Σ (A Bᵀ)²`` per tile, ``[S, tiles_a, tiles_b]`` in the accumulator dtype (diagonal excluded
    for the direct form; with ``symmetric``, tiles below the diagonal hold 0 and those above count twice).

    When given, ``product`` receives ``A Bᵀ``: a dense ``[S, rows_a, rows_b]``, or (symmetric only)
    the packed upper-triangle tiles of :func:`packed_product_shape`. When there are fewer tiles than
    the GPU has multiprocessors (``n`` up to 1024 at D 8192, one rank's rows in the row-block form), each
    tile's inner axis is cut into ranges summed by separate programs (:func:`inner_splits`), then
    added up in a fixed order by a second launch."""
    x = a.x
    block_m, block_n, block_k, warps, stages, use_dot = _tile_config(x)
    slots = x.shape[1]
    grid = (slots, cdiv(a.rows, block_m), cdiv(b.rows, block_n))
    acc = accumulator_dtype(x.dtype)
    partial = torch.empty(grid, device=x.device, dtype=acc)
    precision = _dot_precision(x, mean.shape[1])
    store = product is not None
    packed = store and product.dim() == 4
    if packed and (not symmetric or tuple(product.shape) != packed_product_shape(x, a.rows)):
        raise ValueError(f"a packed product needs a symmetric product of shape {packed_product_shape(x, a.rows)}, got {tuple(product.shape)}")
    target = product if store else partial
    sp = product.stride()[:3] if store else (0, 0, 0)
    active = slots * (grid[1] * (grid[1] + 1) // 2 if symmetric else grid[1] * grid[2])
    tile_bytes = block_m * block_n * torch.finfo(acc).bits // 8
    splits, depth = inner_splits(active, slots * grid[1] * grid[2], a.inner, block_k, tile_bytes, x.device)
    split_sums = torch.empty(slots * splits, grid[1], grid[2], block_m, block_n, device=x.device, dtype=acc) if splits > 1 else partial
    flags = dict(SYMMETRIC=symmetric, MASK_DIAGONAL=a.transposed, STORE_PRODUCT=store, PACKED=packed, BLOCK_M=block_m, BLOCK_N=block_n)
    _product_tiles_kernel[(slots * splits, grid[1], grid[2])](
        a.x, b.x, mean, partial, target, split_sums,
        a.rows, b.rows, a.inner, a.offset, mean.stride(0), splits, depth, *a.strides(), *b.strides(), *sp,
        MEAN_ON_ROWS=a.transposed, SPLIT=splits > 1, **flags,
        EVEN=a.rows % block_m == 0 and b.rows % block_n == 0 and a.inner % block_k == 0,
        BLOCK_K=block_k, ACC=_tl_dtype(x.dtype), USE_DOT=use_dot,
        DOT_PRECISION=precision, ROUND_TF32=precision == "tf32", num_warps=warps, num_stages=stages,
    )
    if splits > 1:
        _combine_splits_kernel[grid](
            split_sums, partial, target, splits, a.rows, b.rows, a.offset, *sp, **flags, ACC=_tl_dtype(x.dtype), num_warps=warps,
        )
    return partial


def product_square_sums(a: Operand, b: Operand, mean: torch.Tensor, symmetric: bool, product: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Σ (A Bᵀ)²`` per slot, ``[S]`` (see :func:`product_tile_squares`)."""
    return product_tile_squares(a, b, mean, symmetric, product).sum(dim=(1, 2))


def finish_forward(partial: Optional[torch.Tensor], sumsq: torch.Tensor, hinge: torch.Tensor, batch_rows: int, gram: bool) -> torch.Tensor:
    """``[variance, covariance]`` in the accumulator dtype: the mean hinge, and the mean over slots of
    ``(Σ partial − Σ d² (Gram form)) / ((n − 1)² D)``; covariance 0 without ``partial``."""
    out = torch.empty(2, device=sumsq.device, dtype=sumsq.dtype)
    with_covariance = partial is not None
    _finish_forward_kernel[(1,)](
        partial if with_covariance else sumsq, sumsq, hinge, out, partial.numel() if with_covariance else 0, sumsq.numel(), batch_rows,
        WITH_COVARIANCE=with_covariance, GRAM=gram, BLOCK=1024, num_warps=4,
    )
    return out


@dataclass
class GradientTerms:
    """What the backward's per-column coefficients are computed from (inside the apply kernel)."""

    sumsq: torch.Tensor  # [S, D]: d, the centred column sums of squares of the whole batch
    grad_variance: torch.Tensor  # the variance term's incoming gradient (a scalar)
    grad_covariance: torch.Tensor  # the covariance term's
    batch_rows: int  # n of the whole batch (all ranks' rows in the row-block form)
    eps: float


def apply_product(a: Operand, b: Optional[Operand], product: Optional[torch.Tensor], mean, terms: GradientTerms, out: Operand) -> None:
    """``out = scale (A Bᵀ) B + coef ⊙ A`` (``product = A Bᵀ``, dense or packed as written by
    :func:`product_square_sums`; without it, just ``coef ⊙ A``: the variance term alone)."""
    x = a.x
    _, _, _, warps, stages, use_dot = _tile_config(x)
    block_m, block_n, block_k = _apply_blocks(x)
    slots, dim = terms.sumsq.shape  # D of the whole X: a row chunk of Xcᵀ holds only some of its columns
    grid = (slots, cdiv(a.rows, block_m), cdiv(a.inner, block_n))
    precision = _dot_precision(x, mean.shape[1])
    has_product = product is not None
    packed_block = product.shape[-1] if has_product and product.dim() == 4 else 0
    if packed_block and (packed_block % block_m or packed_block % block_k or a.rows != b.rows):
        raise ValueError(f"packed product tiles of {packed_block} need row blocks dividing them and a symmetric product")
    b = b if has_product else a
    product = product if has_product else terms.sumsq
    sp = product.stride()[:3] if has_product else (0, 0, 0)
    _apply_product_kernel[grid](
        a.x, b.x, product, mean, terms.sumsq, terms.grad_variance, terms.grad_covariance, out.x,
        a.rows, b.rows, a.inner, a.offset, mean.stride(0), terms.batch_rows, dim, *eps_halves(terms.eps),
        *a.strides(), *b.strides(), *sp, *out.strides(),
        HAS_PRODUCT=has_product, PACKED_BLOCK=packed_block, MEAN_ON_ROWS=a.transposed,
        EVEN=b.rows % block_k == 0 and a.inner % block_n == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, ACC=_tl_dtype(x.dtype), USE_DOT=use_dot,
        DOT_PRECISION=precision, ROUND_TF32=precision == "tf32", num_warps=warps, num_stages=stages,
    )


def chunk_rows(rows_b: int, slots: int, itemsize: int) -> int:
    """How many rows of ``A Bᵀ`` fit in ``SAVED_PRODUCT_BYTES``: a multiple of 64, at least 64."""
    per_row = max(1, rows_b * slots * itemsize)
    return max(64, (SAVED_PRODUCT_BYTES // per_row) // 64 * 64)


def product_fits(rows_a: int, rows_b: int, slots: int, itemsize: int) -> bool:
    return rows_a * rows_b * slots * itemsize <= SAVED_PRODUCT_BYTES


def covariance_gradient(a: Operand, b: Operand, saved_product: Optional[torch.Tensor], mean, terms: GradientTerms, out: Operand) -> None:
    """``out = scale (A Bᵀ) B + coef ⊙ A``, recomputing ``A Bᵀ`` in row chunks when it was not saved."""
    if saved_product is not None:
        apply_product(a, b, saved_product, mean, terms, out)
        return
    acc = accumulator_dtype(a.x.dtype)
    slots = a.x.shape[1]
    step = chunk_rows(b.rows, slots, torch.finfo(acc).bits // 8)
    buffer = torch.empty(slots, min(step, a.rows), b.rows, device=a.x.device, dtype=acc)
    for start in range(0, a.rows, step):
        stop = min(start + step, a.rows)
        part = buffer[:, : stop - start]
        chunk = a.row_slice(start, stop)
        product_tile_squares(chunk, b, mean, symmetric=False, product=part)  # only the product is needed here
        apply_product(chunk, b, part, mean, terms, out.row_slice(start, stop))


def covariance_flops(n_a: int, n_b: int, dim: int, slots: int = 1) -> float:
    """Multiply-add FLOPs (2 per pair) of one ``A Bᵀ`` product: ``2 n_a n_b dim`` per slot."""
    return 2.0 * n_a * n_b * dim * slots


__all__ = [
    "FP32_DOT_PRECISION",
    "SAVED_PRODUCT_BYTES",
    "SAVED_PRODUCT_FRACTION",
    "TF32_MIN_COLUMNS",
    "GradientTerms",
    "Operand",
    "accumulator_dtype",
    "column_stats",
    "use_gram_form",
    "product_square_sums",
    "product_tile_squares",
    "inner_splits",
    "multiprocessors",
    "finish_forward",
    "apply_product",
    "covariance_gradient",
    "product_fits",
    "packed_product_shape",
    "packed_product_fits",
    "covariance_flops",
]
