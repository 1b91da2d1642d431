"""Crop windows for a recipe's views, sampled as torchvision's ``RandomResizedCrop`` does.

:func:`sample_crop` reproduces ``RandomResizedCrop.get_params``: up to 10 tries of an area drawn
uniformly from ``scale`` times the image area and an aspect ratio drawn log-uniformly from
``ratio``, rounded to whole pixels; the first that fits is placed uniformly; if none fits, the
largest centred crop whose aspect ratio is clamped into ``ratio``. A horizontal flip is drawn with
probability ``flip_p``. The random source is a numpy ``Generator``, so every backend that samples
on the CPU draws the same windows for the same seed.

:func:`crops_to_matrices` turns windows into the view-to-source matrices of ``CONVENTIONS.md``
section 1 (through :func:`fastdense.geometry.crop_matrix`).
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np
import torch

from fastdense.geometry import crop_matrix
from fastdense.pipelines.recipes import ViewSpec

NUM_TRIES = 10


def sample_crop(height: int, width: int, spec: ViewSpec, rng: np.random.Generator) -> Tuple[int, int, int, int, bool]:
    """A crop window ``(x0, y0, w, h, flip)`` in pixels of a ``height x width`` source for ``spec``.

    >>> from fastdense.pipelines.recipes import ViewSpec
    >>> x0, y0, w, h, flip = sample_crop(375, 500, ViewSpec(224, (0.2, 1.0)), np.random.default_rng(0))
    >>> 0 <= x0 and x0 + w <= 500 and 0 <= y0 and y0 + h <= 375
    True
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height} x {width}")
    area = height * width
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    for _ in range(NUM_TRIES):
        target_area = area * rng.uniform(spec.scale[0], spec.scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(rng.integers(0, height - h + 1))
            x0 = int(rng.integers(0, width - w + 1))
            return x0, y0, w, h, bool(rng.random() < spec.flip_p)
    x0, y0, w, h = center_crop_fallback(height, width, spec.ratio)
    return x0, y0, w, h, bool(rng.random() < spec.flip_p)


def center_crop_fallback(height: int, width: int, ratio: Tuple[float, float]) -> Tuple[int, int, int, int]:
    """The window RandomResizedCrop falls back to: the whole image, cut to the nearest allowed ratio."""
    image_ratio = width / height
    if image_ratio < min(ratio):
        w, h = width, max(1, int(round(width / min(ratio))))
    elif image_ratio > max(ratio):
        w, h = max(1, int(round(height * max(ratio)))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def sample_view_crops(height: int, width: int, specs: Sequence[ViewSpec], rng: np.random.Generator) -> np.ndarray:
    """Windows for every view of one image: an ``[V, 5]`` int64 array of ``(x0, y0, w, h, flip)``."""
    return np.array([sample_crop(height, width, spec, rng) for spec in specs], dtype=np.int64).reshape(len(specs), 5)


def crops_to_matrices(crops, view_sizes) -> torch.Tensor:
    """Matrices ``[..., V, 3, 3]`` float32 for windows ``[..., V, 5]`` = ``(x0, y0, w, h, flip)``.

    ``view_sizes`` holds each view's output size, ``V`` ints (square views) or ``V`` pairs ``(H_v, W_v)``.
    """
    crops = torch.as_tensor(np.asarray(crops))
    if crops.shape[-1] != 5:
        raise ValueError(f"crops must have shape [..., V, 5], got {list(crops.shape)}")
    sizes = torch.tensor([(s, s) if isinstance(s, (int, np.integer)) else tuple(s) for s in view_sizes], dtype=torch.float32)
    if sizes.shape[0] != crops.shape[-2]:
        raise ValueError(f"view_sizes must hold one size per view ({crops.shape[-2]}), got {len(view_sizes)}")
    x0, y0, w, h, flip = (crops[..., k].to(torch.float32) for k in range(5))
    return crop_matrix(x0, y0, w, h, sizes[:, 1], sizes[:, 0], flip.bool())
