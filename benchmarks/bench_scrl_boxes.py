"""SCRL box sampler: C++ (fastdense._C) against SCRL's own Python loop and fastdense's Python reference, on one CPU core.

Views are SCRL's: two RandomResizedCrop(224, scale=(0.2, 1)) crops with random flips per image, on
ImageNet-sized sources. Both fastdense backends get the same per-image keys and must return
identical boxes before anything is timed. The baseline of PERFORMANCE.md is the reference code's
loop (``SCRLBoxGenerator.generate`` in kakaobrain/scrl: crop tuples read with ``.item()``, one
``np.random.randint`` per draw, a Python IoU loop); :func:`scrl_loop_baseline` is that algorithm
as the reference code runs it, and must give every image as many boxes as fastdense does. Target
(PERFORMANCE.md): C++ >= 50x faster than SCRL's loop at 256 images.

    PYTHONPATH=. python3 benchmarks/bench_scrl_boxes.py            # 256 images
    PYTHONPATH=. python3 benchmarks/bench_scrl_boxes.py --quick    # 32 images, seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import RandomResizedCrop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python3 benchmarks/<script>.py` imports the repository's packages

from benchmarks.common import help_description, print_table, time_ms, write_results  # noqa: E402
from fastdense import boxes, geometry  # noqa: E402
from fastdense.ops import backend  # noqa: E402

VIEW = 224


def scrl_views(batch: int, seed: int):
    """SCRL's two crops per image, drawn with torchvision's own sampler: ``[batch, 2, 3, 3]``
    matrices, and the same crops as the reference code's two ``[batch, 5]`` tuples
    ``(top, left, height, width, flipped)``."""
    torch.manual_seed(seed)
    matrices, crops = [], []
    for _ in range(batch):
        height, width = torch.randint(300, 600, (2,)).tolist()
        source = torch.empty(1, height, width)
        views, tuples = [], []
        for _ in range(2):
            top, left, h, w = RandomResizedCrop.get_params(source, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
            flipped = bool(torch.rand(()) < 0.5)
            views.append(geometry.crop_matrix(float(left), float(top), float(w), float(h), VIEW, VIEW, flipped))
            tuples.append([top, left, h, w, int(flipped)])
        matrices.append(torch.stack(views))
        crops.append(tuples)
    crops = torch.tensor(crops, dtype=torch.float64)
    return torch.stack(matrices), (crops[:, 0], crops[:, 1])


def scrl_loop_baseline(crops, num_boxes: int = 10, min_size: int = 32, iou_threshold: float = 0.5, max_tries: int = 50):
    """SCRL's grid-based box generator as its reference code runs it (no box jittering): per image,
    the two crop tuples read with ``.item()``, the overlap rescaled to the more zoomed-out view,
    one ``np.random.randint`` per draw, up to ``max_tries`` tries per box against a Python IoU
    loop over the image's earlier boxes, the boxes mapped into both views (flip-aware), clipped and
    collected into two ``[K, 5]`` tensors (view 2's batch index offset by the batch size)."""
    first, second = crops
    batch = first.shape[0]
    view1_boxes, view2_boxes = [], []
    for b in range(batch):
        t1, t2 = first[b], second[b]
        left, right = max(t1[1], t2[1]).item(), min(t1[1] + t1[3], t2[1] + t2[3]).item()
        top, bottom = max(t1[0], t2[0]).item(), min(t1[0] + t1[2], t2[0] + t2[2]).item()
        if left >= right or top >= bottom:
            continue
        sx1, sy1 = VIEW / t1[3].item(), VIEW / t1[2].item()
        sx2, sy2 = VIEW / t2[3].item(), VIEW / t2[2].item()
        sx, sy = min(sx1, sx2), min(sy1, sy2)
        width, height = round((right - left) * sx), round((bottom - top) * sy)
        if min_size >= width or min_size >= height:
            continue
        divisions_x, divisions_y = int(width / min_size) + 1, int(height / min_size) + 1
        for k in range(num_boxes):
            for _ in range(max_tries):
                div_x, div_y = np.random.randint(1, divisions_x), np.random.randint(1, divisions_y)
                cell_w, cell_h = width / div_x, height / div_y
                cell_x, cell_y = np.random.randint(0, div_x), np.random.randint(0, div_y)
                box_w, box_h = np.random.randint(min_size, cell_w + 1), np.random.randint(min_size, cell_h + 1)
                box_x = np.random.randint(0, cell_w - box_w + 1) + int(cell_x * cell_w)
                box_y = np.random.randint(0, cell_h - box_h + 1) + int(cell_y * cell_h)
                mapped = []
                for t, scale_x, scale_y in ((t1, sx1, sy1), (t2, sx2, sy2)):
                    x1 = box_x / sx * scale_x + (left - t[1].item()) * scale_x
                    y1 = box_y / sy * scale_y + (top - t[0].item()) * scale_y
                    x2, y2 = x1 + box_w / sx * scale_x, y1 + box_h / sy * scale_y
                    if t[4]:
                        x1, x2 = VIEW - x2, VIEW - x1
                    mapped.append([x1, y1, x2, y2])
                if k == 0 or iou_threshold == 1.0:
                    break
                if max(_iou(mapped[0], earlier[1:]) for earlier in view1_boxes[-k:]) < iou_threshold:
                    break
            view1_boxes.append(_clip([b, *mapped[0]]))
            view2_boxes.append(_clip([b + batch, *mapped[1]]))
    return torch.tensor(view1_boxes), torch.tensor(view2_boxes)


def _iou(a, b) -> float:
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    if inter == 0:
        return 0.0
    return inter / float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _clip(row):
    return [row[0], float(max(0, row[1])), float(max(0, row[2])), float(min(VIEW, row[3])), float(min(VIEW, row[4]))]


def main() -> None:
    parser = argparse.ArgumentParser(description=help_description(__doc__))
    parser.add_argument("--images", type=int, default=256, help="images per call (default: %(default)s; --quick: 32)")
    parser.add_argument("--quick", action="store_true", help="32 images, few repeats")
    args = parser.parse_args()
    images = 32 if args.quick else args.images
    torch.set_num_threads(1)
    device = torch.device("cpu")
    assert boxes._cpp_module() is not None, "fastdense._C is not built: run `python3 setup.py build_ext --inplace`"

    matrices, crops = scrl_views(images, seed=0)
    keys = boxes.draw_scrl_randoms(images, torch.Generator().manual_seed(1))

    def run(name):
        with backend(name):
            return boxes.sample_scrl_boxes(matrices, random=keys)

    fast, ref = run("cpp"), run("reference")
    for view in range(2):
        assert torch.equal(fast.rois[view], ref.rois[view]), "C++ and reference boxes differ"
    assert torch.equal(fast.counts, ref.counts)
    np.random.seed(3)
    loop_view1, _ = scrl_loop_baseline(crops)
    loop_counts = torch.bincount(loop_view1[:, 0].long(), minlength=images) if len(loop_view1) else torch.zeros(images, dtype=torch.int64)
    assert torch.equal(loop_counts, ref.counts), "SCRL's loop and fastdense give images different numbers of boxes"

    generator = torch.Generator().manual_seed(2)

    def cpp_with_draw():
        with backend("cpp"):
            return boxes.sample_scrl_boxes(matrices, generator=generator)

    scrl_loop_ms = time_ms(lambda: scrl_loop_baseline(crops), device, repeats=3 if args.quick else 11, warmup=1)
    reference_ms = time_ms(lambda: run("reference"), device, repeats=3 if args.quick else 11, warmup=1)
    cpp_ms = time_ms(lambda: run("cpp"), device, repeats=50 if args.quick else 200, warmup=5)
    cpp_draw_ms = time_ms(cpp_with_draw, device, repeats=50 if args.quick else 200, warmup=5)
    common = {"images": images, "boxes": int(ref.counts.sum()), "rule_met": float(ref.iou_rule_met.float().mean())}
    rows = [
        {"backend": "SCRL's loop (baseline)", **common, "ms": scrl_loop_ms},
        {"backend": "fastdense reference (Python)", **common, "ms": reference_ms},
        {"backend": "cpp", **common, "ms": cpp_ms},
        {"backend": "cpp + key draw", **common, "ms": cpp_draw_ms},
    ]
    for row in rows:
        row["speedup"] = scrl_loop_ms / row["ms"]
        row["vs_fastdense_reference"] = reference_ms / row["ms"]
    print_table(rows, ["backend", "images", "boxes", "rule_met", "ms", "speedup", "vs_fastdense_reference"])
    print(f"C++ sampler at {images} images, 1 thread: {scrl_loop_ms / cpp_ms:.0f}x SCRL's loop (target >= 50x), {reference_ms / cpp_ms:.0f}x fastdense's Python reference")
    path = write_results("scrl_boxes" + ("_quick" if args.quick else ""), device, rows, extra={"threads": torch.get_num_threads(), "target_speedup": 50})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
