"""SCRL's box sampler: pairs of boxes that cover the same source region in two views.

The algorithm is the grid-based sampler of SCRL's reference code (Roh et al., 2021), driven by the
view matrices of ``CONVENTIONS.md`` section 1 instead of crop tuples. For every image:

1. Intersect the two views in source coordinates. Rescale it to the resolution of the more
   zoomed-out view, axis by axis (SCRL's ``min(224 / w1, 224 / w2)``), and round to whole scaled
   pixels (round half to even, as Python's ``round``). If the scaled overlap is not larger than
   ``min_size`` in both dimensions, the image contributes no boxes.
2. Draw ``num_boxes`` boxes in that scaled grid. Each try draws a number of divisions per axis
   (``1 .. int(size / min_size)``), a cell of that grid, a box size from ``int(min_size)`` up to the
   cell size and a position inside the cell, all as whole scaled pixels. The first box is kept
   as drawn; a later box is kept as soon as its IoU with every box already kept for the image is
   below ``iou_threshold``, else, after ``max_tries`` tries, the last try is kept. The IoU is taken
   exactly, on the scaled grid, which both views see through a scale and shift per axis (SCRL's
   code takes it in view 1's pixels, in floats, where IoU 0.5 ties fell on either side).
3. Map each box through both views (flip-aware) and clip it to ``[0, view size]``.

Both implementations, the readable reference below and the C++ one in ``csrc/scrl_boxes.cpp``, are
deterministic functions of their arguments and one ``int64`` key per image
(:func:`draw_scrl_randoms`). Each key seeds a SplitMix64 counter stream from which the integers are
drawn in the order above, so both produce bit-identical boxes and only the draws that are used are
ever computed.

Known differences from the reference code: boxes are clipped on both sides (the reference clips
only ``x1, y1`` from below and ``x2, y2`` from above, which is the same for every box it produces),
the second view's batch index is ``b`` rather than ``b + B`` (the ROI lists are per view), and the
views may be any size ``view_size`` rather than a square ``input_size``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from fastdense.ops._dispatch import resolve
from fastdense.ops._validate import check_tensor

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class ScrlBoxes:
    """Matched boxes for a batch of view pairs.

    Attributes:
        rois: two ``[K, 5]`` tensors, one per view, in ``torchvision.ops.roi_align`` format
            ``(batch_index, x1, y1, x2, y2)`` in that view's pixel coordinates. Row ``k`` of both
            covers the same source region; rows are grouped by image in batch order.
        counts: ``[B]`` int64, boxes per image (0 or ``num_boxes``).
        iou_rule_met: ``[K]`` bool, False where no try met the IoU rule and the last try was kept.
    """

    rois: List[torch.Tensor]
    counts: torch.Tensor
    iou_rule_met: torch.Tensor


def draw_scrl_randoms(batch_size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One random ``int64`` key per image: everything random about :func:`sample_scrl_boxes`.

    >>> keys = draw_scrl_randoms(4, torch.Generator().manual_seed(0))
    >>> keys.shape, keys.dtype
    (torch.Size([4]), torch.int64)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return torch.randint(-(2**63), 2**63 - 1, (batch_size,), dtype=torch.int64, generator=generator)


def keyed_scrl_randoms(seed: int, draw: int, index: torch.Tensor) -> torch.Tensor:
    """Keys like :func:`draw_scrl_randoms`, each a hash of ``(seed, draw, index[b])``.

    An image's boxes then depend on the image (its dataset index) and the draw number, not on its
    position in the batch or on which process holds it: a batch split over ranks samples the same
    boxes as the whole batch in one process.

    >>> a = keyed_scrl_randoms(7, 0, torch.tensor([3, 4, 5]))
    >>> torch.equal(a[1:], keyed_scrl_randoms(7, 0, torch.tensor([4, 5]))), bool(a[0] != keyed_scrl_randoms(7, 1, torch.tensor([3]))[0])
    (True, True)
    """
    check_tensor(index, "index", "[B] int (dataset indices)", float_only=False)
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        # int() would truncate 1.5 and 1.7 to the same key.
        raise TypeError(f"index must be an integer tensor of dataset indices, got dtype {index.dtype}")
    mix = lambda z: _finalize64((z + _GOLDEN_GAMMA) & _MASK64)  # noqa: E731
    base = mix(mix(int(seed) & _MASK64) ^ (int(draw) & _MASK64))
    keys = [mix(base ^ (int(i) & _MASK64)) for i in index.reshape(-1).tolist()]
    return torch.tensor([k - (1 << 64) if k >> 63 else k for k in keys], dtype=torch.int64)


def sample_scrl_boxes(
    matrices: torch.Tensor,
    view_size: Union[int, Tuple[int, int]] = (224, 224),
    num_boxes: int = 10,
    min_size: float = 32.0,
    iou_threshold: float = 0.5,
    max_tries: int = 50,
    generator: Optional[torch.Generator] = None,
    random: Optional[torch.Tensor] = None,
) -> ScrlBoxes:
    """Sample SCRL's matched box pairs for two views per image.

    Args:
        matrices: ``[B, 2, 3, 3]`` view -> source matrices (crop, flip, resize; ``CONVENTIONS.md``).
            Any device; the sampler runs on the CPU and returns tensors on this device.
        view_size: ``(H_v, W_v)`` of both views, or one int for square views.
        num_boxes: boxes per image that has a large enough overlap.
        min_size: smallest box side in scaled pixels (at least 1).
        iou_threshold: a box is kept once its IoU with the image's earlier boxes is below this.
        max_tries: tries per box before the last one is kept anyway.
        generator: draws the per-image keys when ``random`` is not given.
        random: ``[B]`` int64 keys from :func:`draw_scrl_randoms`; the result is a deterministic
            function of them and the other arguments, identical for every backend.

    Returns:
        :class:`ScrlBoxes`; ``rois`` are float64 when ``matrices`` is, else float32.

    Dispatch: the C++ implementation when ``fastdense._C`` is built, else the reference; forced with
    ``fastdense.ops.backend("reference" | "cpp")`` or ``FASTDENSE_BACKEND``.

    >>> from fastdense import geometry
    >>> m = torch.stack([geometry.crop_matrix(0, 0, 300, 300, 224, 224),
    ...                  geometry.crop_matrix(100, 50, 300, 300, 224, 224, flip=True)])[None]
    >>> out = sample_scrl_boxes(m, random=torch.tensor([7]))
    >>> out.counts.tolist(), [r.shape for r in out.rois]
    ([10], [torch.Size([10, 5]), torch.Size([10, 5])])
    """
    params, keys, (view_h, view_w) = _prepare(matrices, view_size, num_boxes, min_size, iou_threshold, max_tries, generator, random)
    out_dtype = torch.float64 if matrices.dtype == torch.float64 else torch.float32
    cpp = _cpp_module()
    available = ("reference", "cpp") if cpp is not None else ("reference",)
    # The sampler always runs on the CPU, so dispatch on the CPU copy of the matrices.
    chosen = resolve("sample_scrl_boxes", (params,), available)
    args = (float(view_h), float(view_w), int(num_boxes), float(min_size), float(iou_threshold), int(max_tries))
    if chosen == "cpp":
        rois1, rois2, counts, met = (torch.from_numpy(a) for a in cpp.sample_scrl_boxes(params.numpy(), keys.numpy(), *args))
    else:
        rois1, rois2, counts, met = _sample_reference(params, keys, *args)
    device = matrices.device
    return ScrlBoxes(
        rois=[rois1.to(device=device, dtype=out_dtype), rois2.to(device=device, dtype=out_dtype)],
        counts=counts.to(device),
        iou_rule_met=met.to(device),
    )


@functools.lru_cache(maxsize=None)
def _cpp_module():
    try:
        from fastdense import _C
    except ImportError:
        return None
    return _C if hasattr(_C, "sample_scrl_boxes") else None


def _prepare(matrices, view_size, num_boxes, min_size, iou_threshold, max_tries, generator, random):
    """Validate the arguments; return ``params [B, 2, 4]`` float64 ``(sx, tx, sy, ty)``, keys and view size."""
    check_tensor(matrices, "matrices", "[B, 2, 3, 3]", dims=4)
    if tuple(matrices.shape[1:]) != (2, 3, 3) or matrices.shape[0] == 0:
        raise ValueError(f"matrices must have shape [B, 2, 3, 3] with B >= 1, got {list(matrices.shape)}")
    view_h, view_w = _check_view_size(view_size)
    _check_int(num_boxes, "num_boxes", 1)
    _check_int(max_tries, "max_tries", 1)
    if matrices.shape[0] * num_boxes >= 2**31:
        # The rois' row count must fit the int32 indices of roi_align's kernels; beyond it the C++
        # sampler failed with std::bad_alloc (or wrapped B * num_boxes around int64) and the reference ran for hours.
        raise ValueError(f"num_boxes * B must be below 2**31 (the boxes one batch can hold), got num_boxes={num_boxes} for B={matrices.shape[0]} images")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, float)) or not math.isfinite(min_size) or min_size < 1:
        raise ValueError(f"min_size must be a finite number >= 1 (scaled pixels), got {min_size!r}")
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, (int, float)) or not iou_threshold > 0:
        raise ValueError(f"iou_threshold must be a number > 0, got {iou_threshold!r}")
    # NumPy: these checks on a few hundred numbers cost microseconds there, tens of them in torch.
    flat = matrices.detach().to(device="cpu", dtype=torch.float64).numpy().reshape(-1, 9)
    if not np.isfinite(flat).all():
        raise ValueError("matrices must be finite")
    sx, sy = flat[:, 0], flat[:, 4]
    off_axis = np.abs(flat[:, [1, 3]]).max(axis=1) > 1e-6 * (np.abs(sx) + np.abs(sy))
    bottom_row = np.abs(flat[:, 6:] - (0.0, 0.0, 1.0)).max(axis=1) > 1e-6
    if (sx == 0).any() or (sy == 0).any() or off_axis.any() or bottom_row.any():
        raise ValueError("matrices must be axis-aligned crop/flip/resize matrices [[sx, 0, tx], [0, sy, ty], [0, 0, 1]] with sx, sy != 0")
    params = torch.from_numpy(np.ascontiguousarray(flat[:, [0, 2, 4, 5]]).reshape(-1, 2, 4))
    if random is None:
        keys = draw_scrl_randoms(matrices.shape[0], generator)
    else:
        check_tensor(random, "random", f"[{matrices.shape[0]}] int64 (one key per image)", dims=1, float_only=False)
        if random.dtype != torch.int64 or random.shape[0] != matrices.shape[0]:
            raise ValueError(f"random must be an int64 tensor of shape [{matrices.shape[0]}] (one key per image, from draw_scrl_randoms), got {random.dtype} {list(random.shape)}")
        keys = random.detach().to("cpu").contiguous()
    return params, keys, (view_h, view_w)


def _check_view_size(view_size) -> Tuple[int, int]:
    size = (view_size, view_size) if isinstance(view_size, int) and not isinstance(view_size, bool) else view_size
    if not isinstance(size, Sequence) or len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size):
        raise ValueError(f"view_size must be a positive int or a pair (H_v, W_v) of positive ints, got {view_size!r}")
    return int(size[0]), int(size[1])


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# The reference implementation: plain Python floats, one image at a time.
# csrc/scrl_boxes.cpp performs the same double-precision operations in the same order.


class _SplitMix64:
    """A counter-based stream of integers: SplitMix64 seeded by the image's key."""

    def __init__(self, key: int):
        self.state = key & _MASK64

    def randint(self, low: int, high: int) -> int:
        """An integer in ``[low, high)`` (``numpy.random.randint``'s range), by multiply-shift."""
        self.state = (self.state + _GOLDEN_GAMMA) & _MASK64
        return low + (((_finalize64(self.state) >> 32) * (high - low)) >> 32)


