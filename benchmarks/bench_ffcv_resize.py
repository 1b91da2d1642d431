"""The FFCV backend's crop resize: OpenCV's INTER_AREA (what FFCV's ``resize_crop`` does) against
INTER_LINEAR and INTER_CUBIC, in time per crop and in error against the recipes' resize.

The recipes resize as torchvision does on PIL images: antialiased bicubic (SCRL, VICRegL, SelfPatch)
or bilinear (LEWEL). The reference is that resize in float64 (``interpolate(..., antialias=True)``
on the crop as float64, clipped to 0-255); errors are in grey levels, RMS and largest, with the
floor that rounding the reference itself to uint8 would leave. The torch backend's own resize
(PyTorch's antialiased uint8 kernel) is measured beside them for scale: FFCV's compiled decoder
cannot call it.

Crops: RandomResizedCrop-like windows of scale 0.05-1.0 (square, at random positions; scale 1 is the
whole image) of 500x375 sources resized to 224 and 96 px: the built-in scenes that
``bench_pipelines.py`` uses (JPEG q90, decoded), and 1/f noise (the power spectrum of natural
photographs, detail at every scale). One core; times are medians over repeats, ratios against
INTER_AREA measured in the same run.

    PYTHONPATH=. python3 benchmarks/bench_ffcv_resize.py            # about a minute
    PYTHONPATH=. python3 benchmarks/bench_ffcv_resize.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path
from typing import Callable, Dict, List

import cv2
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python3 benchmarks/<script>.py` imports the repository's packages

from benchmarks.common import help_description, print_table, time_ms, write_results  # noqa: E402
from fastdense.pipelines.builtin import render_scene  # noqa: E402

SOURCE_HEIGHT, SOURCE_WIDTH = 375, 500
SCALES = (0.05, 0.08, 0.14, 0.2, 0.35, 0.5, 0.75, 1.0)  # from SelfPatch's and VICRegL's smallest crops to SCRL's range
SIZES = (224, 96)
OPENCV = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}


def scene_sources(count: int) -> List[np.ndarray]:
    """``bench_pipelines.py``'s images: built-in scenes cut to 500x375, JPEG q90, decoded."""
    sources = []
    for index in range(count):
        image, _ = render_scene(index, index % 10, SOURCE_WIDTH, 10, seed=1)
        encoded = io.BytesIO()
        Image.fromarray(image[:SOURCE_HEIGHT]).save(encoded, format="JPEG", quality=90)
        sources.append(np.asarray(Image.open(encoded).convert("RGB")))
    return sources


def pink_noise_sources(count: int, seed: int = 0) -> List[np.ndarray]:
    """RGB 1/f noise (amplitude falling as 1 / frequency), stretched to 0-255."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(SOURCE_HEIGHT)[:, None]
    fx = np.fft.rfftfreq(SOURCE_WIDTH)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(SOURCE_HEIGHT, SOURCE_WIDTH))
    sources = []
    for _ in range(count):
        channels = []
        for _ in range(3):
            spectrum = amplitude * np.exp(2j * np.pi * rng.random(amplitude.shape))
            field = np.fft.irfft2(spectrum, s=(SOURCE_HEIGHT, SOURCE_WIDTH))
            low, high = np.percentile(field, [0.5, 99.5])
            channels.append(np.clip((field - low) / (high - low) * 255.0, 0, 255))
        sources.append(np.round(np.stack(channels, axis=-1)).astype(np.uint8))
    return sources


def crop_window(scale: float, rng: np.random.Generator):
    """``(y0, x0, h, w)``: a square window of ``scale`` of the source area at a random position, or
    the whole source at scale 1 (a square of that area does not fit)."""
    if scale >= 1.0:
        return 0, 0, SOURCE_HEIGHT, SOURCE_WIDTH
    side = int(round(math.sqrt(scale * SOURCE_HEIGHT * SOURCE_WIDTH)))
    return int(rng.integers(0, SOURCE_HEIGHT - side + 1)), int(rng.integers(0, SOURCE_WIDTH - side + 1)), side, side


def reference(crop: np.ndarray, size: int, mode: str) -> np.ndarray:
    """The recipe's resize in float64: antialiased ``mode`` ("bicubic" or "bilinear"), clipped to 0-255."""
    x = torch.from_numpy(crop).permute(2, 0, 1)[None].double()
    out = torch.nn.functional.interpolate(x, size=(size, size), mode=mode, antialias=True)
    return out[0].permute(1, 2, 0).clamp(0, 255).numpy()


