"""SCRL training-step throughput: fastdense-train's step against the reference recipe.

Both sides run the whole step, data included: decode + augment, box sampling, two backbone passes
(online and target), RoIAlign 1x1, heads, BYOL box loss, backward, LARS, EMA. The reference recipe
is what the SCRL authors' code does: a PIL/torchvision loader in a DataLoader, the box sampler as a
Python loop per image, ``torchvision.ops.roi_align``, eager PyTorch. fastdense runs its own
trainer (``fastdense.training.Trainer``): its pipeline, C++ box sampler, ``fastdense.ops`` RoIAlign,
channels_last and bf16 autocast on GPU. Both use the same backbone, head sizes, view size, batch,
precision and loader worker count.

CPU: the CPU preset (ResNet-18, 96 px views). GPU: ResNet-50, 224 px, 256 images (target >= 1.5x).

Each side's figure is the median step time over the timed steps (images/s = batch / median); the
speedup is the ratio of the two, measured in the same process. The data-wait fraction is the time
the loop spent blocked in ``next()`` on its batch stream over the time of the timed steps (target:
under 5% for fastdense). fastdense's loop is ``Trainer.fit``'s (the step queued, the next batch
fetched and its boxes drawn while the device runs it, then the previous step's loss read) without its
logging and checkpoints.
Its data wait therefore includes drawing SCRL's boxes (the trainer does it as it fetches a batch),
where the reference draws them inside its step: the pessimistic side for fastdense's figure. The
loaders move batches to the GPU through pinned memory without waiting for queued kernels, so the
fetch is not charged for the step's GPU time; were a copy to block, the figure would count it as
data wait (the pessimistic side of the target).

    PYTHONPATH=. python3 benchmarks/bench_train_step.py            # GPU when present
    PYTHONPATH=. python3 benchmarks/bench_train_step.py --quick    # CPU, seconds
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import installed_versions, print_table, write_results  # noqa: E402

TARGET_SPEEDUP = 1.5  # PERFORMANCE.md: SCRL step, ResNet-50, 256 images, one GPU, against the reference recipe
TARGET_DATA_WAIT = 0.05  # PERFORMANCE.md: the training loop waits on data < 5% of step time


class StepTimes:
    """The timed steps of one side: each step's wall time and the part of it spent blocked in
    ``next()`` on the batch stream. A step's interval holds one fetch and one optimisation step and
    ends once the loss is on the host, so on a GPU the step's kernels fall inside it."""

    def __init__(self):
        self.step_s, self.wait_s = [], []

    def add(self, step_s: float, wait_s: float) -> None:
        self.step_s.append(step_s)
        self.wait_s.append(wait_s)

    def summary(self, batch_size: int, side: str) -> dict:
        median = statistics.median(self.step_s)
        return {
            f"{side}_median_step_s": median,
            f"{side}_images_per_s": batch_size / median,
            # Summed rather than a median of per-step fractions: a stall every few steps (the
            # workers falling behind) is what the target is about, and a median would hide it.
            f"{side}_data_wait_fraction": sum(self.wait_s) / sum(self.step_s),
        }


