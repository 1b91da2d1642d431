"""Images per second for two 224 px views per image: each pipeline backend against the naive
PIL + torchvision ``DataLoader`` the reference repositories use (same images, same workers).

Images: generated scenes, 500x375 JPEG at quality 90 (ImageNet-like), cached under
``$FASTDENSE_CACHE``. Recipe: SCRL's (two 224 px views, bicubic, BYOL colours). Two modes:
``geometry`` (crop, resize, flip, normalise) and ``full`` (plus the colour pipeline; the baseline
runs it with PIL in its workers, fastdense batched on the loader's device).

Each loader's first batch is checked before anything is timed (two finite, non-constant views of the
recipe's size per image; for fastdense, matrices whose views lie inside their source image), and
every timed batch's view shapes, so a backend that skips work cannot report a fast figure. A figure
is the median over ``--repeats`` epochs, each timed from the end of its first batch (worker start-up
excluded). "Per core" is per CPU-second: the CPU time of this process (every thread: DALI's, FFCV's)
and of its loader worker processes over the same interval, so it holds whatever the worker count
and however many cores the workers really kept busy (``cores_used``). Targets (PERFORMANCE.md): a
backend loading on the CPU >= 1.5x the baseline's images per core-second; DALI on one GPU >= 5,000
images/s.

    PYTHONPATH=. python3 benchmarks/bench_pipelines.py            # GPU machine: all backends, 10,000 files
    PYTHONPATH=. python3 benchmarks/bench_pipelines.py --quick    # CPU, seconds
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python3 benchmarks/<script>.py` imports the repository's packages

from benchmarks.common import help_description, installed_versions, print_table, write_results  # noqa: E402
from fastdense.geometry import view_extent  # noqa: E402
from fastdense.pipelines import BACKENDS, make_loader  # noqa: E402
from fastdense.pipelines.builtin import cache_dir, render_scene  # noqa: E402
from fastdense.pipelines.recipes import get_recipe  # noqa: E402

PIPELINES_DIR = Path(__file__).resolve().parent.parent / "pipelines"
TARGET_CPU_SPEEDUP_PER_CORE = 1.5  # PERFORMANCE.md: a CPU backend against the baseline, images/s per core
TARGET_DALI_GPU_IMAGES_PER_S = 5000  # PERFORMANCE.md: DALI on one GPU machine


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


def _proc_stat(pid) -> List[str]:
    """The fields of ``/proc/<pid>/stat`` from field 3 on (the command name, field 2, may hold spaces)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree() -> List[int]:
    """This process and its descendants (the loader worker processes), from ``/proc``."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(_proc_stat(entry.name)[1])
            except OSError:  # exited while the list was read
                continue
    tree, frontier = set(), {os.getpid()}
    while frontier:
        tree |= frontier
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - tree
    return sorted(tree)


def cpu_seconds(pids: List[int]) -> Dict[int, float]:
    """User + system CPU seconds of each process of ``pids`` still running (all its threads)."""
    tick, seconds = os.sysconf("SC_CLK_TCK"), {}
    for pid in pids:
        try:
            fields = _proc_stat(pid)
        except OSError:
            continue
        seconds[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime and stime, fields 14 and 15
    return seconds


def check_batch(batch, batch_size: int, view_sizes) -> None:
    """Raise unless ``batch`` (a baseline ``(views, labels)`` or a fastdense ``ViewBatch``) holds one
    finite, non-constant ``[batch_size, 3, size, size]`` tensor per view size and, for a ViewBatch,
    matrices that place every view inside its source image."""
    views = batch.views if hasattr(batch, "views") else batch[0]
    shapes = [tuple(view.shape) for view in views]
    expected = [(batch_size, 3, size, size) for size in view_sizes]
    if shapes != expected:
        raise ValueError(f"views of shapes {shapes}, expected {expected}")
    for number, view in enumerate(views):
        view = view.float()
        if not bool(torch.isfinite(view).all()) or float(view.std()) == 0.0:
            raise ValueError(f"view {number} is constant or not finite")
    if not hasattr(batch, "matrices"):
        return
    for number, size in enumerate(view_sizes):
        extent = view_extent(batch.matrices[:, number].float().cpu(), (size, size))  # [B, 4] source box
        height, width = batch.source_size.float().cpu().unbind(-1)
        # Crops lie inside the source; a little slack for the float32 matrices.
        slack = 1e-3 * torch.maximum(height, width)
        inside = ((extent[:, 0] >= -slack) & (extent[:, 1] >= -slack) & (extent[:, 2] <= width + slack)
                  & (extent[:, 3] <= height + slack) & (extent[:, 2] > extent[:, 0]) & (extent[:, 3] > extent[:, 1]))
        if not bool(inside.all()):
            raise ValueError(f"view {number}: matrices place a view outside its source image or give it no area")


def measure_epoch(loader, device, batch_size: int, view_sizes):
    """``(images/s, images per CPU-second, cores used)`` over one epoch of ``loader``, timed from the
    end of its first batch (worker start-up excluded); the first batch is checked in full
    (:func:`check_batch`), every other one by the shapes of its views."""
    iterator = iter(loader)
    check_batch(next(iterator), batch_size, view_sizes)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    pids = process_tree()  # the workers are running by now
    start, start_cpu, count = time.perf_counter(), cpu_seconds(pids), 0
    last_cpu = dict(start_cpu)
    expected = [(batch_size, 3, size, size) for size in view_sizes]
    for batch in iterator:
        views = batch.views if hasattr(batch, "views") else [v.to(device, non_blocking=True) for v in batch[0]]
        if [tuple(view.shape) for view in views] != expected:
            raise ValueError(f"a batch of views {[tuple(view.shape) for view in views]}, expected {expected}")
        count += views[0].shape[0]
        # Read after every batch: a worker that shuts down at the end of the epoch keeps its last reading.
        last_cpu.update(cpu_seconds(pids))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if not count:
        raise ValueError("the loader yielded one batch per epoch; use more --images or a smaller --batch-size")
    used = sum(last_cpu.values()) - sum(start_cpu.values())
    return count / seconds, count / used, used / seconds


def measure(loader, device, batch_size: int, view_sizes, repeats: int) -> dict:
    """The medians of :func:`measure_epoch` over ``repeats`` epochs."""
    epochs = [measure_epoch(loader, device, batch_size, view_sizes) for _ in range(repeats)]
    rate, per_core, cores = (statistics.median(column) for column in zip(*epochs))
    return dict(images_per_s=rate, images_per_core_s=per_core, cores_used=cores)


def main(argv=None):
    parser = argparse.ArgumentParser(description=help_description(__doc__))
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: few images, small batches")
    parser.add_argument("--images", type=int, default=None, help="JPEG files to generate and load (default 10,000 on a GPU, 5,000 on a CPU; 96 with --quick)")
    parser.add_argument("--workers", type=int, default=None, help="loader worker processes, the same for every loader (default 8; 2 with --quick)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default 256; 16 with --quick)")
    parser.add_argument("--backends", default="torch,dali,ffcv", help="comma-separated fastdense backends to time beside the baseline (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=None, help="timed epochs per loader, the median reported (default 3; 2 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the main process (default: torch's)")
    args = parser.parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = args.images or (96 if args.quick else 10000 if device.type == "cuda" else 5000)
    workers = args.workers if args.workers is not None else (2 if args.quick else 8)
    batch_size = args.batch_size or (16 if args.quick else 256)
    repeats = args.repeats or (2 if args.quick else 3)
    view_sizes = [spec.size for spec in get_recipe("scrl").views]
    root = bench_images(images)
    rows = []
    for mode in ("geometry", "full"):
        photometric = mode == "full"
        baseline = measure(baseline_loader(root, batch_size, workers, photometric), device, batch_size, view_sizes, repeats)
        rows.append(dict(backend="pil-torchvision baseline", mode=mode, **baseline, speedup=1.0, per_core_speedup=1.0,
                         meets_per_core_target=None, meets_images_per_s_target=None))
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
            figures = measure(loader, device, batch_size, view_sizes, repeats)
            per_core_speedup = figures["images_per_core_s"] / baseline["images_per_core_s"]
            # Each target is for one configuration: a backend loading on the CPU, DALI loading on a GPU.
            on_cpu = device.type == "cpu"
            rows.append(dict(backend=backend, mode=mode, **figures, speedup=figures["images_per_s"] / baseline["images_per_s"],
                             per_core_speedup=per_core_speedup,
                             meets_per_core_target=per_core_speedup >= TARGET_CPU_SPEEDUP_PER_CORE if on_cpu else None,
                             meets_images_per_s_target=figures["images_per_s"] >= TARGET_DALI_GPU_IMAGES_PER_S
                             if backend == "dali" and not on_cpu else None))
    print_table(rows, ["backend", "mode", "images_per_s", "images_per_core_s", "cores_used", "speedup", "per_core_speedup"])
    extra = dict(images=images, workers=workers, threads=threads, batch_size=batch_size, view_sizes=view_sizes, repeats=repeats,
                 image_size="500x375 JPEG q90", quick=args.quick, target_per_core_speedup=TARGET_CPU_SPEEDUP_PER_CORE,
                 target_dali_gpu_images_per_s=TARGET_DALI_GPU_IMAGES_PER_S,
                 versions=installed_versions("torchvision", "pillow", "nvidia-dali", "ffcv"))
    path = write_results("bench_pipelines" + ("_quick" if args.quick else ""), device, rows, extra=extra)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