def resizers(size: int) -> Dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Every candidate as ``crop [h, w, 3] uint8 -> [size, size, 3] uint8``."""
    calls = {name: (lambda crop, flag=flag: cv2.resize(crop, (size, size), interpolation=flag)) for name, flag in OPENCV.items()}

    def torch_antialias(crop):
        window = torch.from_numpy(crop).permute(2, 0, 1)[None]  # channels-last strides: the fast uint8 path
        return torch.nn.functional.interpolate(window, size=(size, size), mode="bicubic", antialias=True)[0].permute(1, 2, 0).numpy()

    calls["torch_antialias"] = torch_antialias
    return calls


def check_ffcv_uses_inter_area(source: np.ndarray) -> None:
    """FFCV's compiled ``resize_crop`` (what the backend calls) gives INTER_AREA's pixels exactly."""
    from ffcv.libffcv import resize_crop

    for y0, x0, h, w in ((10, 20, 300, 300), (0, 0, SOURCE_HEIGHT, SOURCE_WIDTH), (50, 60, 150, 150)):
        for size in SIZES:
            out = np.empty((size, size, 3), np.uint8)
            resize_crop(source, y0, y0 + h, x0, x0 + w, out)
            expected = cv2.resize(source[y0:y0 + h, x0:x0 + w], (size, size), interpolation=cv2.INTER_AREA)
            assert np.array_equal(out, expected), "FFCV's resize_crop no longer matches cv2.INTER_AREA: update this benchmark"


def measure(content: str, sources: List[np.ndarray], crops_per_row: int, repeats: int, seed: int) -> List[Dict]:
    rows = []
    for size in SIZES:
        calls = resizers(size)
        for scale in SCALES:
            rng = np.random.default_rng([seed, size, int(scale * 100)])
            figures = {name: dict(us=[], rms_bicubic=[], max_bicubic=[], rms_bilinear=[]) for name in calls}
            floor = []
            for k in range(crops_per_row):
                source = sources[k % len(sources)]
                y0, x0, h, w = crop_window(scale, rng)
                crop = source[y0:y0 + h, x0:x0 + w]  # a window of the decoded buffer, as FFCV resizes it
                bicubic, bilinear = reference(crop, size, "bicubic"), reference(crop, size, "bilinear")
                floor.append(np.sqrt(np.mean((np.round(bicubic) - bicubic) ** 2)))
                for name, call in calls.items():
                    out = call(crop).astype(np.float64)
                    figures[name]["rms_bicubic"].append(np.sqrt(np.mean((out - bicubic) ** 2)))
                    figures[name]["max_bicubic"].append(np.abs(out - bicubic).max())
                    figures[name]["rms_bilinear"].append(np.sqrt(np.mean((out - bilinear) ** 2)))
                    figures[name]["us"].append(time_ms(lambda: call(crop), torch.device("cpu"), repeats=repeats) * 1e3)
            row = dict(content=content, size=size, scale=scale, crop=f"{h}x{w}", enlarged=bool(min(h, w) < size), rounding_floor_rms=float(np.mean(floor)))
            area_us = float(np.mean(figures["area"]["us"]))
            for name, values in figures.items():
                row[f"{name}_us"] = float(np.mean(values["us"]))
                row[f"{name}_time_vs_area"] = row[f"{name}_us"] / area_us
                row[f"{name}_rms_bicubic"] = float(np.mean(values["rms_bicubic"]))
                row[f"{name}_max_bicubic"] = float(np.max(values["max_bicubic"]))
                row[f"{name}_rms_bilinear"] = float(np.mean(values["rms_bilinear"]))
            rows.append(row)
            print(f"{content} {size}px scale {scale}: " + ", ".join(
                f"{name} {row[f'{name}_us']:.0f} us rms {row[f'{name}_rms_bicubic']:.2f}" for name in calls), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=help_description(__doc__))
    parser.add_argument("--quick", action="store_true", help="one crop per row, few repeats")
    parser.add_argument("--crops", type=int, default=6, help="crops (over 6 sources) per content, size and scale (default: %(default)s; --quick: 1)")
    parser.add_argument("--repeats", type=int, default=25, help="timings per crop and mode, the median reported (default: %(default)s; --quick: 5)")
    args = parser.parse_args()
    crops, repeats = (1, 5) if args.quick else (args.crops, args.repeats)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    scenes = scene_sources(6)
    check_ffcv_uses_inter_area(scenes[0])
    rows = measure("scenes", scenes, crops, repeats, seed=0) + measure("1/f noise", pink_noise_sources(6), crops, repeats, seed=1)

    columns = ["content", "size", "scale", "crop", "rounding_floor_rms"]
    for name in ("area", "linear", "cubic", "torch_antialias"):
        columns += [f"{name}_us", f"{name}_rms_bicubic", f"{name}_max_bicubic"]
    print_table(rows, columns)
    summary = []
    for content in ("scenes", "1/f noise"):
        for enlarged in (True, False):
            group = [r for r in rows if r["content"] == content and r["enlarged"] == enlarged]
            if not group:
                continue
            entry = dict(content=content, crops="enlarged" if enlarged else "shrunk", rows=len(group))
            for name in ("area", "linear", "cubic", "torch_antialias"):
                entry[f"{name}_time_vs_area"] = float(np.mean([r[f"{name}_time_vs_area"] for r in group]))
                entry[f"{name}_rms_bicubic"] = float(np.mean([r[f"{name}_rms_bicubic"] for r in group]))
                entry[f"{name}_rms_bilinear"] = float(np.mean([r[f"{name}_rms_bilinear"] for r in group]))
            summary.append(entry)
    print_table(summary, list(summary[0]))
    extra = dict(threads=1, opencv=cv2.__version__, crops_per_row=crops, repeats=repeats, quick=args.quick, summary=summary,
                 source=f"{SOURCE_WIDTH}x{SOURCE_HEIGHT}", reference="interpolate(float64, antialias=True), clipped to 0-255")
    path = write_results("ffcv_resize" + ("_quick" if args.quick else ""), torch.device("cpu"), rows, extra=extra)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
