"""Where each view came from: 3x3 matrices from view pixels to source pixels.

Conventions (``CONVENTIONS.md`` section 1): pixel column ``j`` covers ``[j, j + 1)``, x grows to the
right and y down, and ``M[b, v]`` maps a point of view ``v`` to the source image ``b``:
``[xs, ys, 1]^T = M @ [xv, yv, 1]^T``. Crops, flips and resizes are axis-aligned, so every matrix is
``[[sx, 0, tx], [0, sy, ty], [0, 0, 1]]`` (``sx < 0`` for a flip) and boxes map to boxes.

All functions are batched over any leading dimensions and differentiable in their float inputs.
"""

from __future__ import annotations

import numbers
from typing import Tuple, Union

import torch

Number = Union[int, float]


def crop_matrix(x0, y0, width, height, out_width, out_height, flip=False) -> torch.Tensor:
    """The matrix of a crop ``(x0, y0, width, height)`` of the source resized to ``(out_width, out_height)``.

    A horizontal flip of the view maps view x to ``x0 + width - x * width / out_width``; ``flip`` is
    a bool or a bool or integer array or tensor (non-zero: flipped). Arguments broadcast; the
    result has shape ``broadcast_shape + (3, 3)``, float32 unless a float tensor argument says
    otherwise.

    >>> crop_matrix(10, 20, 100, 50, 224, 224)[0]
    tensor([ 0.4464,  0.0000, 10.0000])
    >>> crop_matrix(torch.zeros(8, 2), 0, 100, 50, 224, 224).shape   # batched over [B, V]
    torch.Size([8, 2, 3, 3])
    """
    names = ("x0", "y0", "width", "height", "out_width", "out_height")
    values = (x0, y0, width, height, out_width, out_height)
    tensors = []
    for name, value in zip(names, values):
        if isinstance(value, (str, bytes, bool)) or value is None:
            raise TypeError(f"{name} must be a number, an array or a tensor, got {type(value).__name__}")
        try:
            tensors.append(torch.as_tensor(value))
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{name} must be a number, an array or a tensor, got {type(value).__name__}") from error
        # Only plain numbers are checked: checking tensor values would synchronise with the GPU.
        if name in names[2:] and isinstance(value, numbers.Real) and not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    device = next((t.device for t in tensors if t.dim() > 0), tensors[0].device)
    x0, y0, width, height, out_width, out_height = (t.to(device=device, dtype=dtype) for t in tensors)
    try:
        x0, y0, width, height, out_width, out_height = torch.broadcast_tensors(x0, y0, width, height, out_width, out_height)
    except RuntimeError as error:
        shapes = {n: list(t.shape) for n, t in zip(names, (x0, y0, width, height, out_width, out_height))}
        raise ValueError(f"crop_matrix arguments must broadcast to one shape{_odd_one_out(shapes)}, got {shapes}") from error
    flip = _flip_tensor(flip, device)
    try:
        x0, y0, width, height, out_width, out_height, flip = torch.broadcast_tensors(x0, y0, width, height, out_width, out_height, flip)
    except RuntimeError as error:
        raise ValueError(f"flip of shape {list(flip.shape)} does not broadcast with the other arguments' shape {list(x0.shape)}") from error
    sx = width / out_width
    sy = height / out_height
    zero = torch.zeros_like(sx)
    one = torch.ones_like(sx)
    row0 = torch.stack([torch.where(flip, -sx, sx), zero, torch.where(flip, x0 + width, x0)], dim=-1)
    row1 = torch.stack([zero, sy, y0], dim=-1)
    row2 = torch.stack([zero, zero, one], dim=-1)
    return torch.stack([row0, row1, row2], dim=-2)


