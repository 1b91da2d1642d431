"""Shared test material for every pipeline backend: coordinate-encoded images, the bad-input corpus,
and the round-trip check of ``CONVENTIONS.md`` section 1.

A coordinate image encodes each pixel's own position in its colour: red is ``255 x / W``, green is
``255 y / H`` at the pixel centre, blue is a constant 128. Both are linear in position, so any
correct crop-and-resize reproduces them up to interpolation and 8-bit rounding; reading a view's
colour therefore says where in the source the view pixel came from, and that must agree with the
view's matrix.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from fastdense.pipelines.recipes import IMAGENET_MEAN, IMAGENET_STD

COORDINATE_BLUE = 128
EXIF_ORIENTATION = 0x0112
# PIL transpose that turns an upright image into what a camera stores under each EXIF orientation.
STORE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def coordinate_image(h: int, w: int) -> np.ndarray:
    """``[h, w, 3]`` uint8: red encodes x, green encodes y (at pixel centres), blue is 128."""
    image = np.empty((h, w, 3), dtype=np.uint8)
    image[..., 0] = np.round((np.arange(w) + 0.5) * 255.0 / w).astype(np.uint8)[None, :]
    image[..., 1] = np.round((np.arange(h) + 0.5) * 255.0 / h).astype(np.uint8)[:, None]
    image[..., 2] = COORDINATE_BLUE
    return image


def save_image(array: np.ndarray, path: Path, orientation: int = 1, **save_options) -> Path:
    """Save an upright image; with ``orientation`` != 1 the pixels are stored transposed and the EXIF
    tag says how to undo it, as cameras do."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if orientation != 1:
        image = image.transpose(STORE_FOR_ORIENTATION[orientation])
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        save_options["exif"] = exif
    image.save(path, **save_options)
    return path


def build_coordinate_folder(root: Path, sizes: Sequence[Tuple[int, int]], suffix: str = ".png", quality: int = 95,
                            orientations: Sequence[int] = (1,)) -> Dict[int, Tuple[int, int]]:
    """An image folder of coordinate images of ``sizes`` (``(h, w)``, upright), cycling through EXIF
    ``orientations``; returns ``{dataset index: (h, w)}`` (files sort in index order)."""
    sources = {}
    for k, (h, w) in enumerate(sizes):
        options = dict(quality=quality, subsampling=0) if suffix == ".jpg" else {}
        save_image(coordinate_image(h, w), Path(root) / "coords" / f"{k:04d}{suffix}", orientations[k % len(orientations)], **options)
        sources[k] = (h, w)
    return sources


