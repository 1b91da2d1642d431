"""Triton kernels for nearest-neighbour matching (VICRegL): fused distance + argmin, then top-k rows.

Two kernels, each launched once for any number of (query, candidates) pairs:

* ``_nearest_neighbor_kernel``: one program per (group, block of query rows), where a group is one
  image of one pair; a group's row blocks are consecutive programs, so they run side by side and
  read each candidate tile from L2 rather than each from memory. It walks the candidates tile by
  tile, scores them with ``|c|^2 - 2 q.c`` on ``tl.dot`` (tensor cores for fp16/bf16, fp32 accumulation; ``input_precision=FP32_INPUT_PRECISION``, "ieee"
  by default, for float32 so TF32 never creeps in unasked) or, for D <= ``DIRECT_MAX_D`` (locations, D = 2), with exact squared
  differences, and keeps a running minimum and its index. Lower candidate index wins ties: tiles are
  visited in ascending order, a later tile must be strictly better, and the in-tile argmin breaks
  ties to the left. The ``B x N x M`` matrix is never written. The winning candidate's distance is
  then recomputed from differences, so the returned distance does not carry the cancellation error
  of the expansion (the choice of winner still does: candidates within about float32 epsilon times
  ``|q|^2 + |c|^2`` of each other in squared distance may swap). When every row stride and offset is a multiple of 16 elements the scan runs in
  a branch where the compiler can see that, so tiles stream in with vector asynchronous copies.
* ``_select_rows_kernel``: one program per group. Row ``i`` is kept when fewer than ``k`` rows come
  before it in the order (distance, NaN after every number; row); kept rows are written in ascending row order with a
  running prefix count, so no sort is needed.

Pairs are described by small int64 tables (one row per group), so views of different sizes (7x7
and 3x3 grids) and different widths (D = 512 features and D = 2 locations) share a launch, and so
do different dtypes of the two widths (bfloat16 features with float32 locations).

The inputs are read where they lie, never gathered into one buffer: the matching kernel takes two
base pointers (one wide input, one narrow input, each typed as its dtype) and reaches every other
input through its element offset from its base, as grouped-GEMM kernels do across allocations in
the device's flat address space. The
group table holds only what the shapes decide (each row's input slots and offsets inside them), so
it is built and uploaded once per shape; the slots' offsets from the base change with the data
pointers every step and travel in a tiny per-call tensor, uploaded without a host sync.
"""

from __future__ import annotations

import inspect
import itertools
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import torch
import triton
import triton.language as tl
import triton.testing

from fastdense.kernels._launch import cdiv, triton_interpreted

# Squared differences are exact and cheap for the location case (D = 2); above this width the
# tensor-core expansion wins. A power of two: it is also the width of the narrow rows' tile.
DIRECT_MAX_D = 8
# How float32 inputs enter tl.dot for the search (the returned distance is always recomputed exactly
# from differences). "ieee": exact float32 products on the CUDA cores, the default, since CONVENTIONS
# allows index disagreement only on ties within 1e-6. "tf32x3": three TF32 tensor-core products,
# about float32 accuracy (the search's error is dominated by the |c|^2 - 2 q.c expansion either way).
# "tf32": one TF32 product (10-bit mantissa), fastest, but near neighbours closer than ~1e-3
# relative may swap; opt in knowingly.
FP32_INPUT_PRECISION = "ieee"
# Group table columns: query slot, candidate slot, query and candidate offset (elements) inside their
# slot's tensor, N, M, D, output row offset. A slot's own offset from the base pointer is read from
# the per-call slot table.
_NN_COLUMNS = 8
# Selection table columns: distance row offset, N, k, output offset.
_SELECT_COLUMNS = 4


