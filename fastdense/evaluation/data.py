"""Evaluation images: a fixed resize (no augmentation), every mode converted to RGB as training
converts it, labels from class folders, masks from a parallel folder of PNGs or the VOC layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

from fastdense.pipelines.folder import IMAGE_EXTENSIONS
from fastdense.pipelines.recipes import IMAGENET_MEAN, IMAGENET_STD
from fastdense.pipelines.torch_backend import to_rgb

SINGLE_CHANNEL_MODES = ("L", "P", "I", "I;16")


@dataclass
class EvalSample:
    image: Path
    label: int = -1
    mask: Optional[Path] = None


def split_samples(samples: List[EvalSample], test_every: int = 5) -> Tuple[List[EvalSample], List[EvalSample]]:
    """Deterministic split for folders without ``train/`` and ``val/``: every ``test_every``-th sample
    (in sorted order) is held out."""
    train = [s for i, s in enumerate(samples) if i % test_every != test_every - 1]
    test = [s for i, s in enumerate(samples) if i % test_every == test_every - 1]
    return train, test


def classification_splits(root) -> Tuple[List[EvalSample], List[EvalSample], List[str]]:
    """``(train, test, classes)`` from an ImageFolder; uses ``root/train`` and ``root/val`` when both exist."""
    from fastdense.pipelines.folder import scan_image_folder

    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train_index, test_index = scan_image_folder(root / "train"), scan_image_folder(root / "val")
        if train_index.classes != test_index.classes:
            raise ValueError(f"{root}/train and {root}/val must hold the same class folders")
        to_samples = lambda index: [EvalSample(Path(p), int(c)) for p, c in index.samples]  # noqa: E731
        return to_samples(train_index), to_samples(test_index), list(train_index.classes)
    index = scan_image_folder(root)
    train, test = split_samples([EvalSample(Path(p), int(c)) for p, c in index.samples])
    return train, test, list(index.classes)


def segmentation_splits(images_root, masks_root=None) -> Tuple[List[EvalSample], List[EvalSample]]:
    """Image/mask pairs, train and test.

    Two layouts: VOC (``images_root`` holds ``JPEGImages/``, ``SegmentationClass/`` and
    ``ImageSets/Segmentation/{train,val}.txt``), or an image folder with a parallel mask folder
    (``masks_root/<same relative path>.png``; split as :func:`split_samples`).
    """
    root = Path(images_root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    if (root / "SegmentationClass").is_dir():
        lists = root / "ImageSets" / "Segmentation"
        splits = []
        for name in ("train", "val"):
            ids = (lists / f"{name}.txt").read_text().split()
            splits.append([EvalSample(root / "JPEGImages" / f"{i}.jpg", mask=root / "SegmentationClass" / f"{i}.png") for i in ids])
        return splits[0], splits[1]
    if masks_root is None:
        raise ValueError(f"{root} is not in the VOC layout (no SegmentationClass/) and no masks folder was given (--masks)")
    masks_root = Path(masks_root)
    pairs = []
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        mask = (masks_root / image.relative_to(root)).with_suffix(".png")
        if mask.is_file():
            pairs.append(EvalSample(image, mask=mask))
    if not pairs:
        raise ValueError(f"no image in {root} has a mask in {masks_root} (expected the same relative path with .png)")
    return split_samples(pairs)


def drop_unreadable(samples: List[EvalSample], image_root, mask_root=None) -> Tuple[List[EvalSample], List[Tuple[Path, str]]]:
    """``(kept, unreadable)``: the samples whose image (and mask) can be decoded, and ``(path, reason)``
    for every file that cannot, found by the check the training loaders make before an epoch
    (:func:`~fastdense.pipelines.validate.find_unreadable`, cached per folder, so a later evaluation
    of the same folder only checks new or changed files). A sample with either file unreadable is
    left out. A listed file that does not exist (a VOC split list naming a missing image) raises
    FileNotFoundError naming it."""
    from fastdense.pipelines.validate import find_unreadable

    images = [s.image for s in samples]
    masks = [s.mask for s in samples if s.mask is not None]
    for kind, paths in (("image", images), ("mask", masks)):
        missing = next((path for path in paths if not path.is_file()), None)
        if missing is not None:
            raise FileNotFoundError(f"{kind} {missing} does not exist")
    unreadable = find_unreadable(images, Path(image_root))
    if masks:
        unreadable += find_unreadable(masks, Path(mask_root or image_root))
    bad = {path for path, _ in unreadable}
    return [s for s in samples if s.image not in bad and s.mask not in bad], unreadable


class _NotMatching(ValueError):
    """A mask that is not class indices, or an image and mask of different sizes."""


EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # the EXIF orientations ImageOps.exif_transpose turns by 90 degrees


def _check_mask_mode(path: Path, mode: str) -> None:
    if mode not in SINGLE_CHANNEL_MODES:
        raise _NotMatching(f"mask {path} has mode {mode}; masks must be single-channel PNGs of class indices (mode L or P)")


def _check_mask_size(image_path: Path, image: Image.Image, mask_path: Path, mask_size) -> None:
    """A mask covers its image drawn on the stored pixel grid or on the EXIF-upright one. Reads the
    image's EXIF only for a mask of the transposed size (a PNG's may come after its pixels)."""
    if mask_size == image.size:
        return
    if mask_size == image.size[::-1] and image.getexif().get(EXIF_ORIENTATION) in TRANSPOSED_ORIENTATIONS:
        return
    raise _NotMatching(f"image {image_path} is {image.size[0]}x{image.size[1]} but its mask {mask_path} is {mask_size[0]}x{mask_size[1]}; they must cover the same pixels")


def check_masks(samples: List[EvalSample]) -> None:
    """Fail before any feature is computed, naming the first file, when a sample's mask is a colour
    image rather than class indices or has another size than its image. Reads headers only (PIL
    decodes pixels lazily), so it costs two file opens a sample."""
    for sample in samples:
        if sample.mask is None:
            continue
        with Image.open(sample.mask) as m:
            _check_mask_mode(sample.mask, m.mode)
            mask_size = m.size
        with Image.open(sample.image) as im:
            _check_mask_size(sample.image, im, sample.mask, mask_size)


def not_matching_message(error: _NotMatching) -> str:
    """The one line a :class:`_NotMatching` was raised with. A DataLoader worker's exception comes
    back as the same type whose message is the worker's whole traceback, which ends with that line."""
    prefix = f"{_NotMatching.__module__}.{_NotMatching.__qualname__}: "
    lines = [line[len(prefix):] for line in str(error).splitlines() if line.startswith(prefix)]
    return lines[-1] if lines else str(error)


