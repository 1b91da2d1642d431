"""Images per second for two 224 px views per image: each pipeline backend against the naive
PIL + torchvision ``DataLoader`` the reference repositories use (same images, same workers).

Images: generated scenes, 500x375 JPEG at quality 90 (ImageNet-like), cached under
``$FASTDENSE_CACHE``. Recipe: SCRL's (two 224 px views, bicubic, BYOL colours). Two modes:
``geometry`` (crop, resize, flip, normalise) and ``full`` (plus the colour pipeline; the baseline
runs it with PIL in its workers, fastdense batched on the loader's device).

    PYTHONPATH=. python3 benchmarks/bench_pipelines.py            # GPU machine: all backends, 10,000 files
    PYTHONPATH=. python3 benchmarks/bench_pipelines.py --quick    # CPU, seconds
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from benchmarks.common import print_table, write_results
from fastdense.pipelines import BACKENDS, make_loader
from fastdense.pipelines.builtin import cache_dir, render_scene
from fastdense.pipelines.recipes import get_recipe

PIPELINES_DIR = Path(__file__).resolve().parent.parent / "pipelines"


# Distinct scenes at most; larger sets repeat them as hard links. Decoding costs the same for a
# repeated file, and a GPU loader needs tens of thousands of files for an epoch of a few seconds,
# which would take minutes to render.
UNIQUE_IMAGES = 2000


def _render_bench_image(index: int, path: Path) -> None:
    image, _ = render_scene(index, index % 10, 500, 10, seed=1)
    Image.fromarray(image[:375]).save(path, quality=90)


def bench_images(count: int) -> Path:
    """``count`` 500x375 JPEGs (q90) in two class folders, generated once (in parallel) and cached;
    file ``i`` is scene ``i % UNIQUE_IMAGES``."""
    root = cache_dir() / f"bench-500x375-q90-{count}"
    if (root / "done").is_file():
        return root
    paths = [root / f"class{index % 2}" / f"{index:06d}.jpg" for index in range(count)]
    for folder in {path.parent for path in paths}:
        folder.mkdir(parents=True, exist_ok=True)
    unique = min(count, UNIQUE_IMAGES)
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_render_bench_image, range(unique), paths[:unique], chunksize=16))
    for index in range(unique, count):
        source = paths[index % unique]
        try:
            os.link(source, paths[index])
        except OSError:  # a file system without hard links
            shutil.copyfile(source, paths[index])
    (root / "done").write_text("ok")
    return root


class TwoViews:
    """The reference repositories' dataset transform: two independently augmented views."""

    def __init__(self, photometric: bool):
        recipe = get_recipe("scrl")
        steps = [T.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip()]
        self.views = []
        for spec in recipe.views:
            colour = []
            if photometric:
                colour = [T.RandomApply([T.ColorJitter(*spec.jitter)], p=spec.jitter_p), T.RandomGrayscale(spec.grayscale_p),
                          T.RandomApply([T.GaussianBlur(spec.blur_kernel_size, spec.blur_sigma)], p=spec.blur_p),
                          T.RandomSolarize(128, p=spec.solarize_p)]
            self.views.append(T.Compose(steps + colour + [T.ToTensor(), T.Normalize(recipe.mean, recipe.std)]))

    def __call__(self, image):
        return [view(image) for view in self.views]


def baseline_loader(root: Path, batch_size: int, workers: int, photometric: bool):
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(root), transform=TwoViews(photometric))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0)


def images_per_second(loader, device) -> float:
    """Throughput over one epoch, from the end of the first batch (worker start-up excluded)."""
    iterator = iter(loader)
    next(iterator)
    start, count = time.perf_counter(), 0
    for batch in iterator:
        views = batch.views if hasattr(batch, "views") else [v.to(device, non_blocking=True) for v in batch[0]]
        count += views[0].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: few images, small batches")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--backends", default="torch,dali,ffcv")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = args.images or (96 if args.quick else 10000 if device.type == "cuda" else 5000)
    workers = args.workers if args.workers is not None else (2 if args.quick else 8)
    batch_size = args.batch_size or (16 if args.quick else 256)
    root = bench_images(images)
    rows = []
    for mode in ("geometry", "full"):
        photometric = mode == "full"
        baseline = images_per_second(baseline_loader(root, batch_size, workers, photometric), device)
        rows.append(dict(backend="pil-torchvision baseline", mode=mode, images_per_s=baseline, per_worker=baseline / max(workers, 1), speedup=1.0))
        for backend in args.backends.split(","):
            if backend not in BACKENDS or not (PIPELINES_DIR / f"{backend}_backend.py").is_file():
                continue
            options = {}
            data = root
            if backend == "ffcv":
                from fastdense.pipelines import write_beton

                data = root.with_suffix(".beton")
                if not data.is_file():
                    write_beton(root, data)
            try:
                loader = make_loader(backend, data=data, recipe="scrl", batch_size=batch_size, num_workers=workers, device=device, photometric=photometric, **options)
            except ImportError as error:
                print(f"skipping {backend}: {error}")
                continue
            rate = images_per_second(loader, device)
            rows.append(dict(backend=backend, mode=mode, images_per_s=rate, per_worker=rate / max(workers, 1), speedup=rate / baseline))
    print_table(rows, ["backend", "mode", "images_per_s", "per_worker", "speedup"])
    path = write_results("bench_pipelines", device, rows, extra=dict(images=images, workers=workers, batch_size=batch_size, image_size="500x375 JPEG q90", quick=args.quick))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