# -- the reference recipe ------------------------------------------------------------------------
class ReferencePairs(torch.utils.data.Dataset):
    """Two BYOL views per image with PIL and torchvision transforms, plus each view's crop
    ``(x0, y0, w, h, flipped)`` in source pixels, as the SCRL reference dataset returns them."""

    def __init__(self, root, size, scale, mean, std, interpolation="bicubic"):
        from torchvision import transforms as T

        self.files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not self.files:
            raise ValueError(f"no images under {root!r}")
        self.size, self.scale = size, scale
        self.interpolation = T.InterpolationMode.BICUBIC if interpolation == "bicubic" else T.InterpolationMode.BILINEAR
        blur = max(3, int(round(0.1 * size))) | 1
        self.colour = [
            T.Compose([
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                T.RandomApply([T.GaussianBlur(blur, (0.1, 2.0))], p=blur_p), T.RandomSolarize(128, p=solarize_p),
                T.ToTensor(), T.Normalize(mean, std),
            ])
            for blur_p, solarize_p in ((1.0, 0.0), (0.1, 0.2))
        ]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        from PIL import Image
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms import functional as F

        image = Image.open(self.files[index]).convert("RGB")
        views, crops = [], []
        for colour in self.colour:
            top, left, h, w = RandomResizedCrop.get_params(image, self.scale, (3 / 4, 4 / 3))
            view = F.resized_crop(image, top, left, h, w, [self.size, self.size], self.interpolation)
            flipped = random.random() < 0.5
            if flipped:
                view = F.hflip(view)
            views.append(colour(view))
            crops.append([left, top, w, h, float(flipped)])
        return views[0], views[1], torch.tensor(crops, dtype=torch.float64)


def reference_boxes(crops, size, num_boxes=10, min_size=32.0, iou_threshold=0.5, max_tries=50):
    """SCRL's box sampler as the reference runs it: a Python loop per image on the CPU.

    ``crops`` ``[B, 2, 5]``; returns two lists of ``[k_b, 4]`` boxes (view pixels), one per view.
    """
    out = ([], [])
    for crop in crops.tolist():
        (x1, y1, w1, h1, f1), (x2, y2, w2, h2, f2) = crop
        left, top = max(x1, x2), max(y1, y2)
        right, bottom = min(x1 + w1, x2 + w2), min(y1 + h1, y2 + h2)
        sx, sy = min(size / w1, size / w2), min(size / h1, size / h2)
        width, height = (right - left) * sx, (bottom - top) * sy
        if width <= min_size or height <= min_size:
            for boxes in out:
                boxes.append(torch.zeros(0, 4))
            continue
        taken = []
        for _ in range(num_boxes):
            for _ in range(max_tries):
                divisions = random.randint(1, max(1, int(min(width, height) // min_size)))
                cell_w, cell_h = width / divisions, height / divisions
                col, row = random.randrange(divisions), random.randrange(divisions)
                bw, bh = random.uniform(min_size, cell_w), random.uniform(min_size, cell_h)
                bx = col * cell_w + random.uniform(0, cell_w - bw)
                by = row * cell_h + random.uniform(0, cell_h - bh)
                box = (bx, by, bx + bw, by + bh)
                if all(_iou(box, other) < iou_threshold for other in taken):
                    break
            taken.append(box)
        for boxes, (x0, y0, w, h, flipped) in zip(out, ((x1, y1, w1, h1, f1), (x2, y2, w2, h2, f2))):
            mapped = []
            for bx0, by0, bx1, by1 in taken:
                # back to source pixels, then into this view
                s0, s1 = left + bx0 / sx, left + bx1 / sx
                t0, t1 = top + by0 / sy, top + by1 / sy
                v0, v1 = (s0 - x0) * size / w, (s1 - x0) * size / w
                if flipped:
                    v0, v1 = size - v1, size - v0
                u0, u1 = (t0 - y0) * size / h, (t1 - y0) * size / h
                mapped.append([min(max(v0, 0), size), min(max(u0, 0), size), min(max(v1, 0), size), min(max(u1, 0), size)])
            boxes.append(torch.tensor(mapped, dtype=torch.float32))
    return out


def _iou(a, b):
    iw, ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0])), max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class ReferenceSCRL(nn.Module):
    """Eager SCRL: torchvision ResNet trunk, MLP heads, ``torchvision.ops.roi_align``, EMA by a Python loop."""

    def __init__(self, backbone, projector_dims, predictor_dims, base_momentum=0.97):
        super().__init__()
        import torchvision

        trunk = getattr(torchvision.models, backbone)(weights=None)
        channels = trunk.fc.in_features
        trunk.fc, trunk.avgpool = nn.Identity(), nn.Identity()
        self.online = nn.Sequential(*list(trunk.children())[:-2])
        self.projector = self._mlp(channels, projector_dims)
        self.predictor = self._mlp(projector_dims[-1], predictor_dims)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.base_momentum = base_momentum

    @staticmethod
    def _mlp(in_dim, dims):
        hidden, out = dims
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out, bias=False))

    def forward(self, view1, view2, boxes1, boxes2):
        from torchvision.ops import roi_align

        online = self.online(torch.cat([view1, view2]))
        with torch.no_grad():
            target = self.target(torch.cat([view1, view2]))

        def pool(features, boxes):
            return roi_align(features.float(), boxes, 1, spatial_scale=1 / 32, sampling_ratio=-1, aligned=False).flatten(1)

        # As SCRL's reference: both views' boxes in one list over the stacked maps, one head batch.
        boxes = boxes1 + boxes2
        q1, q2 = self.predictor(self.projector(pool(online, boxes))).chunk(2)
        with torch.no_grad():
            z1, z2 = self.target_projector(pool(target, boxes)).chunk(2)

        def byol(q, z):
            return 2 - 2 * nn.functional.cosine_similarity(q, z, dim=-1)

        return (byol(q1, z2) + byol(q2, z1)).mean()

    @torch.no_grad()
    def update_target(self, step, total_steps):
        m = 1 - (1 - self.base_momentum) * (math.cos(math.pi * step / total_steps) + 1) / 2
        for online, target in ((self.online, self.target), (self.projector, self.target_projector)):
            for p, t in zip(online.parameters(), target.parameters()):
                t.data = t.data * m + p.data * (1 - m)


