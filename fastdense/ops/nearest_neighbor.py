"""Nearest-neighbour matching of local features (VICRegL), feature space and location alike."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from fastdense.ops._dispatch import plain_eager, requested_backend, resolve
from fastdense.ops._validate import check_same_device, check_tensor

# The Triton kernels accumulate in float32; float64 input runs on the reference.
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def nearest_neighbor_reference(query: torch.Tensor, candidates: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference: exact Euclidean distances (differences, not the ``|q|^2 - 2 q.c + |c|^2`` expansion),
    in float32 (float64 for float64 input); ties go to the lowest candidate index."""
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    dist = torch.cdist(query.to(dtype), candidates.to(dtype), compute_mode="donot_use_mm_for_euclid_dist")
    # torch.min does not promise the first index among equal values; argmin's documentation does.
    index = dist.argmin(dim=-1)
    return dist.gather(-1, index[..., None]).squeeze(-1), index


def _backend_for(op: str, tensors: Sequence[torch.Tensor]) -> str:
    """Resolved at run time inside the registered ops, so ``backend()`` blocks and
    ``FASTDENSE_BACKEND`` apply under ``torch.compile`` as in eager mode."""
    triton_can_serve = all(t.dtype in _TRITON_DTYPES for t in tensors)
    if not triton_can_serve and requested_backend() == "triton":
        raise TypeError(f"fastdense.ops.{op}: the triton backend serves float16, bfloat16 and float32 inputs; float64 runs on the reference backend")
    return resolve(op, tensors, available=("triton",) if triton_can_serve else ())


