"""Where each view came from: 3x3 matrices from view pixels to source pixels.

Conventions (``CONVENTIONS.md`` section 1): pixel column ``j`` covers ``[j, j + 1)``, x grows to the
right and y down, and ``M[b, v]`` maps a point of view ``v`` to the source image ``b``:
``[xs, ys, 1]^T = M @ [xv, yv, 1]^T``. Crops, flips and resizes are axis-aligned, so every matrix is
``[[sx, 0, tx], [0, sy, ty], [0, 0, 1]]`` (``sx < 0`` for a flip) and boxes map to boxes.

All functions are batched over any leading dimensions and differentiable in their float inputs.
"""

from __future__ import annotations

from typing import Tuple, Union

import torch

Number = Union[int, float]


def crop_matrix(x0, y0, width, height, out_width, out_height, flip=False) -> torch.Tensor:
    """The matrix of a crop ``(x0, y0, width, height)`` of the source resized to ``(out_width, out_height)``.

    A horizontal flip of the view maps view x to ``x0 + width - x * width / out_width``.
    Arguments broadcast; the result has shape ``broadcast_shape + (3, 3)``, float32 unless a float
    tensor argument says otherwise.

    >>> crop_matrix(10, 20, 100, 50, 224, 224)[0]
    tensor([ 0.4464,  0.0000, 10.0000])
    """
    tensors = [torch.as_tensor(a) for a in (x0, y0, width, height, out_width, out_height)]
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    device = next((t.device for t in tensors if t.dim() > 0), tensors[0].device)
    x0, y0, width, height, out_width, out_height = (t.to(device=device, dtype=dtype) for t in tensors)
    flip = torch.as_tensor(flip, device=device, dtype=torch.bool)
    x0, y0, width, height, out_width, out_height, flip = torch.broadcast_tensors(x0, y0, width, height, out_width, out_height, flip)
    sx = width / out_width
    sy = height / out_height
    zero = torch.zeros_like(sx)
    one = torch.ones_like(sx)
    row0 = torch.stack([torch.where(flip, -sx, sx), zero, torch.where(flip, x0 + width, x0)], dim=-1)
    row1 = torch.stack([zero, sy, y0], dim=-1)
    row2 = torch.stack([zero, zero, one], dim=-1)
    return torch.stack([row0, row1, row2], dim=-2)


def invert(matrices: torch.Tensor) -> torch.Tensor:
    """Inverse of axis-aligned (scale, flip, translate) matrices, exact and cheap."""
    _check_matrices(matrices, "matrices")
    sx, sy = matrices[..., 0, 0], matrices[..., 1, 1]
    tx, ty = matrices[..., 0, 2], matrices[..., 1, 2]
    zero, one = torch.zeros_like(sx), torch.ones_like(sx)
    row0 = torch.stack([1 / sx, zero, -tx / sx], dim=-1)
    row1 = torch.stack([zero, 1 / sy, -ty / sy], dim=-1)
    row2 = torch.stack([zero, zero, one], dim=-1)
    return torch.stack([row0, row1, row2], dim=-2)


def view_to_view(matrices: torch.Tensor, src: int, dst: int) -> torch.Tensor:
    """Matrices ``[..., 3, 3]`` taking view ``src`` pixel coordinates to view ``dst``: ``inv(M[dst]) @ M[src]``.

    ``matrices`` has shape ``[..., V, 3, 3]``.
    """
    _check_matrices(matrices, "matrices", min_dim=4)
    return invert(matrices[..., dst, :, :]) @ matrices[..., src, :, :]


def apply(matrices: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Map points ``[..., N, 2]`` (x, y) through matrices ``[..., 3, 3]``."""
    _check_matrices(matrices, "matrices")
    if points.shape[-1] != 2:
        raise ValueError(f"points must have shape [..., N, 2], got {list(points.shape)}")
    linear = matrices[..., None, :2, :2]
    shift = matrices[..., None, :2, 2]
    return (linear @ points[..., None]).squeeze(-1) + shift


def cell_centers(height: int, width: int, stride: Union[Number, Tuple[Number, Number]], *, device=None, dtype=torch.float32) -> torch.Tensor:
    """View coordinates ``[height * width, 2]`` of a feature map's cell centres, row-major.

    Cell ``(i, j)`` at stride ``s`` sits at ``((j + 0.5) s_x, (i + 0.5) s_y)``; ``stride`` may be a
    number or ``(s_y, s_x)`` for maps whose stride differs per axis (view size / map size).
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height} x {width}")
    sy, sx = (stride, stride) if isinstance(stride, (int, float)) else stride
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) * sy
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) * sx
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)


def cell_centers_in_source(matrices: torch.Tensor, height: int, width: int, view_size: Tuple[int, int]) -> torch.Tensor:
    """Source coordinates ``[..., height * width, 2]`` of the cell centres of a ``height x width`` map
    computed from a view of size ``view_size = (H_v, W_v)`` whose matrices are ``[..., 3, 3]``."""
    _check_matrices(matrices, "matrices")
    stride = (view_size[0] / height, view_size[1] / width)
    centers = cell_centers(height, width, stride, device=matrices.device, dtype=matrices.dtype)
    return apply(matrices, centers.expand(*matrices.shape[:-2], -1, -1))


def map_boxes(matrices: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Map boxes ``[..., K, 4]`` given as ``(x1, y1, x2, y2)`` through ``[..., 3, 3]`` matrices.

    A flip reverses x, so the mapped corners are re-ordered to keep ``x1 <= x2``.
    """
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [..., K, 4], got {list(boxes.shape)}")
    corners = apply(matrices, boxes.reshape(*boxes.shape[:-1], 2, 2).flatten(-3, -2)).unflatten(-2, (boxes.shape[-2], 2))
    low = torch.minimum(corners[..., 0, :], corners[..., 1, :])
    high = torch.maximum(corners[..., 0, :], corners[..., 1, :])
    return torch.cat([low, high], dim=-1)


def view_extent(matrices: torch.Tensor, view_size: Tuple[int, int]) -> torch.Tensor:
    """The source-coordinate box ``[..., 4]`` covered by views of size ``(H_v, W_v)``."""
    h, w = view_size
    full = torch.tensor([[0.0, 0.0, float(w), float(h)]], device=matrices.device, dtype=matrices.dtype)
    return map_boxes(matrices, full.expand(*matrices.shape[:-2], 1, 4)).squeeze(-2)


def intersect(box_a: torch.Tensor, box_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Intersection of boxes ``[..., 4]``; returns ``(box, non_empty)``. Empty ones have zero size."""
    low = torch.maximum(box_a[..., :2], box_b[..., :2])
    high = torch.maximum(torch.minimum(box_a[..., 2:], box_b[..., 2:]), low)
    box = torch.cat([low, high], dim=-1)
    non_empty = ((high - low) > 0).all(dim=-1)
    return box, non_empty


def _check_matrices(matrices: torch.Tensor, name: str, min_dim: int = 2) -> None:
    if not torch.is_tensor(matrices) or matrices.dim() < min_dim or tuple(matrices.shape[-2:]) != (3, 3):
        shape = list(matrices.shape) if torch.is_tensor(matrices) else type(matrices).__name__
        expected = "[..., V, 3, 3]" if min_dim > 2 else "[..., 3, 3]"
        raise ValueError(f"{name} must have shape {expected}, got {shape}")
