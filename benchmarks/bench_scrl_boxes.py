"""SCRL box sampler: C++ (fastdense._C) against the Python reference, on one CPU core.

Views are SCRL's: two RandomResizedCrop(224, scale=(0.2, 1)) crops with random flips per image, on
ImageNet-sized sources. Both backends get the same per-image keys and must return identical boxes
before anything is timed. Target (PERFORMANCE.md): C++ >= 50x faster than the reference at 256 images.

    PYTHONPATH=. python3 benchmarks/bench_scrl_boxes.py            # 256 images
    PYTHONPATH=. python3 benchmarks/bench_scrl_boxes.py --quick    # 32 images, seconds
"""

from __future__ import annotations

import argparse

import torch
from torchvision.transforms import RandomResizedCrop

from benchmarks.common import print_table, time_ms, write_results
from fastdense import boxes, geometry
from fastdense.ops import backend

VIEW = 224


def scrl_view_matrices(batch: int, seed: int) -> torch.Tensor:
    """``[batch, 2, 3, 3]`` matrices of SCRL's two crops, drawn with torchvision's own sampler."""
    torch.manual_seed(seed)
    rows = []
    for _ in range(batch):
        height, width = torch.randint(300, 600, (2,)).tolist()
        source = torch.empty(1, height, width)
        views = []
        for _ in range(2):
            top, left, h, w = RandomResizedCrop.get_params(source, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
            views.append(geometry.crop_matrix(float(left), float(top), float(w), float(h), VIEW, VIEW, bool(torch.rand(()) < 0.5)))
        rows.append(torch.stack(views))
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="32 images, few repeats")
    args = parser.parse_args()
    images = 32 if args.quick else args.images
    torch.set_num_threads(1)
    device = torch.device("cpu")
    assert boxes._cpp_module() is not None, "fastdense._C is not built: run `python3 setup.py build_ext --inplace`"

    matrices = scrl_view_matrices(images, seed=0)
    keys = boxes.draw_scrl_randoms(images, torch.Generator().manual_seed(1))

    def run(name):
        with backend(name):
            return boxes.sample_scrl_boxes(matrices, random=keys)

    fast, ref = run("cpp"), run("reference")
    for view in range(2):
        assert torch.equal(fast.rois[view], ref.rois[view]), "C++ and reference boxes differ"
    assert torch.equal(fast.counts, ref.counts)

    generator = torch.Generator().manual_seed(2)

    def cpp_with_draw():
        with backend("cpp"):
            return boxes.sample_scrl_boxes(matrices, generator=generator)

    reference_ms = time_ms(lambda: run("reference"), device, repeats=3 if args.quick else 11, warmup=1)
    cpp_ms = time_ms(lambda: run("cpp"), device, repeats=50 if args.quick else 200, warmup=5)
    cpp_draw_ms = time_ms(cpp_with_draw, device, repeats=50 if args.quick else 200, warmup=5)
    common = {"images": images, "boxes": int(ref.counts.sum()), "rule_met": float(ref.iou_rule_met.float().mean())}
    rows = [
        {"backend": "reference (Python)", **common, "ms": reference_ms, "speedup": 1.0},
        {"backend": "cpp", **common, "ms": cpp_ms, "speedup": reference_ms / cpp_ms},
        {"backend": "cpp + key draw", **common, "ms": cpp_draw_ms, "speedup": reference_ms / cpp_draw_ms},
    ]
    print_table(rows, ["backend", "images", "boxes", "rule_met", "ms", "speedup"])
    print(f"C++ sampler vs Python reference at {images} images, 1 thread: {reference_ms / cpp_ms:.0f}x (target >= 50x)")
    path = write_results("scrl_boxes", device, rows, extra={"threads": torch.get_num_threads(), "target_speedup": 50})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
