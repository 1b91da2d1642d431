"""The PyTorch backend: a ``DataLoader`` whose worker processes decode with PIL and emit view matrices.

Per sample, in a worker:

1. Read the header only: size and EXIF orientation. The *source* is the image as PIL decodes it at
   full size with its EXIF orientation applied; ``source_size`` is its ``(H, W)`` and every matrix
   maps view pixels to that image's pixel coordinates.
2. Sample each view's crop window in source coordinates (:func:`~fastdense.pipelines.crops.sample_crop`).
3. Decode JPEGs at reduced size when every window stays at least as large as its view after the
   reduction (libjpeg's DCT scaling by 1/2, 1/4 or 1/8 via ``Image.draft``): pixel ``j`` of the
   reduced image covers source ``[d j, d (j + 1))``, so a window maps to the reduced image exactly by
   dividing by ``d`` and the matrices are unchanged.
4. Map the window into the stored (un-rotated) pixel grid, resize it there with fractional box
   coordinates (PIL's ``resize(box=...)``), then apply the EXIF transpose and the flip to the small
   view only. Transposes commute with axis-aligned crops and separable resampling, so this equals
   cropping the rotated source, at a fraction of the cost.
5. Convert any mode to RGB: palette and alpha modes drop alpha as torchvision's loader does, CMYK
   through PIL's conversion, 16- and 32-bit integer grayscale scaled from 0-65535 to 0-255 (PIL's
   own conversion would clip), float images read as 0-1.

Files that fail to decode are not fatal: the worker returns ``(path, reason)``, the batch comes out
smaller, and the loader reports every such path at the end of the epoch (``loader.skipped``).

Photometric augmentation (:mod:`~fastdense.pipelines.photometric`) runs batched: on the GPU in the
main process when the loader's device is CUDA (views cross as uint8), otherwise in the workers, so
the CPU work spreads over them. Every random draw derives from ``(seed, epoch, index)`` for
geometry and ``(seed, epoch, shard, batch, view)`` for colour, so results do not depend on the
number of workers or on which worker served a sample.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from fastdense.pipelines.base import SkipReport, check_sharding, epoch_order, num_batches, sample_seed
from fastdense.pipelines.batch import ViewBatch
from fastdense.pipelines.crops import crops_to_matrices, sample_crop
from fastdense.pipelines.folder import scan_image_folder
from fastdense.pipelines.photometric import apply_photometric, normalize
from fastdense.pipelines.recipes import Recipe, ViewSpec, get_recipe

EXIF_ORIENTATION = 0x0112
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
# EXIF orientation -> the PIL transpose that displays the stored pixels upright.
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright_to_stored(orientation: int, x: float, y: float, stored_w: int, stored_h: int) -> Tuple[float, float]:
    """Where upright (EXIF-applied) point ``(x, y)`` lies in the stored pixel grid."""
    return {
        1: (x, y),
        2: (stored_w - x, y),
        3: (stored_w - x, stored_h - y),
        4: (x, stored_h - y),
        5: (y, x),
        6: (y, stored_h - x),
        7: (stored_w - y, stored_h - x),
        8: (stored_w - y, x),
    }[orientation]


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image from any PIL mode (see the module doc for how each mode converts)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        values = np.asarray(image).astype(np.float32)
        return Image.fromarray((values.clip(0, 65535) / 257.0 + 0.5).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        return Image.fromarray((values.clip(0, 1) * 255 + 0.5).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode_views(path, specs: Sequence[ViewSpec], resample, rng: np.random.Generator):
    """Decode ``path`` and cut one view per spec.

    Returns ``(views, crops, (H, W))``: views as ``[H_v, W_v, 3]`` uint8 arrays, crops an ``[V, 5]``
    int64 array of ``(x0, y0, w, h, flip)`` in upright source pixels, and the source size.
    """
    with Image.open(path) as image:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        orientation = orientation if orientation in ORIENTATION_TRANSPOSE else 1
        stored_w, stored_h = image.size
        width, height = (stored_h, stored_w) if orientation >= 5 else (stored_w, stored_h)
        crops = np.array([sample_crop(height, width, spec, rng) for spec in specs], dtype=np.int64).reshape(len(specs), 5)
        reduction = max(1.0, min(min(c[2] / s.size, c[3] / s.size) for c, s in zip(crops, specs)))
        scale = 1.0
        if image.format == "JPEG" and reduction >= 2:
            factor = 8 if reduction >= 8 else 4 if reduction >= 4 else 2
            drafted = image.draft("RGB", (stored_w // factor, stored_h // factor))
            if drafted is not None:
                scale = stored_w / drafted[1][2]
        decoded = to_rgb(image)
        views = []
        for (x0, y0, w, h, flip), spec in zip(crops, specs):
            corners = [_upright_to_stored(orientation, x, y, stored_w, stored_h) for x, y in ((x0, y0), (x0 + w, y0 + h))]
            (ax, ay), (bx, by) = corners
            box = (min(ax, bx) / scale, min(ay, by) / scale, max(ax, bx) / scale, max(ay, by) / scale)
            view = decoded.resize((spec.size, spec.size), resample, box=box)
            if orientation != 1:
                view = view.transpose(ORIENTATION_TRANSPOSE[orientation])
            if flip:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            views.append(np.asarray(view))
        return views, crops, (height, width)


class _ViewDataset(torch.utils.data.Dataset):
    """Map-style dataset over ``(index, epoch, batch_number)`` keys; returns a sample or its failure."""

    def __init__(self, samples, recipe: Recipe, seed: int):
        self.samples = samples
        self.recipe = recipe
        self.seed = seed
        self.resample = RESAMPLE[recipe.interpolation]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, epoch, batch_number = key
        path, label = self.samples[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        try:
            views, crops, size = decode_views(path, self.recipe.views, self.resample, rng)
        except Exception as error:  # any undecodable file is skipped and reported, never fatal mid-epoch
            return dict(error=(str(path), f"{type(error).__name__}: {error}"), batch_number=batch_number, epoch=epoch)
        return dict(views=views, crops=crops, size=size, index=index, label=label, batch_number=batch_number, epoch=epoch)


class _Collate:
    """Stack a batch in the worker; on CPU also colour-augment and normalise it there."""

    def __init__(self, recipe: Recipe, seed: int, shard_id: int, finish_in_worker: bool, photometric: bool):
        self.recipe = recipe
        self.seed = seed
        self.shard_id = shard_id
        self.finish_in_worker = finish_in_worker
        self.photometric = photometric

    def __call__(self, items):
        good = [item for item in items if "error" not in item]
        out = dict(errors=[item["error"] for item in items if "error" in item], epoch=items[0]["epoch"], batch_number=items[0]["batch_number"])
        if not good:
            out["views"] = None
            return out
        out["views"] = [torch.from_numpy(np.stack([item["views"][v] for item in good])) for v in range(self.recipe.num_views)]
        out["crops"] = torch.from_numpy(np.stack([item["crops"] for item in good]))
        out["size"] = torch.tensor([item["size"] for item in good], dtype=torch.int64)
        out["index"] = torch.tensor([item["index"] for item in good], dtype=torch.int64)
        out["label"] = torch.tensor([item["label"] for item in good], dtype=torch.int64)
        if self.finish_in_worker:
            out["views"] = finish_views(out["views"], self.recipe, self.photometric, self.seed, out["epoch"], self.shard_id, out["batch_number"])
        return out


def finish_views(views_hwc: List[torch.Tensor], recipe: Recipe, photometric: bool, seed: int, epoch: int, shard_id: int, batch_number: int):
    """uint8 ``[B, H, W, 3]`` views -> normalised float ``[B, 3, H, W]`` (channels_last), colour-augmented."""
    finished = []
    for v, (view, spec) in enumerate(zip(views_hwc, recipe.views)):
        images = view.permute(0, 3, 1, 2).float().div_(255)
        if photometric:
            generator = torch.Generator().manual_seed(sample_seed(seed, epoch, shard_id, batch_number, v))
            images = apply_photometric(images, spec, generator)
        finished.append(normalize(images, recipe.mean, recipe.std))
    return finished


class TorchLoader:
    """Views with matrices from an image folder, decoded by PIL in ``num_workers`` processes.

    Yields :class:`~fastdense.pipelines.batch.ViewBatch` objects. ``len(loader)`` is the number of
    batches per epoch (a batch is smaller when some of its files could not be read). Each pass over
    the loader is one epoch: epochs 0, 1, 2, ... unless :meth:`set_epoch` picks one.
    """

    def __init__(self, data, recipe="scrl", batch_size: int = 256, seed: int = 0, shard_id: int = 0, num_shards: int = 1,
                 num_workers: int = 8, device=None, photometric: bool = True, shuffle: bool = True, drop_last: bool = True):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        check_sharding(shard_id, num_shards)
        self.index = scan_image_folder(data)
        self.recipe = get_recipe(recipe)
        self.batch_size, self.seed, self.shard_id, self.num_shards = batch_size, seed, shard_id, num_shards
        self.shuffle, self.drop_last, self.photometric = shuffle, drop_last, photometric
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.num_workers = num_workers
        self._report = SkipReport()
        self._next_epoch = 0
        on_gpu = self.device.type == "cuda"
        self._loader_kwargs = dict(
            dataset=_ViewDataset(self.index.samples, self.recipe, seed),
            num_workers=num_workers,
            collate_fn=_Collate(self.recipe, seed, shard_id, finish_in_worker=not on_gpu, photometric=photometric),
            pin_memory=on_gpu,
            persistent_workers=num_workers > 0,
        )
        self._loader = None
        self._sampler = _EpochBatches(self)

    @property
    def classes(self) -> List[str]:
        return self.index.classes

    @property
    def skipped(self) -> List[Tuple[str, str]]:
        """``(path, reason)`` of the files the current (or last) epoch could not read."""
        return self._report.skipped

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass over the loader epoch ``epoch`` (its order and its augmentations)."""
        self._next_epoch = int(epoch)

    def _order(self, epoch: int) -> np.ndarray:
        return epoch_order(len(self.index), self.seed, epoch, self.shard_id, self.num_shards, self.shuffle, self.drop_last)

    def __len__(self) -> int:
        return num_batches(len(self._order(0)), self.batch_size, self.drop_last)

    def __iter__(self):
        epoch = self._next_epoch
        self._next_epoch = epoch + 1
        self._sampler.epoch = epoch
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(batch_sampler=self._sampler, **self._loader_kwargs)
        self._report.reset()
        seen = 0
        for part in self._loader:
            for path, reason in part["errors"]:
                self._report.add(path, reason)
            seen += len(part["errors"])
            if part["views"] is None:
                continue
            seen += len(part["index"])
            yield self._to_batch(part)
        self._report.report(epoch, seen)

    def _to_batch(self, part) -> ViewBatch:
        views = [v.to(self.device, non_blocking=True) for v in part["views"]]
        if self.device.type == "cuda":
            views = finish_views(views, self.recipe, self.photometric, self.seed, part["epoch"], self.shard_id, part["batch_number"])
        matrices = crops_to_matrices(part["crops"], [spec.size for spec in self.recipe.views])
        return ViewBatch(views=views, matrices=matrices.to(self.device), source_size=part["size"].to(self.device),
                         index=part["index"].to(self.device), label=part["label"].to(self.device))


class _EpochBatches(torch.utils.data.Sampler):
    """Batches of ``(index, epoch, batch_number)`` keys for the loader's current epoch."""

    def __init__(self, loader: TorchLoader):
        self.loader = loader
        self.epoch = 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        order = self.loader._order(self.epoch)
        size = self.loader.batch_size
        for number in range(len(self)):
            chunk = order[number * size:(number + 1) * size]
            yield [(int(index), self.epoch, number) for index in chunk]