def run_reference(config, method_options, recipe, data_root, device, warmup, steps):
    from fastdense.training.optim import build_optimizer

    view = recipe.views[0]
    dataset = ReferencePairs(data_root, view.size, view.scale, recipe.mean, recipe.std, recipe.interpolation)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config["batch_size"], shuffle=True, drop_last=True,
                                         num_workers=config["num_workers"], pin_memory=device.type == "cuda",
                                         persistent_workers=config["num_workers"] > 0)
    model = ReferenceSCRL(method_options["backbone"], method_options["projector_dims"], method_options["predictor_dims"]).to(device)
    optimizer = build_optimizer(model, config["optimizer"], config["batch_size"])
    min_size = 32.0 * view.size / 224 if method_options.get("box_min_size") is None else method_options["box_min_size"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    total = warmup + steps

    def batches():
        while True:
            yield from loader

    stream = batches()
    times = StepTimes()
    for step in range(total):
        tick = time.perf_counter()
        view1, view2, crops = next(stream)
        waited = time.perf_counter() - tick
        boxes1, boxes2 = reference_boxes(crops, view.size, min_size=min_size)
        view1, view2 = view1.to(device, non_blocking=True), view2.to(device, non_blocking=True)
        boxes1, boxes2 = [b.to(device) for b in boxes1], [b.to(device) for b in boxes2]
        with autocast:
            loss = model(view1, view2, boxes1, boxes2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_target(step, total)
        loss.item()  # the reference logs every step; this also waits for the step's kernels
        if step >= warmup:
            times.add(time.perf_counter() - tick, waited)
    return times, float(loss.detach())


def run_fastdense(config, device, warmup, steps):
    from fastdense.training import Trainer
    from fastdense.training.loop import Prefetcher

    trainer = Trainer(config)
    trainer.setup()
    total = warmup + steps
    trainer.total_steps = total

    def batches():
        epoch = 0
        while True:
            trainer.loader.set_epoch(epoch)
            # The method's host work (SCRL's boxes) runs as each batch is fetched, as in fit.
            prefetcher = Prefetcher(iter(trainer.loader), trainer.device, trainer.channels_last, trainer.loader_rng, prepare=trainer.method.prepare)
            batch, _ = prefetcher.fetch(trainer.step)
            while batch is not None:
                yield prefetcher.ready(batch)
                batch, _ = prefetcher.fetch(trainer.step)
            epoch += 1

    stream = batches()
    batch = next(stream)
    times = StepTimes()
    unread = None
    for step in range(total):
        tick = time.perf_counter()
        out = trainer.train_step(batch)
        trainer.step += 1
        fetch = time.perf_counter()  # while the device runs the step
        batch = next(stream)
        waited = time.perf_counter() - fetch
        # As fit between log rows: the previous step's loss is read once this step is queued.
        readback = trainer.read_loss(trainer.step, out)
        if unread is not None:
            trainer.settle(unread)
        unread = readback
        if step >= warmup:
            times.add(time.perf_counter() - tick, waited)
    return times, trainer.settle(unread)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU preset, batch 8, a few steps (seconds)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--data", help="image folder (default: the built-in dataset)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps", type=int, help="timed steps per side")
    parser.add_argument("--warmup", type=int, help="untimed steps per side")
    parser.add_argument("--workers", type=int, help="loader workers per side")
    parser.add_argument("--threads", type=int, help="torch threads of the training process (default: torch's)")
    args = parser.parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    from fastdense.methods import build_method
    from fastdense.training import config as cfg
    import tempfile

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    gpu = device.type == "cuda" and not args.quick
    overrides = {"device": device.type, "progress": False, "preset": "full" if gpu else "cpu", "data": args.data,
                 "batch_size": args.batch_size or (256 if gpu else 8 if args.quick else 32),
                 "num_workers": args.workers if args.workers is not None else (8 if gpu else 1)}
    if not gpu:
        overrides["method_options"] = {"preset": "cpu"}
    steps = args.steps or (3 if args.quick else 20 if gpu else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5 if gpu else 2)
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as run_dir:
        overrides["run_dir"] = str(run_dir)
        config = cfg.resolve("scrl", overrides=overrides, has_gpu=gpu)
        method = build_method("scrl", **config["method_options"])
        options, recipe = method.options, method.recipe
        del method
        data_root = args.data
        if not data_root:
            from fastdense.pipelines.builtin import ensure_builtin_dataset

            data_root = ensure_builtin_dataset()
        torch.manual_seed(0)
        random.seed(0)
        ref_times, ref_loss = run_reference(config, options, recipe, data_root, device, warmup, steps)
        torch.manual_seed(0)
        fast_times, fast_loss = run_fastdense(config, device, warmup, steps)
    row = {
        "what": "SCRL training step (data included)", "backbone": options["backbone"], "view_size": recipe.views[0].size,
        "batch": config["batch_size"], "backend": config["backend"], "workers": config["num_workers"], "threads": threads,
        "precision": "bf16" if device.type == "cuda" else "fp32", "steps": steps, "warmup": warmup,
        **ref_times.summary(config["batch_size"], "reference"), **fast_times.summary(config["batch_size"], "fastdense"),
        "reference_last_loss": ref_loss, "fastdense_last_loss": fast_loss,
    }
    row["speedup"] = row["fastdense_images_per_s"] / row["reference_images_per_s"]
    # The speedup target is for the GPU configuration only; the data-wait one holds for any loop.
    target_speedup = TARGET_SPEEDUP if gpu else None
    row["meets_speedup_target"] = row["speedup"] >= target_speedup if target_speedup else None
    row["meets_data_wait_target"] = row["fastdense_data_wait_fraction"] < TARGET_DATA_WAIT
    print_table([row], ["backbone", "view_size", "batch", "steps", "reference_images_per_s", "fastdense_images_per_s", "speedup",
                        "reference_data_wait_fraction", "fastdense_data_wait_fraction"])
    extra = {"target_speedup": target_speedup, "target_data_wait_fraction": TARGET_DATA_WAIT,
             "versions": installed_versions("torchvision", "pillow", "nvidia-dali", "ffcv")}
    path = write_results("train_step" + ("_quick" if args.quick else ""), device, [row], extra=extra)
    print(f"results: {path}")
    return row


if __name__ == "__main__":
    main()