class EvalImages(torch.utils.data.Dataset):
    """Images resized to ``size x size`` (bicubic) and normalised; masks resized with nearest neighbour
    to the same ``size x size``, so mIoU is scored at the evaluation resolution. An image and its
    mask must have the same size (a mismatch would be resized into misalignment silently)."""

    def __init__(self, samples: List[EvalSample], size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.samples = samples
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        """``(image, label or mask, problem)``: ``problem`` is ``""``, or, for a file that fails to
        decode part-way (damage the up-front check cannot see), ``"path: reason"`` beside a zero
        image and target, which :func:`~fastdense.evaluation.features.extract` leaves out. Masks and
        images that do not fit together are errors, not problems: they are the user's to fix."""
        sample = self.samples[i]
        try:
            return (*self._load(sample), "")
        except _NotMatching:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:  # PIL's decode failures
            target = torch.full((self.size, self.size), 255, dtype=torch.int64) if sample.mask is not None else sample.label
            files = f"{sample.image} or its mask {sample.mask}" if sample.mask is not None else str(sample.image)
            return torch.zeros(3, self.size, self.size), target, f"{files}: {type(error).__name__}: {error}"

    def _load(self, sample: EvalSample):
        mask = None
        if sample.mask is not None:
            with Image.open(sample.mask) as m:
                _check_mask_mode(sample.mask, m.mode)
                mask_size = m.size
                mask = np.array(m.resize((self.size, self.size), Image.NEAREST), dtype=np.int64)
        with Image.open(sample.image) as im:
            if mask is not None:
                _check_mask_size(sample.image, im, sample.mask, mask_size)
            image = ImageOps.exif_transpose(im)
            if mask is not None and image.size != mask_size:
                image = im  # the mask was drawn on the stored pixel grid, before the EXIF rotation
            # Training's conversion, so the probe sees the pixels the backbone was trained on
            # (PIL's own convert("RGB") clips 16-bit grayscale: 40000 of 65535 became white).
            image = to_rgb(image).resize((self.size, self.size), Image.BICUBIC)
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        tensor = (tensor - self.mean) / self.std
        if mask is None:
            return tensor, sample.label
        return tensor, torch.from_numpy(mask)