def _flip_tensor(flip, device: torch.device) -> torch.Tensor:
    """``flip`` as a bool tensor on ``device``, or a TypeError naming it."""
    if isinstance(flip, (str, bytes)) or flip is None:
        raise TypeError(f"flip must be a bool or a bool or integer array or tensor, got {type(flip).__name__}")
    try:
        flip_tensor = torch.as_tensor(flip)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"flip must be a bool or a bool or integer array or tensor, got {type(flip).__name__}: {error}") from error
    # A float flip is most likely a probability or a coordinate passed by mistake; rounding it to a
    # bool would flip views silently.
    if flip_tensor.is_floating_point() or flip_tensor.is_complex():
        raise TypeError(f"flip must be a bool or a bool or integer array or tensor, got dtype {flip_tensor.dtype} (use .bool() for 0/1 values)")
    return flip_tensor.to(device=device, dtype=torch.bool)


def _odd_one_out(shapes: dict) -> str:
    """Name the one argument whose shape alone keeps the others from broadcasting, if there is one."""
    culprits = []
    for name, shape in shapes.items():
        try:
            torch.broadcast_shapes(*(other for other_name, other in shapes.items() if other_name != name))
        except RuntimeError:
            continue
        culprits.append(f" ({name} of shape {shape} does not broadcast with the others)")
    return culprits[0] if len(culprits) == 1 else ""


def invert(matrices: torch.Tensor) -> torch.Tensor:
    """Inverse of axis-aligned (scale, flip, translate) matrices ``[..., 3, 3]``, exact and cheap:
    source -> view when ``matrices`` are view -> source.

    A crop of zero width or height has a zero scale and no inverse. CPU tensors are checked and
    raise a ValueError naming the first such matrix; on a GPU the check would make the host wait
    for the device, so there the inverse of such a matrix holds ``inf`` (``nan`` where the
    translation is 0 too), and so does everything mapped through it.

    >>> m = crop_matrix(10, 20, 100, 50, 200, 100, flip=True)
    >>> apply(invert(m), torch.tensor([[110.0, 20.0]]))
    tensor([[0., 0.]])
    """
    _check_matrices(matrices, "matrices")
    sx, sy = matrices[..., 0, 0], matrices[..., 1, 1]
    if matrices.device.type == "cpu":
        degenerate = (sx == 0) | (sy == 0)
        if degenerate.any():
            first = [int(i) for i in degenerate.nonzero()[0]]
            raise ValueError(
                f"matrices must be invertible: {int(degenerate.sum())} of the {degenerate.numel()} matrices have a zero scale "
                f"(a crop of zero width or height), the first at index {first}: {matrices[tuple(first)].tolist()}"
            )
    tx, ty = matrices[..., 0, 2], matrices[..., 1, 2]
    zero, one = torch.zeros_like(sx), torch.ones_like(sx)
    row0 = torch.stack([1 / sx, zero, -tx / sx], dim=-1)
    row1 = torch.stack([zero, 1 / sy, -ty / sy], dim=-1)
    row2 = torch.stack([zero, zero, one], dim=-1)
    return torch.stack([row0, row1, row2], dim=-2)


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The matrix that applies ``inner`` first, then ``outer``: ``outer @ inner``, broadcast over
    leading dimensions; both of one dtype and device. For example, a crop of a crop:
    ``compose(first_crop, second_crop)`` maps the second crop's pixels to the source, since
    ``first_crop`` maps its own pixels there.

    >>> first = crop_matrix(100, 0, 200, 200, 100, 100)    # source [100, 300) -> 100 px
    >>> second = crop_matrix(50, 0, 50, 50, 100, 100)      # its pixels [50, 100) -> 100 px
    >>> apply(compose(first, second), torch.tensor([[0.0, 0.0]]))
    tensor([[200.,   0.]])
    """
    _check_matrices(outer, "outer")
    _check_matrices(inner, "inner")
    _check_same_dtype_and_device(outer, "outer", inner, "inner")
    _check_broadcast(outer, "outer", "[..., 3, 3]", 2, inner, "inner", "[..., 3, 3]", 2)
    return outer @ inner


def view_to_view(matrices: torch.Tensor, src: int, dst: int) -> torch.Tensor:
    """Matrices ``[..., 3, 3]`` taking view ``src`` pixel coordinates to view ``dst``: ``inv(M[dst]) @ M[src]``.

    ``matrices`` has shape ``[..., V, 3, 3]``.
    """
    _check_matrices(matrices, "matrices", min_dim=3)
    _check_view_index(src, "src", matrices.shape[-3])
    _check_view_index(dst, "dst", matrices.shape[-3])
    return compose(invert(matrices[..., dst, :, :]), matrices[..., src, :, :])


def apply(matrices: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Map points ``[..., N, 2]`` (x, y) through matrices ``[..., 3, 3]`` of the same dtype and device."""
    _check_matrices(matrices, "matrices")
    if not torch.is_tensor(points) or points.dim() < 2 or points.shape[-1] != 2:
        shape = list(points.shape) if torch.is_tensor(points) else type(points).__name__
        raise ValueError(f"points must have shape [..., N, 2], got {shape}")
    _check_same_dtype_and_device(matrices, "matrices", points, "points")
    _check_broadcast(matrices, "matrices", "[..., 3, 3]", 2, points, "points", "[..., N, 2]", 2)
    linear = matrices[..., None, :2, :2]
    shift = matrices[..., None, :2, 2]
    return (linear @ points[..., None]).squeeze(-1) + shift


