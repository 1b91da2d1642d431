"""``fastdense-eval``: downstream protocols on a trained (or randomly initialised) backbone.

    fastdense-eval --checkpoint RUN/checkpoints/last.pt --task linear     # linear probe, top-1 %
    fastdense-eval --checkpoint RUN/checkpoints/last.pt --task knn        # weighted 20-NN, top-1 %
    fastdense-eval --checkpoint RUN/checkpoints/last.pt --task dense      # 1x1 probe on feature maps, mIoU %
    fastdense-eval --checkpoint RUN/checkpoints/last.pt --task export     # plain torchvision/timm state dict

The online network is evaluated; ``--network target`` takes a method's EMA copy instead (the
teacher DINO and SelfPatch report). Features are extracted once per (weights, image list, size) and
cached next to the checkpoint; an image or mask rewritten in place (its size or modification time
changed) is extracted again. Results are printed as a table and written as JSON next to the
checkpoint. Bad input stops with one line naming the file or argument: a missing, damaged or
foreign checkpoint, a data folder without images or masks (or without one that can be decoded),
a colour mask or a mask of another size than its image (every mask's header is read), an image
size the backbone's stride does not divide, a device that is not there or an --output that cannot
be written, all before any feature is computed (a mask rewritten during extraction stops it with
the same one line). Images or masks that cannot be decoded (cut short, empty, not images) are left
out and named, as training skips them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from fastdense.evaluation import knn_accuracy, linear_probe_accuracy, train_dense_probe
from fastdense.evaluation.data import EvalImages, _NotMatching, check_masks, classification_splits, drop_unreadable, not_matching_message, segmentation_splits
from fastdense.evaluation.export import export_backbone
from fastdense.evaluation.features import cached, extract
from fastdense.evaluation.checkpoint import load_trained_method, select_backbone
from fastdense.pipelines.validate import file_stamp

TASKS = ("linear", "knn", "dense", "export")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (load in the main process) or more, got {text}")
    return value


def _device(text: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; whether that GPU exists is checked in :func:`main`."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:  # torch's message lists every backend it knows of, not what eval runs on
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    return device


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastdense-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint written by fastdense-train")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", type=Path, default=None, help="ImageFolder for linear/knn (train/ and val/ inside, or split 4:1); images for dense. Default: the training run's data (an image folder; a run on a .beton file needs --data), else the built-in dataset")
    p.add_argument("--masks", type=Path, default=None, help="folder of PNG masks mirroring --data (dense task); not needed for the VOC layout or the built-in dataset")
    p.add_argument("--image-size", type=_positive, default=None, help="evaluation resolution, a multiple of the backbone's stride (default: the training recipe's first view size)")
    p.add_argument("--network", choices=("online", "target"), default="online", help="online: the trained network (default); target: the EMA copy (the teacher DINO and SelfPatch report), for methods that keep one")
    p.add_argument("--random-init", action="store_true", help="evaluate the same architecture at random initialisation (the baseline)")
    p.add_argument("--epochs", type=_positive, default=None, help="probe training epochs (linear: 100, dense: 30)")
    p.add_argument("--batch-size", type=_positive, default=64, help="feature-extraction batch size (default: %(default)s)")
    p.add_argument("--num-workers", type=_non_negative, default=2, help="feature-extraction loader processes (0: load in the main process; default: %(default)s)")
    p.add_argument("--k", type=_positive, default=20, help="neighbours for the knn task (default: %(default)s)")
    p.add_argument("--device", type=_device, default="auto", help="auto (default: cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--output", type=Path, default=None, help="JSON result path (default: next to the checkpoint)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"fastdense-eval: --device {device} but torch sees no CUDA device here; use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        sys.exit(f"fastdense-eval: --device {device} but torch sees {torch.cuda.device_count()} CUDA device(s) here (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    torch.manual_seed(0)  # a --random-init backbone is the same one every time
    try:
        method, info = load_trained_method(args.checkpoint, random_init=args.random_init)
        backbone = select_backbone(method, args.network)
    except ValueError as e:  # CheckpointError included: the message names the file
        sys.exit(f"fastdense-eval: {e}")
    run_dir = args.checkpoint.parent
    suffix = f"{'_target' if args.network == 'target' else ''}{'_random' if args.random_init else ''}"
    tag = f"{args.task}{suffix}"
    _check_output(args.output or run_dir / f"eval_{tag}.json")  # before any compute: a bad path found at the end wasted all of it
    if args.task == "export":
        path = export_backbone(backbone, run_dir / f"backbone_{backbone.name}{suffix}.pth")
        result = {"task": "export", "path": str(path), "arch": backbone.name, "tensors": len(torch.load(path, weights_only=True))}
    else:
        data = args.data or info.get("data") or _builtin_root()
        if args.data is None and Path(data).is_file():  # the run read a .beton (ffcv), which holds no file names or masks
            sys.exit(f"fastdense-eval: the run trained on the file {data} (an ffcv .beton), which evaluation cannot read; "
                     "pass --data with an image folder (the one the .beton was written from)")
        size = args.image_size or info.get("image_size") or 224
        if size % backbone.stride:
            sys.exit(f"fastdense-eval: --image-size must be a multiple of {backbone.name}'s stride {backbone.stride} so that its feature cells tile the image, got {size}")
        try:
            if args.task == "dense":
                masks = args.masks or _builtin_masks(data)
                if masks is not None and not Path(masks).is_dir():
                    raise ValueError(f"--masks {masks} is not a directory")
                train_set, test_set = segmentation_splits(data, masks)
            else:
                train_set, test_set, classes = classification_splits(data)
            train_set, test_set, left_out = _leave_out_unreadable(train_set, test_set, data, masks if args.task == "dense" else None)
            if args.task == "dense":
                check_masks(train_set + test_set)
            if not train_set or not test_set:
                after = f" (after leaving out {left_out} with an unreadable file)" if left_out else ""
                raise ValueError(f"--data {data}: {len(train_set)} training and {len(test_set)} test images{after}; both splits need at least one")
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"fastdense-eval: {e}")
        # The sample list is part of the key: a folder that gained or lost images, the same relative
        # --data seen from another directory, or a file rewritten in place (its size and mtime)
        # does not get another set's features.
        image_list = hashlib.sha256(json.dumps([[str(s.image.resolve()), file_stamp(s.image), s.label, str(s.mask), s.mask and file_stamp(s.mask)] for s in train_set + test_set]).encode()).hexdigest()
        identity = {"checkpoint": str(args.checkpoint.resolve()), "mtime": os.path.getmtime(args.checkpoint), "network": args.network, "random_init": args.random_init, "images": image_list, "size": size, "dense": args.task == "dense"}
        cache_dir = run_dir / "eval_cache"
        dense, what = args.task == "dense", "maps" if args.task == "dense" else "features"
        try:
            feats = {split: cached(cache_dir, {**identity, "split": split}, lambda s=samples, n=split: extract(backbone, EvalImages(s, size), dense, args.batch_size, args.num_workers, device, desc=f"{n} {what}")) for split, samples in (("train", train_set), ("test", test_set))}
        except _NotMatching as e:  # a mask rewritten after check_masks read it: the same one line
            sys.exit(f"fastdense-eval: {not_matching_message(e)}")
        if dense:
            labelled = [f["masks"][f["masks"] != 255] for f in feats.values()]
            if not any(m.numel() for m in labelled):
                sys.exit(f"fastdense-eval: every mask pixel under {masks or data} is 255 (ignored); nothing to evaluate")
            num_classes = max(int(m.max()) for m in labelled if m.numel()) + 1
            scores = train_dense_probe(feats["train"]["maps"].to(device), feats["train"]["masks"], feats["test"]["maps"].to(device), feats["test"]["masks"], num_classes, epochs=args.epochs or 30)
            result = {"task": "dense", "miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"], "per_class_iou": scores["per_class_iou"]}
        else:
            tr, te = feats["train"], feats["test"]
            tr = {**tr, "features": tr["features"].to(device)}  # the probes run where the training features are
            if args.task == "linear":
                acc = linear_probe_accuracy(tr["features"], tr["labels"], te["features"], te["labels"], len(classes), epochs=args.epochs or 100)
            else:
                acc = knn_accuracy(tr["features"], tr["labels"], te["features"], te["labels"], len(classes), k=args.k)
            result = {"task": args.task, "top1": acc, "classes": len(classes), "train_images": len(tr["labels"]), "test_images": len(te["labels"])}
        result.update(image_size=size, data=str(data))
    result.update(checkpoint=str(args.checkpoint), method=info.get("method"), backbone=backbone.name, network=args.network, random_init=args.random_init)
    out = args.output or run_dir / f"eval_{tag}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    _print_table(result)
    print(f"fastdense-eval: wrote {out}")
    return result


def _leave_out_unreadable(train_set, test_set, data, masks):
    """The splits without the samples whose image or mask cannot be decoded, and how many were left
    out; the files are named on stderr, as training names the files it skips. The splits are drawn
    before, so a file that goes bad leaves the other images where they were (no test image moves
    to training). A folder with nothing readable left is an error naming it."""
    train_kept, unreadable = drop_unreadable(train_set, data, masks)
    test_kept, test_unreadable = drop_unreadable(test_set, data, masks)
    unreadable += test_unreadable
    left_out = len(train_set) + len(test_set) - len(train_kept) - len(test_kept)
    dense = any(s.mask is not None for s in train_set + test_set)
    if unreadable:
        lines = "\n".join(f"  {path}: {reason}" for path, reason in unreadable)
        samples = "image/mask pairs" if dense else "images"
        print(f"fastdense-eval: skipped {len(unreadable)} files that could not be read, leaving out {left_out} of {len(train_set) + len(test_set)} {samples}:\n{lines}", file=sys.stderr)
    if unreadable and not train_kept and not test_kept:
        folders = f"--data {data} and --masks {masks} hold" if masks is not None else f"--data {data} holds"
        raise ValueError(f"{folders} no readable image{' with a readable mask' if dense else ''} ({len(unreadable)} unreadable files)")
    return train_kept, test_kept, left_out


def _check_output(path: Path) -> None:
    """Create ``--output``'s folder (as the trainer creates its run directory) and make sure a file
    can be written there; exit with one line naming ``--output`` when not."""
    if path.is_dir():
        sys.exit(f"fastdense-eval: --output {path} is a directory; give a file path for the JSON result")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.exit(f"fastdense-eval: --output {path}: cannot create its folder {path.parent}: {e.strerror or e}")
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        sys.exit(f"fastdense-eval: --output {path} cannot be written (no write permission)")
    # Permission bits are not the whole story (root, read-only or special file systems such as
    # /proc): open the file as the final write will, and remove it again if it was not there.
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        sys.exit(f"fastdense-eval: --output {path} cannot be written: {e.strerror or e}")
    if not existed:
        path.unlink()


def _builtin_root():
    from fastdense.pipelines.builtin import ensure_builtin_dataset

    return ensure_builtin_dataset()


def _builtin_masks(data):
    """The built-in dataset keeps its masks beside its images: ``<root>/images`` and ``<root>/masks``."""
    masks = Path(data).parent / "masks"
    return masks if masks.is_dir() else None


def _print_table(result: dict) -> None:
    rows = [(k, f"{v:.2f}" if isinstance(v, float) else str(v)) for k, v in result.items() if k != "per_class_iou"]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


def cli(argv=None) -> int:
    """The ``fastdense-eval`` console script: :func:`main`, exit status 0. (Console scripts pass
    the function's return value to ``sys.exit``, which would print :func:`main`'s dict and exit 1.)"""
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
