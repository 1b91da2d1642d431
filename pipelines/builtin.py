"""The built-in dataset: synthetic scenes generated on the machine, so nothing needs a download.

Each image shows one large object of its class plus up to two smaller objects of other classes on a
textured background. A class is a shape (circle, square, triangle, ...), a surface texture
(stripes, checks, dots, rings, ...) and a pair of colours; instances vary in size, position,
rotation, texture phase and colour shade. Images are JPEG (quality 90) in an ImageFolder layout, so
the loaders decode real files; the image-level label is the class folder.

Layout of ``ensure_builtin_dataset()``'s directory (the path returned is ``images/``)::

    builtin-v1-<n>img-<size>px-<classes>cls-seed<seed>/
        images/<class>/<class>_<i>.jpg      the scenes
        masks/<class>/<class>_<i>.png       per-pixel class mask, 8-bit, same size
        meta.json                           parameters and class names

Masks follow the VOC convention: 0 is background, ``k + 1`` is class ``k`` (the index into the
sorted class list, which is also the ImageFolder label), and 255 marks a one-pixel band along every
boundary between two labels, where JPEG blurs the edge; ignore 255 when scoring. Generation is
deterministic in ``seed`` and takes seconds; the directory appears atomically (written under a
temporary name, then renamed), so an interrupted run never leaves a partial dataset.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
from PIL import Image

FORMAT_VERSION = 1
IGNORE_INDEX = 255
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "hexagon", "ellipse")
TEXTURES = ("stripes", "checks", "dots", "rings", "plain")


def cache_dir() -> Path:
    """``$FASTDENSE_CACHE`` or ``~/.cache/fastdense``."""
    return Path(os.environ.get("FASTDENSE_CACHE", "~/.cache/fastdense")).expanduser()


def class_names(num_classes: int) -> List[str]:
    """Folder names, in label order (they sort in the same order as their index)."""
    return [f"{k:03d}-{_class_style(k)[0]}-{_class_style(k)[1]}" for k in range(num_classes)]


def ensure_builtin_dataset(
    root: Optional[Union[str, os.PathLike]] = None,
    num_images: int = 1000,
    image_size: int = 128,
    num_classes: int = 10,
    seed: int = 0,
) -> Path:
    """Generate the built-in dataset under ``root`` (default :func:`cache_dir`) unless it is there;
    return its ImageFolder root (the ``images/`` directory).

    ``num_images`` in total, spread evenly over ``num_classes`` classes, each ``image_size`` pixels
    square.

    >>> import tempfile
    >>> images = ensure_builtin_dataset(tempfile.mkdtemp(), num_images=20, image_size=64, num_classes=4)
    >>> sorted(p.name for p in images.iterdir())[:2]
    ['000-circle-stripes', '001-square-checks']
    """
    for name, value, low in (("num_images", num_images, 1), ("image_size", image_size, 16), ("num_classes", num_classes, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if num_images < num_classes:
        raise ValueError(f"num_images ({num_images}) must be at least num_classes ({num_classes})")
    parent = Path(root).expanduser() if root is not None else cache_dir()
    final = parent / f"builtin-v{FORMAT_VERSION}-{num_images}img-{image_size}px-{num_classes}cls-seed{seed}"
    if (final / "meta.json").is_file():
        return final / "images"
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=parent))
    try:
        _write_dataset(staging, num_images, image_size, num_classes, seed)
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / "meta.json").is_file():  # not a concurrent writer finishing first
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final / "images"


def mask_path(image_path: Union[str, os.PathLike]) -> Path:
    """The mask file of a built-in image: ``.../images/<class>/x.jpg -> .../masks/<class>/x.png``."""
    image_path = Path(image_path)
    return image_path.parent.parent.parent / "masks" / image_path.parent.name / (image_path.stem + ".png")


def load_mask(image_path: Union[str, os.PathLike]) -> np.ndarray:
    """The ``[H, W]`` uint8 class mask of a built-in image (see the module doc for its values)."""
    with Image.open(mask_path(image_path)) as mask:
        return np.asarray(mask, dtype=np.uint8).copy()


def render_scene(index: int, label: int, image_size: int, num_classes: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """The image ``[S, S, 3]`` uint8 and mask ``[S, S]`` uint8 of sample ``index`` of class ``label``."""
    rng = np.random.default_rng([seed, index, FORMAT_VERSION])
    size = image_size
    centres = (np.arange(size, dtype=np.float32) + 0.5)
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    image = _background(rng, xs / size, ys / size)
    mask = np.zeros((size, size), dtype=np.uint8)
    others = [k for k in range(num_classes) if k != label]
    distractors = list(rng.choice(others, size=min(len(others), int(rng.integers(0, 3))), replace=False)) if others else []
    # Distractors first and smaller, so the labelled object stays whole and dominant.
    for cls, radius in [(int(k), rng.uniform(0.10, 0.18)) for k in distractors] + [(label, rng.uniform(0.24, 0.36))]:
        cx, cy = rng.uniform(radius, 1 - radius, size=2) * size
        r = radius * size
        # Every shape lies inside the unit circle, so only its bounding window is rendered.
        window = (slice(max(0, int(cy - r) - 1), int(cy + r) + 2), slice(max(0, int(cx - r) - 1), int(cx + r) + 2))
        u, v = _rotate((xs[window] - cx) / r, (ys[window] - cy) / r, rng.uniform(0, 2 * math.pi))
        inside = _shape_mask(_class_style(cls)[0], u, v)
        image[window][inside] = _surface(cls, rng, u, v, num_classes)[inside]
        mask[window][inside] = cls + 1
    mask[_label_boundaries(mask)] = IGNORE_INDEX
    return (image.clip(0, 1) * 255 + 0.5).astype(np.uint8), mask


def _write_dataset(directory: Path, num_images: int, image_size: int, num_classes: int, seed: int) -> None:
    names = class_names(num_classes)
    for name in names:
        (directory / "images" / name).mkdir(parents=True)
        (directory / "masks" / name).mkdir(parents=True)

    def write(index: int) -> None:
        label = index % num_classes
        image, mask = render_scene(index, label, image_size, num_classes, seed)
        stem = f"{names[label]}_{index // num_classes:05d}"
        Image.fromarray(image).save(directory / "images" / names[label] / f"{stem}.jpg", quality=90)
        Image.fromarray(mask).save(directory / "masks" / names[label] / f"{stem}.png")

    # numpy, the encoders and file writes release the GIL, so threads overlap them.
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        list(pool.map(write, range(num_images)))
    meta = dict(version=FORMAT_VERSION, num_images=num_images, image_size=image_size, num_classes=num_classes, seed=seed,
                classes=names, mask_values={"background": 0, "class k": "k + 1", "ignore": IGNORE_INDEX})
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))


def _class_style(cls: int) -> Tuple[str, str]:
    return SHAPES[cls % len(SHAPES)], TEXTURES[(cls + cls // len(SHAPES)) % len(TEXTURES)]


def _hsv(h, s, v) -> np.ndarray:
    """One RGB colour in [0, 1] from hue, saturation, value."""
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


def _background(rng, x, y) -> np.ndarray:
    hue = rng.uniform()
    low, high = _hsv(hue, rng.uniform(0.05, 0.3), rng.uniform(0.25, 0.5)), _hsv((hue + 0.5) % 1, rng.uniform(0.05, 0.3), rng.uniform(0.5, 0.8))
    pattern = np.zeros_like(x)
    for _ in range(3):
        fx, fy = rng.uniform(-6, 6, size=2)
        pattern += np.sin(2 * math.pi * (fx * x + fy * y) + rng.uniform(0, 2 * math.pi))
    t = (pattern / 6 + 0.5)[..., None] + rng.normal(0, 0.04, size=x.shape + (1,)).astype(np.float32)
    return (low + (high - low) * t).astype(np.float32)


def _surface(cls: int, rng, u, v, num_classes: int) -> np.ndarray:
    """Texture of class ``cls`` in object coordinates, two class colours mixed by the pattern."""
    hue = (cls * 0.618034) % 1
    shade = rng.uniform(0.85, 1.0)
    first, second = _hsv(hue, 0.85, shade), _hsv((hue + 0.15) % 1, 0.6, 0.45 * shade)
    texture = _class_style(cls)[1]
    frequency = 2.5 + (cls * 7 % 5)
    phase = rng.uniform(0, 2 * math.pi)
    if texture == "stripes":
        t = np.sin(frequency * math.pi * u + phase) > 0
    elif texture == "checks":
        t = (np.sin(frequency * math.pi * u + phase) > 0) ^ (np.sin(frequency * math.pi * v) > 0)
    elif texture == "dots":
        t = (np.sin(frequency * math.pi * u + phase) * np.sin(frequency * math.pi * v)) > 0.5
    elif texture == "rings":
        t = np.sin(frequency * math.pi * np.hypot(u, v) + phase) > 0
    else:
        t = np.clip(0.5 + 0.5 * u, 0, 1) > 0.5
    return np.where(t[..., None], first, second)


def _rotate(u, v, angle):
    c, s = math.cos(angle), math.sin(angle)
    return c * u - s * v, s * u + c * v


def _shape_mask(shape: str, u, v) -> np.ndarray:
    r, phi = np.hypot(u, v), np.arctan2(v, u)
    if shape == "circle":
        return r < 1
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.8
    if shape in ("triangle", "hexagon"):
        sides = 3 if shape == "triangle" else 6
        sector = 2 * math.pi / sides
        # Distance to the edge of a regular polygon of circumradius 1 along the sector's normal.
        return r * np.cos((phi % sector) - sector / 2) < math.cos(math.pi / sides)
    if shape == "star":
        return r < 0.55 + 0.4 * np.cos(5 * phi)
    if shape == "ring":
        return (r < 1) & (r > 0.5)
    if shape == "cross":
        return (np.maximum(np.abs(u), np.abs(v)) < 0.9) & (np.minimum(np.abs(u), np.abs(v)) < 0.3)
    if shape == "ellipse":
        return (u / 1.0) ** 2 + (v / 0.55) ** 2 < 1
    raise ValueError(f"unknown shape {shape!r}")


def _label_boundaries(mask: np.ndarray) -> np.ndarray:
    edge = np.zeros(mask.shape, dtype=bool)
    horizontal = mask[:, 1:] != mask[:, :-1]
    vertical = mask[1:, :] != mask[:-1, :]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    return edge