def cell_centers(height: int, width: int, stride: Union[Number, Tuple[Number, Number]], *, device=None, dtype=torch.float32) -> torch.Tensor:
    """View coordinates ``[height * width, 2]`` of a feature map's cell centres, row-major.

    Cell ``(i, j)`` at stride ``s`` sits at ``((j + 0.5) s_x, (i + 0.5) s_y)``; ``stride`` may be a
    number or ``(s_y, s_x)`` for maps whose stride differs per axis (view size / map size).
    """
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in (height, width)):
        raise ValueError(f"height and width must be positive ints, got {height!r} x {width!r}")
    sy, sx = _positive_pair(stride, "stride", "(s_y, s_x)", allow_scalar=True)
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) * sy
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) * sx
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)


def cell_centers_in_source(matrices: torch.Tensor, height: int, width: int, view_size: Tuple[int, int]) -> torch.Tensor:
    """Source coordinates ``[..., height * width, 2]`` of the cell centres of a ``height x width`` map
    computed from a view of size ``view_size = (H_v, W_v)`` whose matrices are ``[..., 3, 3]``."""
    _check_matrices(matrices, "matrices")
    view_h, view_w = _positive_pair(view_size, "view_size", "(H_v, W_v)")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in (height, width)):
        raise ValueError(f"height and width must be positive ints, got {height!r} x {width!r}")
    stride = (view_h / height, view_w / width)
    centers = cell_centers(height, width, stride, device=matrices.device, dtype=matrices.dtype)
    return apply(matrices, centers.expand(*matrices.shape[:-2], -1, -1))


