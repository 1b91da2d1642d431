"""Drop-in ops with autograd: a PyTorch reference for each, Triton and C++ fast paths behind it.

Dispatch is automatic (CUDA -> Triton, CPU -> C++ where it exists, else the reference) and can be
forced with ``FASTDENSE_BACKEND`` or :func:`backend`.
"""

from fastdense.ops._dispatch import backend, requested_backend
from fastdense.ops.nearest_neighbor import nearest_neighbor, nearest_neighbor_pairs, nearest_neighbor_pairs_many, select_rows
from fastdense.ops.roi_align import RoIAlign, roi_align, roi_pool_vectors
from fastdense.ops.vicreg import vicreg_covariance, vicreg_invariance, vicreg_variance, vicreg_variance_covariance

__all__ = [
    "backend",
    "requested_backend",
    "nearest_neighbor",
    "nearest_neighbor_pairs",
    "nearest_neighbor_pairs_many",
    "select_rows",
    "roi_align",
    "roi_pool_vectors",
    "RoIAlign",
    "vicreg_invariance",
    "vicreg_variance",
    "vicreg_covariance",
    "vicreg_variance_covariance",
]