def _finalize64(z: int) -> int:
    """SplitMix64's output function: a bijective mix of a 64-bit word."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _sample_reference(params, keys, view_h, view_w, num_boxes, min_size, iou_threshold, max_tries):
    rois = ([], [])
    met = []
    counts = []
    for b, (views, key) in enumerate(zip(params.tolist(), keys.tolist())):
        pairs = _sample_image(views, _SplitMix64(key), view_h, view_w, num_boxes, min_size, iou_threshold, max_tries)
        counts.append(len(pairs))
        for box1, box2, rule_met in pairs:
            rois[0].append([float(b), *box1])
            rois[1].append([float(b), *box2])
            met.append(rule_met)
    as_rois = lambda rows: torch.tensor(rows, dtype=torch.float64).reshape(-1, 5)  # noqa: E731
    return as_rois(rois[0]), as_rois(rois[1]), torch.tensor(counts, dtype=torch.int64), torch.tensor(met, dtype=torch.bool)


def _sample_image(views, stream, view_h, view_w, num_boxes, min_size, iou_threshold, max_tries):
    """Boxes for one image: a list of ``(box in view 1, box in view 2, iou_rule_met)``."""
    (sx1, tx1, sy1, ty1), (sx2, tx2, sy2, ty2) = views
    left, right = _overlap(sx1, tx1, sx2, tx2, view_w)
    top, bottom = _overlap(sy1, ty1, sy2, ty2, view_h)
    if left >= right or top >= bottom:
        return []
    # Source pixels per scaled pixel: the scaled grid has the resolution of the more zoomed-out view.
    unit_x = max(abs(sx1), abs(sx2))
    unit_y = max(abs(sy1), abs(sy2))
    width = round((right - left) / unit_x)
    height = round((bottom - top) / unit_y)
    if min_size >= width or min_size >= height:
        return []
    max_div_x = int(width / min_size) + 1
    max_div_y = int(height / min_size) + 1

    kept, kept_on_grid = [], []
    for k in range(num_boxes):
        for attempt in range(max_tries):
            div_x = stream.randint(1, max_div_x)
            div_y = stream.randint(1, max_div_y)
            cell_w = width / div_x
            cell_h = height / div_y
            cell_x = stream.randint(0, div_x)
            cell_y = stream.randint(0, div_y)
            box_w = stream.randint(int(min_size), int(cell_w + 1))
            box_h = stream.randint(int(min_size), int(cell_h + 1))
            box_x = stream.randint(0, int(cell_w - box_w + 1)) + int(cell_x * cell_w)
            box_y = stream.randint(0, int(cell_h - box_h + 1)) + int(cell_y * cell_h)

            src_x1 = left + box_x * unit_x
            src_x2 = src_x1 + box_w * unit_x
            src_y1 = top + box_y * unit_y
            src_y2 = src_y1 + box_h * unit_y
            box1 = _to_view(src_x1, src_y1, src_x2, src_y2, sx1, tx1, sy1, ty1)
            on_grid = (box_x, box_y, box_x + box_w, box_y + box_h)
            if k == 0 or iou_threshold >= 1.0:
                rule_met = True
                break
            rule_met = max(_grid_iou(on_grid, earlier) for earlier in kept_on_grid) < iou_threshold
            if rule_met:
                break
        box2 = _to_view(src_x1, src_y1, src_x2, src_y2, sx2, tx2, sy2, ty2)
        kept.append((_clip(box1, view_w, view_h), _clip(box2, view_w, view_h), rule_met))
        kept_on_grid.append(on_grid)
    return kept


def _overlap(s1, t1, s2, t2, size):
    """The overlap ``(low, high)`` along one axis of two views' source extents ``t + s * [0, size]``."""
    low = max(min(t1, t1 + s1 * size), min(t2, t2 + s2 * size))
    high = min(max(t1, t1 + s1 * size), max(t2, t2 + s2 * size))
    return low, high


def _to_view(x1, y1, x2, y2, sx, tx, sy, ty):
    """A source box in view pixels: the inverse of the view matrix; a flip swaps the x ends."""
    vx1, vx2 = (x1 - tx) / sx, (x2 - tx) / sx
    vy1, vy2 = (y1 - ty) / sy, (y2 - ty) / sy
    return (min(vx1, vx2), min(vy1, vy2), max(vx1, vx2), max(vy1, vy2))


def _clip(box, view_w, view_h):
    x1, y1, x2, y2 = box
    return (min(max(x1, 0.0), view_w), min(max(y1, 0.0), view_h), min(max(x2, 0.0), view_w), min(max(y2, 0.0), view_h))


def _grid_iou(a, b):
    """IoU of two boxes ``(x1, y1, x2, y2)`` in whole cells of the scaled grid: exact. Each view sees
    the grid through a scale and shift per axis, which leaves IoU unchanged, so this is the IoU of
    the boxes in either view; computed there in floats (as SCRL's code does), rounding put exact
    ties (IoU 0.5 against the rule's "below 0.5") on either side."""
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union