def _nearest_neighbor(query: torch.Tensor, candidates: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if _backend_for("nearest_neighbor", (query, candidates)) == "triton":
        from fastdense.kernels._launch import on_device_of
        from fastdense.kernels.nearest_neighbor import nearest_neighbor_many

        with on_device_of(query):
            distance, index, _ = nearest_neighbor_many([query], [candidates])
        return distance.view(query.shape[:2]), index.view(query.shape[:2])
    return nearest_neighbor_reference(query, candidates)


# The custom ops serve torch.compile, tracing, tensor subclasses and functorch transforms. Eager calls
# on plain tensors skip their Python layer: a quarter of one pair's host time, an eighth of a VICRegL
# step's 56 pairs (one CPU core: benchmarks/bench_nearest_neighbor.py --host).
@torch.library.custom_op("fastdense::nearest_neighbor", mutates_args=())
def _nearest_neighbor_op(query: torch.Tensor, candidates: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return _nearest_neighbor(query, candidates)


@_nearest_neighbor_op.register_fake
def _(query, candidates):
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    shape = query.shape[:2]
    return query.new_empty(shape, dtype=dtype), query.new_empty(shape, dtype=torch.int64)


def _pairs_many(queries: List[torch.Tensor], candidates: List[torch.Tensor], ks: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat int64 ``(rows, match)``, pair after pair, each pair's ``[B_i, k_i]`` block row-major (one
    buffer per output: a custom op may not return views of one another)."""
    if _backend_for("nearest_neighbor_pairs_many", list(queries) + list(candidates)) == "triton":
        from fastdense.kernels._launch import on_device_of
        from fastdense.kernels.nearest_neighbor import nearest_neighbor_many, select_rows_many

        with on_device_of(queries[0]):
            distance, index, starts = nearest_neighbor_many(queries, candidates)
            return select_rows_many(distance, index, starts, [tuple(q.shape[:2]) for q in queries], ks)
    rows_list, match_list = [], []
    for query, cands, k in zip(queries, candidates, ks):
        distance, index = nearest_neighbor_reference(query, cands)
        rows = select_rows(distance, k)
        rows_list.append(rows.reshape(-1))
        match_list.append(index.gather(1, rows).reshape(-1))
    return torch.cat(rows_list), torch.cat(match_list)


@torch.library.custom_op("fastdense::nearest_neighbor_pairs_many", mutates_args=())
def _pairs_many_op(queries: List[torch.Tensor], candidates: List[torch.Tensor], ks: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    return _pairs_many(queries, candidates, ks)


@_pairs_many_op.register_fake
def _(queries, candidates, ks):
    total = sum(q.shape[0] * k for q, k in zip(queries, ks))
    return queries[0].new_empty((total,), dtype=torch.int64), queries[0].new_empty((total,), dtype=torch.int64)


def nearest_neighbor(query: torch.Tensor, candidates: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Distance to and index of each query row's nearest candidate.

    Args:
        query: ``[B, N, D]`` float tensor (``B, N, D >= 1``).
        candidates: ``[B, M, D]`` float tensor, same ``B``, ``D``, dtype and device (``M >= 1``).

    Returns:
        ``(distance, index)``, each ``[B, N]``: float32 Euclidean distances (float64 for float64
        input) and int64 indices into ``M``. Ties go to the lowest index; a NaN distance wins, the
        first NaN candidate, as ``torch.argmin`` picks it. No gradient flows through
        the distances; gather matched features with the index instead. Empty batches (``B = 0``)
        and empty query sets (``N = 0``) are rejected with a ``ValueError``, like empty candidates.

    The Triton kernel (CUDA tensors, or forced) never forms the ``B x N x M`` distance matrix. It
    ranks candidates by ``|c|^2 - 2 q.c`` with float32 accumulation (exact float32 products for
    float32 input, tensor cores for float16/bfloat16), or by exact squared differences for
    ``D <= 8``, and returns the winner's distance from exact differences (never negative, and NaN
    only from NaN input). The expansion's rounding grows with the norms (about float32 epsilon times
    ``|q|^2 + |c|^2``), not with the distance: for ``D > 8``, candidates whose squared distances
    to a row differ by less than that may swap, even an exact copy of the row and a slightly farther
    candidate when the vectors are long compared with the distances between them.

    >>> import torch, fastdense.ops as ops
    >>> q = torch.tensor([[[0.0, 0.0], [3.0, 3.0]]])
    >>> c = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])
    >>> ops.nearest_neighbor(q, c)
    (tensor([[1., 1.]]), tensor([[1, 0]]))
    """
    _check_nn_args(query, candidates)
    if plain_eager(query, candidates):
        with torch.no_grad():
            return _nearest_neighbor(query, candidates)
    return _nearest_neighbor_op(query.detach(), candidates.detach())


def nearest_neighbor_pairs(query: torch.Tensor, candidates: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` query rows closest to their nearest candidate, as pairs of indices.

    Returns ``(query_index, candidate_index)``, each ``[B, k]`` int64: the ``k`` rows with the smallest
    nearest-neighbour distance (ties: lower row first; NaN distances after every number, as a stable
    sort orders them), listed in ascending row order, and each one's nearest candidate. This is
    VICRegL's top-k local matching.

    >>> import torch, fastdense.ops as ops
    >>> q = torch.tensor([[[0.0], [5.0], [1.0]]])
    >>> c = torch.tensor([[[1.1], [4.0]]])
    >>> ops.nearest_neighbor_pairs(q, c, k=2)  # row 2 is 0.1 from candidate 0, row 1 is 1.0 from candidate 1
    (tensor([[1, 2]]), tensor([[1, 0]]))
    """
    _check_nn_args(query, candidates)
    _check_k(k, query)
    return _match_pairs([query], [candidates], [k])[0]


def nearest_neighbor_pairs_many(queries: Sequence[torch.Tensor], candidates: Sequence[torch.Tensor], ks: Sequence[int]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """:func:`nearest_neighbor_pairs` for many pairs at once: ``[(query_index, candidate_index)]``
    for each ``(queries[i] [B_i, N_i, D_i], candidates[i] [B_i, M_i, D_i], ks[i])``.

    The results equal a loop of :func:`nearest_neighbor_pairs`. On the Triton backend one matching
    launch serves wide pairs (D > 8) of one dtype together with narrow pairs (D <= 8, locations) of
    one dtype, whatever their sizes, and every pair shares one selection launch: a VICRegL step's 56
    matchings (2 global 7x7 and 6 local 3x3 views, in feature space D = 512 and in location D = 2)
    take two launches, with float32 or bfloat16 features beside float32 locations alike; only wide
    (or narrow) pairs of several dtypes take one more launch each. The kernel reads contiguous inputs where
    they lie (a view that is the query of one pair and the candidates of another included) and
    copies nothing but non-contiguous inputs, once each.

    >>> import torch, fastdense.ops as ops
    >>> a, b = torch.tensor([[[0.0], [5.0], [1.0]]]), torch.tensor([[[1.1], [4.0]]])
    >>> ops.nearest_neighbor_pairs_many([a, b], [b, a], [2, 1])
    [(tensor([[1, 2]]), tensor([[1, 0]])), (tensor([[0]]), tensor([[2]]))]
    """
    for name, value in (("queries", queries), ("candidates", candidates), ("ks", ks)):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise TypeError(f"{name} must be a sequence (one entry per pair), got {type(value).__name__}")
    queries, candidates, ks = list(queries), list(candidates), list(ks)
    if not queries or not (len(queries) == len(candidates) == len(ks)):
        raise ValueError(f"queries, candidates and ks must be non-empty sequences of the same length, got lengths {len(queries)}, {len(candidates)} and {len(ks)}")
    for i, (query, cands, k) in enumerate(zip(queries, candidates, ks)):
        _check_nn_args(query, cands, f"queries[{i}]", f"candidates[{i}]")
        _check_k(k, query, f"ks[{i}]", f"queries[{i}]")
        check_same_device("queries[0]", queries[0], f"queries[{i}]", query)
    return _match_pairs(queries, candidates, ks)


def _match_pairs(queries: List[torch.Tensor], candidates: List[torch.Tensor], ks: List[int]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """:func:`nearest_neighbor_pairs_many` on validated arguments (each public function names its own)."""
    if plain_eager(*queries, *candidates):
        with torch.no_grad():
            rows, match = _pairs_many(queries, candidates, ks)
    else:
        rows, match = _pairs_many_op([q.detach() for q in queries], [c.detach() for c in candidates], ks)
    sizes = [q.shape[0] * k for q, k in zip(queries, ks)]
    return [
        (r.view(q.shape[0], k), m.view(q.shape[0], k))
        for q, k, r, m in zip(queries, ks, rows.split(sizes), match.split(sizes))
    ]


def select_rows(distance: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[B, k]`` of the ``k`` smallest entries of each row of ``distance [B, N]`` (``1 <= k <= N``),
    ascending. Equal distances keep the lower index (a stable sort).

    >>> select_rows(torch.tensor([[0.5, 0.1, 0.3, 0.1]]), k=3)
    tensor([[1, 2, 3]])
    """
    check_tensor(distance, "distance", "[B, N]", dims=2)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= distance.shape[1]:
        raise ValueError(f"k must be an int in [1, N] for distance of shape [B, N] = {list(distance.shape)}, got {k!r}")
    order = torch.sort(distance, dim=1, stable=True).indices[:, :k]
    return torch.sort(order, dim=1).values


def _check_k(k, query: torch.Tensor, k_name: str = "k", query_name: str = "query") -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= query.shape[1]:
        raise ValueError(f"{k_name} must be an int in [1, N] for {query_name} of shape [B, N, D] = {list(query.shape)}, got {k!r}")


def _check_nn_args(query, candidates, query_name: str = "query", candidates_name: str = "candidates") -> None:
    check_tensor(query, query_name, "[B, N, D]", dims=3)
    check_tensor(candidates, candidates_name, "[B, M, D]", dims=3)
    check_same_device(query_name, query, candidates_name, candidates)
    if query.dtype != candidates.dtype:
        raise TypeError(f"{query_name} and {candidates_name} must have the same dtype, got {query.dtype} and {candidates.dtype}")
    if query.shape[0] != candidates.shape[0] or query.shape[2] != candidates.shape[2]:
        raise ValueError(f"{query_name} [B, N, D] and {candidates_name} [B, M, D] must agree in B and D, got {list(query.shape)} and {list(candidates.shape)}")
    if query.shape[0] == 0:
        raise ValueError(f"{query_name} [B, N, D] must hold at least one image (B >= 1), got shape {list(query.shape)}")
    if query.shape[1] == 0:
        raise ValueError(f"{query_name} [B, N, D] must hold at least one row (N >= 1), got shape {list(query.shape)}")
    if candidates.shape[1] == 0:
        raise ValueError(f"{candidates_name} [B, M, D] must hold at least one row (M >= 1), got shape {list(candidates.shape)}")
    if query.shape[2] == 0:
        raise ValueError(f"{query_name} and {candidates_name} need D >= 1, got {list(query.shape)}")
