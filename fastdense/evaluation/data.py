"""Evaluation images: a fixed resize (no augmentation), labels from class folders, masks from a
parallel folder of PNGs or the VOC layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

from fastdense.pipelines.recipes import IMAGENET_MEAN, IMAGENET_STD

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


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
    if (root / "SegmentationClass").is_dir():
        lists = root / "ImageSets" / "Segmentation"
        splits = []
        for name in ("train", "val"):
            ids = (lists / f"{name}.txt").read_text().split()
            splits.append([EvalSample(root / "JPEGImages" / f"{i}.jpg", mask=root / "SegmentationClass" / f"{i}.png") for i in ids])
        return splits[0], splits[1]
    if masks_root is None:
        raise ValueError(f"{root} is not in the VOC layout (no SegmentationClass/); pass the folder of masks too")
    masks_root = Path(masks_root)
    pairs = []
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        mask = (masks_root / image.relative_to(root)).with_suffix(".png")
        if mask.is_file():
            pairs.append(EvalSample(image, mask=mask))
    if not pairs:
        raise ValueError(f"no image in {root} has a mask in {masks_root} (expected the same relative path with .png)")
    return split_samples(pairs)


class EvalImages(torch.utils.data.Dataset):
    """Images resized to ``size x size`` (bicubic) and normalised; masks resized with nearest neighbour."""

    def __init__(self, samples: List[EvalSample], size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.samples = samples
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        sample = self.samples[i]
        with Image.open(sample.image) as im:
            image = ImageOps.exif_transpose(im).convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        tensor = (tensor - self.mean) / self.std
        if sample.mask is None:
            return tensor, sample.label
        with Image.open(sample.mask) as m:
            mask = np.array(m.resize((self.size, self.size), Image.NEAREST), dtype=np.int64)
        if mask.ndim != 2:
            raise ValueError(f"mask {sample.mask} must be a single-channel (L or P mode) PNG of class indices")
        return tensor, torch.from_numpy(mask)