@triton.jit
def _direct_scan(q_rows, c_base, row_ok, m, d, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Running (min, argmin) of exact squared differences, for narrow rows (locations, D = 2): the
    minimum is the winner's squared distance, summed in the same order as a recomputation would."""
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_index = tl.zeros([BLOCK_N], tl.int64)
    for col0 in range(0, m, BLOCK_M):
        cols = col0 + tl.arange(0, BLOCK_M)
        col_ok = cols < m
        c_rows = c_base + cols.to(tl.int64) * d
        score = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for k in range(0, d):
            qk = tl.load(q_rows + k, mask=row_ok, other=0.0).to(tl.float32)
            ck = tl.load(c_rows + k, mask=col_ok, other=0.0).to(tl.float32)
            diff = qk[:, None] - ck[None, :]
            score += diff * diff
        best, best_index = _keep_better(score, col_ok, col0, best, best_index)
    return best, best_index


@triton.jit
def _keep_better(score, col_ok, col0, best, best_index):
    """Fold one tile of scores into the running minimum; a later tile must be strictly better. A NaN
    score counts as -inf, so the first NaN candidate wins, as ``torch.argmin`` picks it."""
    score = tl.where(col_ok[None, :], tl.where(score != score, float("-inf"), score), float("inf"))
    tile_best, tile_index = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
    better = tile_best < best
    return tl.where(better, tile_best, best), tl.where(better, tile_index + col0, best_index)


@triton.jit
def _dot_scan(q_rows, c_base, row_ok, m, d, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
              INPUT_PRECISION: tl.constexpr, DOT_IN_FLOAT32: tl.constexpr):
    """Running (min score, argmin) of ``|c|^2 - 2 q.c`` over all candidates, for a block of query rows."""
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_index = tl.zeros([BLOCK_N], tl.int64)  # loop-carried: the type of tile_index + col0
    for col0 in range(0, m, BLOCK_M):
        cols = col0 + tl.arange(0, BLOCK_M)
        col_ok = cols < m
        c_rows = c_base + cols.to(tl.int64) * d
        dots = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        c_square = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, d, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            k_ok = ks < d
            q_tile = tl.load(q_rows[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            c_tile = tl.load(c_rows[:, None] + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if DOT_IN_FLOAT32:
                q_tile = q_tile.to(tl.float32)
                c_tile = c_tile.to(tl.float32)
            dots = tl.dot(q_tile, tl.trans(c_tile), dots, input_precision=INPUT_PRECISION)
            c_float = c_tile.to(tl.float32)
            c_square += tl.sum(c_float * c_float, axis=1)
        # |q|^2 is the same for every candidate of a row, so the argmin does not need it.
        best, best_index = _keep_better(c_square[None, :] - 2.0 * dots, col_ok, col0, best, best_index)
    return best_index


@triton.jit
def _winner_squared_distance(q_rows, c_base, best_index, row_ok, d, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Each row's squared distance to its winner, recomputed from differences (never negative)."""
    matched = c_base + best_index.to(tl.int64) * d
    squared = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, d, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (ks < d)[None, :]
        q_tile = tl.load(q_rows[:, None] + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        c_tile = tl.load(matched[:, None] + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        diff = q_tile - c_tile
        squared += tl.sum(diff * diff, axis=1)
    return squared


@triton.jit
def _nearest_neighbor_kernel(
    base_ptr,
    narrow_base_ptr,
    groups_ptr,
    slot_offsets_ptr,
    dist_ptr,
    index_ptr,
    n_key,
    m_key,
    d_key,
    max_n,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DIRECT_MAX_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,
):
    # A group's row blocks are adjacent in launch order: they scan the same candidates in the same
    # order at about the same time, so all but the first find each candidate tile in L2. (With the
    # group as the fast grid axis, the blocks running at once belonged to ~260 different images and
    # every one of them streamed its candidates from memory.)
    row_blocks = tl.cdiv(max_n, BLOCK_N)
    group = tl.program_id(0) // row_blocks
    entry = groups_ptr + group * 8
    # int64 throughout: an input's offset from the base spans the address space and may be negative.
    q_off = tl.load(slot_offsets_ptr + tl.load(entry)) + tl.load(entry + 2)
    c_off = tl.load(slot_offsets_ptr + tl.load(entry + 1)) + tl.load(entry + 3)
    n = tl.load(entry + 4)
    m = tl.load(entry + 5)
    d = tl.load(entry + 6)
    out_off = tl.load(entry + 7)
    row0 = (tl.program_id(0) % row_blocks) * BLOCK_N
    if row0 < n:
        rows = row0 + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        q_rows = base_ptr + q_off + rows.to(tl.int64) * d
        if d <= DIRECT_MAX_D:
            # Narrow pairs (locations) are read through their own base, which may have another
            # dtype than the wide pairs' (float32 locations beside bfloat16 features): one launch.
            # Their scan's minimum is already the exact squared distance.
            narrow_q_rows = narrow_base_ptr + q_off + rows.to(tl.int64) * d
            squared, best_index = _direct_scan(narrow_q_rows, narrow_base_ptr + c_off, row_ok, m, d, BLOCK_N, BLOCK_M)
        elif (d % 16 == 0) & (q_off % 16 == 0) & (c_off % 16 == 0):
            # The same scan with the row stride and offsets rebuilt as visible multiples of 16: the
            # compiler can then prove 16-byte alignment (the launcher picks an aligned base when it
            # can) and issue vector (and asynchronous, pipelined) loads; with a stride read from the
            # table it must load element by element. Negative offsets are exact multiples too, so
            # the division's rounding direction does not matter.
            d16 = (d // 16) * 16
            q_rows16 = base_ptr + (q_off // 16) * 16 + rows.to(tl.int64) * d16
            c_base16 = base_ptr + (c_off // 16) * 16
            best_index = _dot_scan(q_rows16, c_base16, row_ok, m, d16, BLOCK_N, BLOCK_M, BLOCK_D, INPUT_PRECISION, DOT_IN_FLOAT32)
            squared = tl.zeros([BLOCK_N], tl.float32)
        else:
            best_index = _dot_scan(q_rows, base_ptr + c_off, row_ok, m, d, BLOCK_N, BLOCK_M, BLOCK_D, INPUT_PRECISION, DOT_IN_FLOAT32)
            squared = tl.zeros([BLOCK_N], tl.float32)
        # The expansion's winner, its distance recomputed from differences (never negative); the
        # narrow scan's minimum already is (d = 0 here skips the loop).
        wide_d = tl.where(d > DIRECT_MAX_D, d, 0)
        squared += _winner_squared_distance(q_rows, base_ptr + c_off, best_index, row_ok, wide_d, BLOCK_N, BLOCK_D)
        tl.store(dist_ptr + out_off + rows, tl.sqrt(squared), mask=row_ok)
        tl.store(index_ptr + out_off + rows, best_index.to(tl.int64), mask=row_ok)


@triton.jit
def _select_rows_kernel(dist_ptr, index_ptr, groups_ptr, rows_out_ptr, match_out_ptr, BLOCK: tl.constexpr):
    entry = groups_ptr + tl.program_id(0) * 4
    dist_off = tl.load(entry)
    n = tl.load(entry + 1)
    k = tl.load(entry + 2)
    out_off = tl.load(entry + 3)
    taken = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
    for i0 in range(0, n, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        i_ok = i < n
        di = tl.load(dist_ptr + dist_off + i, mask=i_ok, other=float("inf"))
        # The order of a stable ascending sort: NaN after every number, +inf included.
        i_nan = di != di
        di = tl.where(i_nan, float("inf"), di)
        rank = tl.zeros([BLOCK], tl.int32)
        for j0 in range(0, n, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            dj = tl.load(dist_ptr + dist_off + j, mask=j < n, other=float("inf"))
            j_nan = dj != dj
            dj = tl.where(j_nan, float("inf"), dj)
            same_class = j_nan[None, :] == i_nan[:, None]
            by_value = (dj[None, :] < di[:, None]) | ((dj[None, :] == di[:, None]) & (j[None, :] < i[:, None]))
            ahead = (same_class & by_value) | (i_nan[:, None] & ~j_nan[None, :])
            ahead = ahead & (j < n)[None, :]
            rank += tl.sum(ahead.to(tl.int32), axis=1)
        chosen = (rank < k) & i_ok
        chosen_int = chosen.to(tl.int32)
        position = out_off + taken + tl.cumsum(chosen_int, axis=0) - 1
        match = tl.load(index_ptr + dist_off + i, mask=chosen, other=0)
        tl.store(rows_out_ptr + position, i.to(tl.int64), mask=chosen)
        tl.store(match_out_ptr + position, match, mask=chosen)
        taken += tl.sum(chosen_int, axis=0)


# Tiles tried by the autotuner, per kind of dot: (BLOCK_N, BLOCK_M, BLOCK_D, warps, stages). Each set
# holds only tiles that ptxas fits in registers for sm_90, give or take a few parked addresses
# (benchmarks/sm90.spill_bytes; the sm_90 test checks every one). float32 operands take twice the
# registers of 16-bit ones: the one list for all kinds held 128 x 128 float32 tiles that spilled 0.5
# to 9 KB a thread, which cost tuning time (compiled and timed on every first call of a shape).
_TILES = {
    # fp16/bf16 on tensor cores (wgmma). 64 x 256 reads each query block 4 times over M = 784, not
    # 7: once the candidates come from L2, those re-reads are most of the memory traffic (counted,
    # not timed).
    "tensor_core": (
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (64, 256, 64, 8, 3),
        (64, 256, 32, 8, 4),
        (128, 64, 64, 4, 3),
        (128, 64, 32, 8, 4),
        (64, 128, 64, 4, 3),
        (64, 128, 32, 4, 4),
        (64, 64, 64, 4, 3),
        (16, 32, 64, 4, 2),
    ),
    # float32: exact products on the CUDA cores ("ieee") or TF32 tensor cores ("tf32", and "tf32x3"
    # with three products a step); the same tiles fit both.
    "float32": (
        (128, 64, 32, 8, 4),
        (128, 64, 16, 8, 3),
        (64, 64, 32, 4, 3),
        (64, 64, 16, 4, 4),
        (16, 32, 64, 4, 2),
    ),
}


def _dot_kind(input_precision) -> str:
    """Which tile set serves a launch: ``input_precision`` is None for fp16/bf16 inputs."""
    return "tensor_core" if input_precision is None else "float32"


def _config(tile) -> triton.Config:
    block_n, block_m, block_d, warps, stages = tile
    return triton.Config({"BLOCK_N": block_n, "BLOCK_M": block_m, "BLOCK_D": block_d}, num_warps=warps, num_stages=stages)


def _tuning_configs(kind: str = None) -> List[triton.Config]:
    """The autotuner's configs for one kind of dot, or for all kinds (each tile once)."""
    kinds = [kind] if kind else list(_TILES)
    tiles = list(dict.fromkeys(tile for k in kinds for tile in _TILES[k]))
    return [_config(tile) for tile in tiles]


# Work (n_key * m_key * d_key) below which only tiles of at most 64 x 64 are tried: the whole
# problem is a few tiles, and timing every config would cost more than any of them saves.
_SMALL_WORK = 256 * 256 * 1024


def _prune_configs(configs, named_args, **kwargs):
    kind = set(_TILES[_dot_kind(kwargs.get("INPUT_PRECISION"))])
    configs = [c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], c.kwargs["BLOCK_D"], c.num_warps, c.num_stages) in kind]
    n_key, m_key, d_key = named_args["n_key"], named_args["m_key"], named_args["d_key"]
    if n_key * m_key * d_key > _SMALL_WORK:
        return configs
    small = [c for c in configs if c.kwargs["BLOCK_N"] <= max(16, n_key) and c.kwargs["BLOCK_M"] <= max(32, m_key) and c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_M"] <= 64 * 64]
    return small or configs[-1:]


def _autotune_timer(kernel_call, quantiles):
    """A short timing window per config: the winners differ by large factors, not by percent."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def _autotune(kernel):
    # INPUT_PRECISION is part of the key: float32 launches in different modes tune separately.
    options = {"configs": _tuning_configs(), "key": ["n_key", "m_key", "d_key", "INPUT_PRECISION"], "prune_configs_by": {"early_config_prune": _prune_configs}}
    if "do_bench" in inspect.signature(triton.autotune).parameters:  # triton >= 3.2
        options["do_bench"] = _autotune_timer
    return triton.autotune(**options)(kernel)


_tuned_kernel = _autotune(_nearest_neighbor_kernel)
_SELECT_BLOCK_MAX = 128

_TABLE_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_TABLE_CACHE_SIZE = 64


def _cached_table(key: tuple, build) -> torch.Tensor:
    """Group tables depend only on shapes, so a training loop builds and uploads each one once."""
    table = _TABLE_CACHE.get(key)
    if table is None:
        table = build()
        _TABLE_CACHE[key] = table
        if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    else:
        _TABLE_CACHE.move_to_end(key)
    return table


def _inputs_addressable_from_one_base(device: torch.device) -> bool:
    """Whether the kernel can reach every input from one base pointer.

    On a GPU all allocations share one flat address space. Triton's interpreter runs the kernel on
    host memory: it hands each tensor argument's storage over with ``storage.cpu()``, which is the
    storage itself for CPU tensors (their real addresses, so offsets into other allocations hold)
    but a copy of only the argument's own storage for device tensors, where an offset into another
    allocation would point at device memory the host cannot read.
    """
    return device.type == "cpu" or not triton_interpreted()


def _address_in_place(tensors: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[int], List[torch.Tensor]]:
    """A base tensor and each input's element offset from it, with no copy of contiguous inputs.

    Non-contiguous inputs are copied (once each, however often they are passed); the copies are
    returned so that the caller keeps them alive across the launch. The base is an input whose
    address is 16-byte aligned where there is one, so that Triton specializes the base pointer as
    aligned and the kernel's vector-load branch serves every input whose offset allows it.
    """
    copies: Dict[Tuple[int, tuple, tuple], torch.Tensor] = {}
    dense: List[torch.Tensor] = []
    for t in tensors:
        if not t.is_contiguous():
            key = (t.data_ptr(), tuple(t.shape), t.stride())
            if key not in copies:
                copies[key] = t.contiguous()
            t = copies[key]
        dense.append(t)
    addresses = [t.data_ptr() for t in dense]
    base_slot = next((slot for slot, address in enumerate(addresses) if address % 16 == 0), 0)
    base, itemsize = dense[base_slot], dense[base_slot].element_size()
    byte_offsets = [address - addresses[base_slot] for address in addresses]
    # One launch serves one dtype, and torch never places an element off its own size's alignment.
    assert all(offset % itemsize == 0 for offset in byte_offsets), (itemsize, byte_offsets)
    offsets = [offset // itemsize for offset in byte_offsets]
    return base, offsets, list(copies.values())


def _address_in_one_buffer(tensors: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[int], List[torch.Tensor]]:
    """The fallback for the interpreter on device tensors: every input copied into one flat buffer,
    so that all offsets stay inside the one storage the interpreter moves to the host."""
    parts = [t.reshape(-1) for t in tensors]
    flat = torch.cat(parts)
    offsets, total = [], 0
    for part in parts:
        offsets.append(total)
        total += part.numel()
    return flat, offsets, []


def _upload_slot_offsets(offsets: List[int], device: torch.device) -> torch.Tensor:
    """The per-call slot offsets on ``device``: a pinned staging copy and an asynchronous upload,
    so the host never waits for the GPU (the caching host allocator keeps the staging block until
    the copy has run). Not meant for CUDA-graph capture: a replay would copy from a staging block
    that may hold other data by then."""
    host = torch.tensor(offsets, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _bucket(x: int) -> int:
    """Autotuning key: powers of 4 from 16, so a handful of tunings cover every shape."""
    bucket = 16
    while bucket < x:
        bucket *= 4
    return bucket


def _interpreter_blocks(n_key: int, m_key: int, d_key: int) -> Dict[str, int]:
    """The interpreter's one config: it would time every autotuner config, and its cost is per
    operation, not per element, so tiles as wide as the data (few loop trips) are the fast choice."""
    return {"BLOCK_N": max(min(n_key, 64), 16), "BLOCK_M": max(min(m_key, 64), 16), "BLOCK_D": min(max(d_key, 16), 1024)}


def _is_narrow(query: torch.Tensor) -> bool:
    """Narrow pairs (locations) take the exact-difference scan, read through the kernel's second base."""
    return query.shape[2] <= DIRECT_MAX_D


def _address_inputs(inputs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[int], List[torch.Tensor]]:
    if not inputs:
        return None, [], []
    address = _address_in_place if _inputs_addressable_from_one_base(inputs[0].device) else _address_in_one_buffer
    return address(inputs)


def _launch_nearest_neighbor(queries, candidates, out_rows, dist, index) -> None:
    """Fill ``dist``/``index`` (flat, float32/int64) for pairs whose wide inputs (D > DIRECT_MAX_D)
    share one dtype and whose narrow inputs share one dtype, output rows at ``out_rows``.

    Slot ``i`` is ``queries[i]``, slot ``len(queries) + i`` is ``candidates[i]``: positions, not
    identities, so the group table depends on shapes alone. A slot's offset counts elements from
    its own base: the first wide input's base for wide pairs, the narrow one's for narrow pairs.
    A tensor passed twice (a view that is the query of one pair and the candidates of another)
    fills two slots with the same offset and is read in place either way.
    """
    inputs = list(queries) + list(candidates)
    device = inputs[0].device
    narrow_slots = [_is_narrow(queries[slot % len(queries)]) for slot in range(len(inputs))]
    wide_base, wide_offsets, wide_copies = _address_inputs([t for t, narrow in zip(inputs, narrow_slots) if not narrow])
    narrow_base, narrow_offsets, narrow_copies = _address_inputs([t for t, narrow in zip(inputs, narrow_slots) if narrow])
    wide_iter, narrow_iter = iter(wide_offsets), iter(narrow_offsets)
    slot_offsets = [next(narrow_iter) if narrow else next(wide_iter) for narrow in narrow_slots]
    # A launch without wide (or narrow) pairs never reads that base; any tensor fills its place.
    base = wide_base if wide_base is not None else narrow_base
    narrow_base = narrow_base if narrow_base is not None else base
    shapes = tuple((q.shape[0], q.shape[1], c.shape[1], q.shape[2]) for q, c in zip(queries, candidates))
    key = ("nn", device, tuple(out_rows), shapes)

    def build() -> torch.Tensor:
        rows = []
        for pair, ((b_count, n, m, d), out) in enumerate(zip(shapes, out_rows)):
            for b in range(b_count):
                rows.append((pair, len(shapes) + pair, b * n * d, b * m * d, n, m, d, out + b * n))
        return torch.tensor(rows, dtype=torch.int64).to(device)

    table = _cached_table(key, build)
    slots = _upload_slot_offsets(slot_offsets, device)
    max_n = max(s[1] for s in shapes)
    precision = FP32_INPUT_PRECISION if base.dtype == torch.float32 else None  # fp16/bf16: tensor cores, fp32 accumulation
    # Triton's interpreter multiplies bfloat16 tiles wrongly (numpy has no bfloat16); bf16 values are
    # exact in float32, so upcasting there gives the same products the tensor cores form on a GPU.
    dot_in_float32 = triton_interpreted() and base.dtype == torch.bfloat16
    args = (base, narrow_base, table, slots, dist, index, _bucket(max_n), _bucket(max(s[2] for s in shapes)), _bucket(max(s[3] for s in shapes)), max_n)
    if triton_interpreted():
        blocks = _interpreter_blocks(*args[6:9])
        grid = (table.shape[0] * cdiv(max_n, blocks["BLOCK_N"]),)
        _nearest_neighbor_kernel[grid](*args, **blocks, DIRECT_MAX_D=DIRECT_MAX_D, INPUT_PRECISION=precision, DOT_IN_FLOAT32=dot_in_float32)
    else:
        grid = lambda meta: (table.shape[0] * cdiv(max_n, meta["BLOCK_N"]),)  # noqa: E731
        _tuned_kernel[grid](*args, DIRECT_MAX_D=DIRECT_MAX_D, INPUT_PRECISION=precision, DOT_IN_FLOAT32=dot_in_float32)
    # The copies of non-contiguous inputs are read through the base pointers only, so nothing else
    # holds them: released here, after the launch is queued (the caching allocator reuses their
    # blocks only for work queued later on this stream; the interpreter has finished by now).
    del wide_copies, narrow_copies


def nearest_neighbor_many(queries: Sequence[torch.Tensor], candidates: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """Nearest candidate of every query row, for every pair ``(queries[i] [B_i, N_i, D_i],
    candidates[i] [B_i, M_i, D_i])``.

    One launch serves wide pairs of one dtype together with narrow pairs (D <= DIRECT_MAX_D) of one
    dtype, so a VICRegL step (features in one dtype, locations in the same or another) is one
    launch; only wide pairs of several dtypes (or narrow pairs of several) take one more each.
    Returns flat ``distance`` (float32) and ``index`` (int64) over all query rows, pair after pair,
    and each pair's first row in them. Inputs are assumed validated (float16/bfloat16/float32, same
    device, non-empty).
    """
    starts, total = [], 0
    for q in queries:
        starts.append(total)
        total += q.shape[0] * q.shape[1]
    device = queries[0].device
    dist = torch.empty(total, dtype=torch.float32, device=device)
    index = torch.empty(total, dtype=torch.int64, device=device)
    wide: Dict[torch.dtype, List[int]] = {}
    narrow: Dict[torch.dtype, List[int]] = {}
    for i, q in enumerate(queries):
        (narrow if _is_narrow(q) else wide).setdefault(q.dtype, []).append(i)
    for wide_members, narrow_members in itertools.zip_longest(wide.values(), narrow.values(), fillvalue=[]):
        members = wide_members + narrow_members
        _launch_nearest_neighbor([queries[i] for i in members], [candidates[i] for i in members], [starts[i] for i in members], dist, index)
    return dist, index, starts


def select_rows_many(dist: torch.Tensor, index: torch.Tensor, starts: Sequence[int], shapes: Sequence[Tuple[int, int]], ks: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each pair (its rows at ``starts[i]``, ``shapes[i] = (B, N)``), the ``ks[i]`` rows with the
    smallest distance (ties: lower row) in ascending row order and their nearest candidates; one
    launch for all pairs. Returns flat int64 ``(rows, match)``: pair after pair, each ``[B_i, k_i]``
    row-major."""
    out_starts, total = [], 0
    for (b_count, _), k in zip(shapes, ks):
        out_starts.append(total)
        total += b_count * k
    key = ("select", dist.device, tuple(starts), tuple(shapes), tuple(ks))

    def build() -> torch.Tensor:
        rows = []
        for (b_count, n), k, start, out in zip(shapes, ks, starts, out_starts):
            for b in range(b_count):
                rows.append((start + b * n, n, k, out + b * k))
        return torch.tensor(rows, dtype=torch.int64).to(dist.device)

    table = _cached_table(key, build)
    rows_out = torch.empty(total, dtype=torch.int64, device=dist.device)
    match_out = torch.empty(total, dtype=torch.int64, device=dist.device)
    block = min(max(_bucket(max(n for _, n in shapes)), 16), _SELECT_BLOCK_MAX)
    _select_rows_kernel[(table.shape[0],)](dist, index, table, rows_out, match_out, BLOCK=block)
    return rows_out, match_out
