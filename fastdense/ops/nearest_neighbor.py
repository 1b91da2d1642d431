"""Nearest-neighbour matching of local features (VICRegL), feature space and location alike."""

from __future__ import annotations

from typing import Tuple

import torch

from fastdense.ops._dispatch import resolve
from fastdense.ops._validate import check_same_device, check_tensor


def nearest_neighbor_reference(query: torch.Tensor, candidates: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference: exact Euclidean distances (differences, not the ``|q|^2 - 2 q.c + |c|^2`` expansion),
    in float32 (float64 for float64 input); ties go to the lowest candidate index."""
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    dist = torch.cdist(query.to(dtype), candidates.to(dtype), compute_mode="donot_use_mm_for_euclid_dist")
    # torch.min does not promise the first index among equal values; argmin's documentation does.
    index = dist.argmin(dim=-1)
    return dist.gather(-1, index[..., None]).squeeze(-1), index


def nearest_neighbor(query: torch.Tensor, candidates: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Distance to and index of each query row's nearest candidate.

    Args:
        query: ``[B, N, D]`` float tensor.
        candidates: ``[B, M, D]`` float tensor, same ``B`` and ``D``.

    Returns:
        ``(distance, index)``, each ``[B, N]``: float32 Euclidean distances (float64 for float64
        input) and int64 indices into ``M``. Ties go to the lowest index. No gradient flows through
        the distances; gather matched features with the index instead.

    >>> import torch, fastdense.ops as ops
    >>> q = torch.tensor([[[0.0, 0.0], [3.0, 3.0]]])
    >>> c = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])
    >>> ops.nearest_neighbor(q, c)
    (tensor([[1., 1.]]), tensor([[1, 0]]))
    """
    _check_nn_args(query, candidates)
    resolve("nearest_neighbor", (query, candidates), available=())
    with torch.no_grad():
        return nearest_neighbor_reference(query, candidates)


def nearest_neighbor_pairs(query: torch.Tensor, candidates: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` query rows closest to their nearest candidate, as pairs of indices.

    Returns ``(query_index, candidate_index)``, each ``[B, k]`` int64: the ``k`` rows with the smallest
    nearest-neighbour distance (ties: lower row first), listed in ascending row order, and each one's
    nearest candidate. This is VICRegL's top-k local matching.

    >>> import torch, fastdense.ops as ops
    >>> q = torch.tensor([[[0.0], [5.0], [1.0]]])
    >>> c = torch.tensor([[[1.1], [4.0]]])
    >>> ops.nearest_neighbor_pairs(q, c, k=2)
    (tensor([[0, 2]]), tensor([[0, 0]]))
    """
    _check_nn_args(query, candidates)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= query.shape[1]:
        raise ValueError(f"k must be an int in [1, N] for query of shape [B, N, D] = {list(query.shape)}, got {k!r}")
    distance, index = nearest_neighbor(query, candidates)
    rows = select_rows(distance, k)
    return rows, index.gather(1, rows)


def select_rows(distance: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[B, k]`` of the ``k`` smallest entries of each row of ``distance [B, N]``, ascending.
    Equal distances keep the lower index (a stable sort)."""
    order = torch.sort(distance, dim=1, stable=True).indices[:, :k]
    return torch.sort(order, dim=1).values


def _check_nn_args(query, candidates) -> None:
    check_tensor(query, "query", "[B, N, D]", dims=3)
    check_tensor(candidates, "candidates", "[B, M, D]", dims=3)
    check_same_device("query", query, "candidates", candidates)
    if query.shape[0] != candidates.shape[0] or query.shape[2] != candidates.shape[2]:
        raise ValueError(f"query [B, N, D] and candidates [B, M, D] must agree in B and D, got {list(query.shape)} and {list(candidates.shape)}")
    if candidates.shape[1] == 0:
        raise ValueError(f"candidates must hold at least one row (M >= 1), got shape {list(candidates.shape)}")
    if query.shape[2] == 0:
        raise ValueError(f"query and candidates need D >= 1, got {list(query.shape)}")