def map_boxes(matrices: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Map boxes ``[..., K, 4]`` given as ``(x1, y1, x2, y2)`` through ``[..., 3, 3]`` matrices of
    the same dtype and device.

    A flip reverses x, so the mapped corners are re-ordered to keep ``x1 <= x2``. Boxes of view
    ``src`` in view ``dst``: :func:`boxes_between_views`.
    """
    _check_matrices(matrices, "matrices")
    _check_boxes(boxes, "boxes", "[..., K, 4]", min_dim=2)
    _check_same_dtype_and_device(matrices, "matrices", boxes, "boxes")
    _check_broadcast(matrices, "matrices", "[..., 3, 3]", 2, boxes, "boxes", "[..., K, 4]", 2)
    corners = apply(matrices, boxes.reshape(*boxes.shape[:-1], 2, 2).flatten(-3, -2)).unflatten(-2, (boxes.shape[-2], 2))
    low = torch.minimum(corners[..., 0, :], corners[..., 1, :])
    high = torch.maximum(corners[..., 0, :], corners[..., 1, :])
    return torch.cat([low, high], dim=-1)


def boxes_between_views(matrices: torch.Tensor, boxes: torch.Tensor, src: int, dst: int) -> torch.Tensor:
    """Boxes ``[..., K, 4]`` in view ``src`` pixels, expressed in view ``dst`` pixels (flip-aware).

    ``matrices`` is ``[..., V, 3, 3]``; the boxes are not clipped to the destination view.

    >>> m = torch.stack([crop_matrix(0, 0, 100, 100, 100, 100),
    ...                  crop_matrix(0, 0, 100, 100, 50, 50, flip=True)])
    >>> boxes_between_views(m, torch.tensor([[10.0, 20.0, 30.0, 40.0]]), src=0, dst=1)
    tensor([[35., 10., 45., 20.]])
    """
    return map_boxes(view_to_view(matrices, src, dst), boxes)


def view_extent(matrices: torch.Tensor, view_size: Tuple[int, int]) -> torch.Tensor:
    """The source-coordinate box ``[..., 4]`` covered by views of size ``(H_v, W_v)``."""
    _check_matrices(matrices, "matrices")
    h, w = _positive_pair(view_size, "view_size", "(H_v, W_v)")
    full = torch.tensor([[0.0, 0.0, float(w), float(h)]], device=matrices.device, dtype=matrices.dtype)
    return map_boxes(matrices, full.expand(*matrices.shape[:-2], 1, 4)).squeeze(-2)


def intersect(box_a: torch.Tensor, box_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Intersection of boxes ``[..., 4]`` on one device; returns ``(box, non_empty)``. Empty ones
    have zero size. Dtypes may differ: the box has their promoted dtype."""
    _check_boxes(box_a, "box_a", "[..., 4]", min_dim=1)
    _check_boxes(box_b, "box_b", "[..., 4]", min_dim=1)
    _check_same_dtype_and_device(box_a, "box_a", box_b, "box_b", dtype=False)
    _check_broadcast(box_a, "box_a", "[..., 4]", 1, box_b, "box_b", "[..., 4]", 1)
    low = torch.maximum(box_a[..., :2], box_b[..., :2])
    high = torch.maximum(torch.minimum(box_a[..., 2:], box_b[..., 2:]), low)
    box = torch.cat([low, high], dim=-1)
    non_empty = ((high - low) > 0).all(dim=-1)
    return box, non_empty


def views_intersection(
    matrices: torch.Tensor, view_size: Union[Tuple[int, int], Tuple[Tuple[int, int], Tuple[int, int]]], first: int = 0, second: int = 1
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The source region ``[..., 4]`` seen by both views ``first`` and ``second`` of ``[..., V, 3, 3]``
    matrices, and whether it is non-empty, as :func:`intersect`.

    ``view_size`` is ``(H_v, W_v)`` when both views have that size, or ``((H1, W1), (H2, W2))`` for
    views of different sizes (multi-crop: a 224 px global view and a 96 px local one), in the
    order ``first``, ``second``.

    >>> m = torch.stack([crop_matrix(0, 0, 100, 100, 224, 224), crop_matrix(60, 30, 100, 100, 224, 224, True)])
    >>> views_intersection(m, (224, 224))
    (tensor([ 60.,  30., 100., 100.]), tensor(True))
    >>> m = torch.stack([crop_matrix(0, 0, 100, 100, 224, 224), crop_matrix(60, 30, 48, 48, 96, 96)])
    >>> views_intersection(m, ((224, 224), (96, 96)))
    (tensor([ 60.,  30., 100.,  78.]), tensor(True))
    """
    _check_matrices(matrices, "matrices", min_dim=3)
    _check_view_index(first, "first", matrices.shape[-3])
    _check_view_index(second, "second", matrices.shape[-3])
    first_size, second_size = _view_sizes_of_two(view_size)
    return intersect(view_extent(matrices[..., first, :, :], first_size), view_extent(matrices[..., second, :, :], second_size))


def _view_sizes_of_two(view_size) -> Tuple[Tuple[Number, Number], Tuple[Number, Number]]:
    """``(H, W)`` for both views, or ``((H1, W1), (H2, W2))`` one per view, as two checked pairs."""
    expected = "(H_v, W_v) for both views or ((H1, W1), (H2, W2)) for each"
    if isinstance(view_size, (tuple, list)) and len(view_size) == 2 and all(isinstance(size, (tuple, list)) for size in view_size):
        return tuple(_positive_pair(size, f"view_size[{k}]", "(H, W)") for k, size in enumerate(view_size))
    try:
        size = _positive_pair(view_size, "view_size", "(H_v, W_v)")
    except ValueError:
        raise ValueError(f"view_size must be {expected}, with positive numbers, got {view_size!r}") from None
    return size, size


def _positive_pair(value, name: str, pair: str, allow_scalar: bool = False) -> Tuple[Number, Number]:
    is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if allow_scalar and is_number(value):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(is_number(v) and v > 0 for v in value):
        scalar = "a positive number or " if allow_scalar else ""
        raise ValueError(f"{name} must be {scalar}a pair {pair} of positive numbers, got {value!r}")
    return value[0], value[1]


def _check_view_index(index, name: str, num_views: int) -> None:
    if isinstance(index, bool) or not isinstance(index, int) or not -num_views <= index < num_views:
        raise ValueError(f"{name} must be a view index in [-{num_views}, {num_views}) (negative: counted from the last, as Python's) "
                         f"for matrices with V = {num_views} views, got {index!r}")


def _check_boxes(boxes, name: str, shape: str, min_dim: int) -> None:
    if not torch.is_tensor(boxes) or boxes.dim() < min_dim or boxes.shape[-1] != 4:
        got = list(boxes.shape) if torch.is_tensor(boxes) else type(boxes).__name__
        raise ValueError(f"{name} must have shape {shape} (x1, y1, x2, y2), got {got}")


def _check_broadcast(first, first_name: str, first_shape: str, first_tail: int, second, second_name: str, second_shape: str, second_tail: int) -> None:
    """Raise a ValueError naming both arguments when their leading (batch) dimensions do not
    broadcast, where torch would fail inside a matmul or an elementwise op."""
    try:
        torch.broadcast_shapes(first.shape[:first.dim() - first_tail], second.shape[:second.dim() - second_tail])
    except RuntimeError:
        raise ValueError(
            f"{first_name} {first_shape} and {second_name} {second_shape} must have leading dimensions that broadcast, "
            f"got {first_name} {list(first.shape)} and {second_name} {list(second.shape)}"
        ) from None


def _check_same_dtype_and_device(first: torch.Tensor, first_name: str, second: torch.Tensor, second_name: str, dtype: bool = True) -> None:
    """Raise a TypeError naming both arguments where torch would fail deep inside an op."""
    if first.device != second.device or (dtype and first.dtype != second.dtype):
        same = "dtype and device" if dtype else "device"
        raise TypeError(
            f"{first_name} and {second_name} must have the same {same}, got {first_name} {first.dtype} on {first.device} "
            f"and {second_name} {second.dtype} on {second.device}"
        )


def _check_matrices(matrices: torch.Tensor, name: str, min_dim: int = 2) -> None:
    if not torch.is_tensor(matrices) or matrices.dim() < min_dim or tuple(matrices.shape[-2:]) != (3, 3):
        shape = list(matrices.shape) if torch.is_tensor(matrices) else type(matrices).__name__
        expected = "[..., V, 3, 3]" if min_dim > 2 else "[..., 3, 3]"
        raise ValueError(f"{name} must have shape {expected}, got {shape}")