def unnormalize(view: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """A normalised ``[3, H, W]`` view back to ``[H, W, 3]`` float64 in 0-255."""
    view = view.detach().to("cpu", torch.float64)
    mean_t = torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    return ((view * std_t + mean_t) * 255.0).permute(1, 2, 0).numpy()


def roundtrip_check(batch, sources: Dict[int, Tuple[int, int]], mean=IMAGENET_MEAN, std=IMAGENET_STD, noise_levels: float = 1.0) -> Dict[str, float]:
    """Assert the round-trip property for every view pixel of a batch of coordinate images.

    ``sources`` maps dataset index -> upright ``(h, w)`` of the coordinate image written. The
    decoded source may be stored at another size (ffcv), so positions are read relative to
    ``batch.source_size`` and only its aspect ratio is compared with ``sources``.

    For each view pixel ``(j, i)`` whose source point ``M @ [j + .5, i + .5, 1]`` lies far enough
    from the image border that resampling filters see no edge, the position decoded from the
    pixel's colour must match: its mean offset along each axis within ``0.15`` of a pixel (of the
    source or the view, whichever is coarser along that axis) plus ``0.1`` of a colour level, so a
    matrix half a pixel off fails; the distance on average within ``0.6`` of a colour level plus
    ``0.15`` of a view pixel's footprint (which catches a flip error), and every pixel within
    ``1.5`` levels plus ``noise_levels`` (compression noise) plus one footprint. Blue must stay 128.
    Returns the worst statistics seen, for reporting.
    """
    worst = dict(mean_error=0.0, max_error=0.0, views_checked=0)
    matrices = batch.matrices.detach().to("cpu", torch.float64).numpy()
    for b in range(batch.batch_size):
        index = int(batch.index[b])
        src_h, src_w = (int(s) for s in batch.source_size[b])
        h0, w0 = sources[index]
        assert abs(src_w / src_h - w0 / h0) < 0.02 * (w0 / h0) + 1.0 / min(src_h, src_w), (
            f"sample {index}: source_size {(src_h, src_w)} does not have the aspect ratio of the {(h0, w0)} image written"
        )
        level = max(src_w, src_h) / 255.0  # source pixels per colour level
        for v, view in enumerate(batch.views):
            pixels = unnormalize(view[b], mean, std)
            height, width = pixels.shape[:2]
            m = matrices[b, v]
            xs = m[0, 0] * (np.arange(width) + 0.5) + m[0, 2]
            ys = m[1, 1] * (np.arange(height) + 0.5) + m[1, 2]
            footprint = float(max(abs(m[0, 0]), abs(m[1, 1]), 1.0))
            margin = 3.0 * footprint + 2.0 * level + 2.0
            keep_x = (xs > margin) & (xs < src_w - margin)
            keep_y = (ys > margin) & (ys < src_h - margin)
            if keep_x.sum() < 2 or keep_y.sum() < 2:
                continue
            decoded_x = pixels[keep_y][:, keep_x, 0] / 255.0 * src_w
            decoded_y = pixels[keep_y][:, keep_x, 1] / 255.0 * src_h
            error_x = decoded_x - xs[keep_x][None, :]
            error_y = decoded_y - ys[keep_y][:, None]
            error = np.hypot(error_x, error_y)
            mean_error, max_error = float(error.mean()), float(error.max())
            # Rounding noise averages out over a view, so a systematic shift (half a pixel, a flip
            # offset) shows as bias long before it shows in the per-pixel error. The limit per axis
            # is a fraction of that axis's coarser pixel (source or view) and of a colour level, sized
            # so that every backend's own offset passes (FFCV's INTER_AREA enlarging reaches 0.26 px)
            # and a half-pixel slip fails (test_round_trip_check_catches_a_half_pixel_slip).
            for axis, error, scale in (("x", error_x, m[0, 0]), ("y", error_y, m[1, 1])):
                bias = abs(float(error.mean()))
                bias_limit = 0.1 * level + 0.15 * max(1.0, abs(float(scale)))
                assert bias <= bias_limit, (
                    f"sample {index} view {v}: colours are shifted by {bias:.2f} source px in {axis} on average from the "
                    f"matrix's position (limit {bias_limit:.2f}); matrix {m.tolist()}, source {(src_h, src_w)}"
                )
                worst["bias"] = max(worst.get("bias", 0.0), bias / bias_limit)
            mean_limit = 0.6 * level * np.sqrt(2) + 0.15 * footprint
            max_limit = (1.5 + noise_levels) * level * np.sqrt(2) + footprint
            blue = pixels[..., 2]
            assert mean_error <= mean_limit, (
                f"sample {index} view {v}: colours sit {mean_error:.2f} source px from the matrix's position on average "
                f"(limit {mean_limit:.2f}); matrix {m.tolist()}, source {(src_h, src_w)}"
            )
            assert max_error <= max_limit, (
                f"sample {index} view {v}: a pixel sits {max_error:.2f} source px from the matrix's position (limit {max_limit:.2f})"
            )
            assert np.abs(blue - COORDINATE_BLUE).mean() < 2.0 + noise_levels, f"sample {index} view {v}: blue channel {blue.mean():.1f}, expected 128"
            worst["mean_error"] = max(worst["mean_error"], mean_error / level)
            worst["max_error"] = max(worst["max_error"], max_error / level)
            worst["views_checked"] += 1
    return worst


# (height, width, scale) of small images, for crop_sampler_gaps
SMALL_IMAGE_CROPS = [(10, 12, (0.5, 1.0)), (12, 9, (0.3, 0.5)), (7, 16, (0.6, 1.0))]


def crop_sampler_gaps(sampler, height: int, width: int, scale, ratio=(3 / 4, 4 / 3), draws: int = 3000) -> Tuple[float, float]:
    """How far a crop sampler's windows ``(x0, y0, w, h)`` on a ``height x width`` image are from
    torchvision's ``RandomResizedCrop.get_params``: ``(total variation distance between the
    distributions of (w, h), largest difference in the fraction of windows touching each side)``.
    On small images windows reach the sides, so a window size rejected at the border or a position
    range one short shows in both."""
    import torchvision.transforms as T
    from collections import Counter

    torch.manual_seed(0)
    image = torch.empty(3, height, width)
    theirs = [T.RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(draws)]
    theirs = [(j, i, w, h) for i, j, h, w in theirs]
    ours = [tuple(int(c) for c in sampler()[:4]) for _ in range(draws)]

    def sizes(windows):
        return Counter((w, h) for _, _, w, h in windows)

    def sides(windows):
        return np.mean([(x0 == 0, y0 == 0, x0 + w == width, y0 + h == height) for x0, y0, w, h in windows], axis=0)

    for x0, y0, w, h in ours:
        assert 0 <= x0 and 0 < w and x0 + w <= width and 0 <= y0 and 0 < h and y0 + h <= height, (x0, y0, w, h)
    a, b = sizes(ours), sizes(theirs)
    total_variation = 0.5 * sum(abs(a[k] - b[k]) for k in set(a) | set(b)) / draws
    return total_variation, float(np.abs(sides(ours) - sides(theirs)).max())


def single_view(batch, b: int, v: int, matrix: torch.Tensor):
    """Image ``b``'s view ``v`` of ``batch`` alone, as a one-image, one-view batch with ``matrix``
    ``[3, 3]`` in place of its own (to probe :func:`roundtrip_check` view by view)."""
    return type(batch)([batch.views[v][b:b + 1]], matrix.to(batch.matrices)[None, None], batch.source_size[b:b + 1], batch.index[b:b + 1])


def build_bad_corpus(root: Path) -> Dict:
    """Write an image folder of awkward files under ``root`` and say what a loader must make of them.

    Returns a dict:
        ``root``: the folder to load; ``classes``: the class list a scan must find (the empty class
        folder is not one); ``unreadable``: ``{path: kind}`` of files that must be skipped and
        reported; ``readable``: ``{path: facts}`` with ``kind``, upright ``size`` ``(h, w)`` and
        either ``colour`` (every view pixel's expected RGB, within JPEG noise), ``gray`` (R == G == B)
        or ``coordinates`` (a coordinate image: run :func:`roundtrip_check` on it).
    """
    root = Path(root)
    good, bad, nested = root / "good", root / "bad", root / "nested"
    readable, unreadable = {}, {}

    def solid(h, w, colour):
        return np.broadcast_to(np.array(colour, dtype=np.uint8), (h, w, 3)).copy()

    # Readable files of every awkward kind.
    path = save_image(solid(48, 64, (90, 90, 90)), good / "gray_L.jpg", quality=95)
    Image.fromarray(np.full((48, 64), 90, np.uint8), "L").save(path, quality=95)
    readable[path] = dict(kind="grayscale JPEG (mode L)", size=(48, 64), gray=True, colour=(90, 90, 90))

    path = good / "cmyk.jpg"
    Image.fromarray(solid(40, 56, (200, 60, 30))).convert("CMYK").save(path, quality=95)
    readable[path] = dict(kind="CMYK JPEG", size=(40, 56), colour=(200, 60, 30))

    path = good / "alpha.png"
    rgba = np.concatenate([solid(36, 50, (10, 200, 40)), np.full((36, 50, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(path)
    readable[path] = dict(kind="PNG with alpha (RGBA), alpha dropped", size=(36, 50), colour=(10, 200, 40))

    path = good / "sixteen_bit.png"
    Image.fromarray(np.full((30, 44), 40000, np.uint16)).save(path)
    readable[path] = dict(kind="16-bit grayscale PNG", size=(30, 44), gray=True, colour=(156, 156, 156))

    path = good / "palette.png"
    Image.fromarray(solid(32, 32, (250, 180, 0))).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(path)
    readable[path] = dict(kind="palette PNG (mode P)", size=(32, 32), colour=(250, 180, 0))

    path = save_image(coordinate_image(120, 200), good / "exif_rotated.jpg", orientation=6, quality=98, subsampling=0)
    readable[path] = dict(kind="EXIF orientation 6 JPEG (stored 120 wide, 200 high)", size=(120, 200), coordinates=True)

    path = save_image(solid(8, 8, (30, 60, 220)), good / "tiny_8x8.png")
    readable[path] = dict(kind="8x8 PNG", size=(8, 8), colour=(30, 60, 220))

    path = save_image(solid(4000, 6000, (120, 30, 160)), good / "large_6000x4000.jpg", quality=90)
    readable[path] = dict(kind="6000x4000 JPEG", size=(4000, 6000), colour=(120, 30, 160))

    path = save_image(solid(40, 40, (0, 150, 150)), nested / "deeper" / "deepest" / "nested.jpg", quality=95)
    readable[path] = dict(kind="JPEG in a nested folder of its class", size=(40, 40), colour=(0, 150, 150))

    # Files that must be skipped, not crash the epoch.
    bad.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(coordinate_image(64, 64)).save(buffer, format="JPEG", quality=90)
    path = bad / "truncated.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    unreadable[path] = "truncated JPEG"
    path = bad / "zero_bytes.jpg"
    path.write_bytes(b"")
    unreadable[path] = "zero-byte file"
    path = bad / "text.jpg"
    path.write_text("this is not an image\n")
    unreadable[path] = "text file named .jpg"
    (bad / "notes.txt").write_text("not an image extension: never a sample\n")

    # A class folder with nothing in it, and one with only an empty sub-folder: neither is a class.
    (root / "empty").mkdir(parents=True, exist_ok=True)
    (root / "empty_nested" / "sub").mkdir(parents=True, exist_ok=True)
    return dict(root=root, classes=["bad", "good", "nested"], readable=readable, unreadable=unreadable)
