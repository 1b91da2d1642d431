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
4. Map the window into the stored (un-rotated) pixel grid and resize it there, then apply the EXIF
   transpose and the flip to the small view only. Transposes commute with axis-aligned crops and
   separable resampling, so this equals cropping the rotated source, at a fraction of the cost.
   The resize is PyTorch's antialiased uint8 kernel (``interpolate(..., antialias=True)`` on a
   channels-last slice: PIL's filters and pass order, within one grey level per pass of PIL's
   output, about 3x faster than PIL's own resize); a drafted image, whose window has fractional coordinates, is resized by
   PIL with a fractional box instead.
5. Convert any mode to RGB: palette and alpha modes drop alpha as torchvision's loader does, CMYK
   through PIL's conversion, 16- and 32-bit integer grayscale scaled from 0-65535 to 0-255 (PIL's
   own conversion would clip), float images read as 0-1.

Files that fail to decode are not fatal: the loader reports every such path at the end of the epoch
(``loader.skipped``), and the worker fills the sample's place with another image of the folder
(drawn from ``(seed, epoch, index)``, its crops drawn afresh; after 8 failed draws, every image of
the folder in an order so drawn), so every batch stays whole; a folder where no image decodes stops
the first batch with a ValueError naming it. The other
backends drop unreadable files before the epoch starts; this one only learns of them while decoding,
and a batch that shrank would break what assumes equal batches on every rank (VICReg's all-gather)
or, when a whole batch failed, leave one rank a step short of the others.

Photometric augmentation (:mod:`~fastdense.pipelines.photometric`) runs batched: on the GPU in the
main process when the loader's device is CUDA (views cross as uint8), otherwise in the workers, so
the CPU work spreads over them. Every random draw derives from ``(seed, epoch, index)`` for
geometry and ``(seed, epoch, shard, batch, view)`` for colour, so results do not depend on the
number of workers or on which worker served a sample.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from fastdense.pipelines.base import SkipReport, check_has_batches, check_loader_args, check_start_batch, epoch_order, num_batches, sample_seed
from fastdense.pipelines.batch import ViewBatch
from fastdense.pipelines.crops import crops_to_matrices, sample_crop
from fastdense.pipelines.folder import scan_image_folder
from fastdense.pipelines.photometric import apply_params, normalize, sample_params
from fastdense.pipelines.recipes import Recipe, ViewSpec, get_recipe

EXIF_ORIENTATION = 0x0112
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


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


def resize_uint8(window: torch.Tensor, size: int, interpolation: str, vertical_first: bool) -> torch.Tensor:
    """``[1, 3, h, w]`` uint8 -> ``[1, 3, size, size]``, antialiased, the passes in the order asked.

    Resampling is separable and rounds to uint8 between the two passes, so the order shows in the
    result (by up to ~10 grey levels next to edges, where bicubic overshoots are clipped).
    ``interpolate`` runs the horizontal pass first; the other order takes two single-axis calls.
    """
    resize = lambda x, shape: torch.nn.functional.interpolate(x, size=shape, mode=interpolation, antialias=True)  # noqa: E731
    if vertical_first:
        return resize(resize(window, (size, window.shape[-1])), (size, size))
    return resize(window, (size, size))


def pil_vertical_first(width: int, height: int, size: int) -> bool:
    """Whether PIL (>= 10) resizes ``width x height`` to ``size x size`` vertical pass first: it
    does when the width grows and the height shrinks."""
    return width < size < height


def _orient(view: torch.Tensor, orientation: int) -> torch.Tensor:
    """``[3, H, W]`` stored pixels shown upright, as EXIF ``orientation`` (1-8) asks (PIL's ``exif_transpose``)."""
    rows, cols = -2, -1
    if orientation in (2, 3):
        view = view.flip(cols)
    if orientation in (3, 4):
        view = view.flip(rows)
    if orientation == 5:
        view = view.transpose(rows, cols)
    if orientation == 6:  # rotate 90 degrees clockwise
        view = view.transpose(rows, cols).flip(cols)
    if orientation == 7:
        view = view.flip(rows, cols).transpose(rows, cols)
    if orientation == 8:  # rotate 90 degrees counter-clockwise
        view = view.transpose(rows, cols).flip(rows)
    return view


def _decode_pixels(image: Image.Image, scale: float):
    """The decoded source as ``[1, 3, H, W]`` uint8 in channels-last strides (the layout interpolate's
    fast uint8 path reads), or as the PIL image when it was drafted (its windows are fractional)."""
    rgb = to_rgb(image)
    if scale != 1.0:
        return rgb
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).unsqueeze(0)


def decode_views(path, specs: Sequence[ViewSpec], interpolation: str, rng: np.random.Generator):
    """Decode ``path`` and cut one view per spec.

    ``interpolation`` is ``"bicubic"`` or ``"bilinear"`` (antialiased when shrinking, as PIL).
    Returns ``(views, crops, (H, W))``: views as ``[3, H_v, W_v]`` uint8 tensors, crops an ``[V, 5]``
    int64 array of ``(x0, y0, w, h, flip)`` in upright source pixels, and the source size.
    """
    with Image.open(path) as image:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        orientation = orientation if orientation in range(1, 9) else 1
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
        pixels = _decode_pixels(image, scale)
        views = []
        for (x0, y0, w, h, flip), spec in zip(crops, specs):
            corners = [_upright_to_stored(orientation, x, y, stored_w, stored_h) for x, y in ((x0, y0), (x0 + w, y0 + h))]
            (ax, ay), (bx, by) = corners
            left, top, right, bottom = min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)
            if isinstance(pixels, Image.Image):
                box = (left / scale, top / scale, right / scale, bottom / scale)
                view = torch.from_numpy(np.array(pixels.resize((spec.size, spec.size), RESAMPLE[interpolation], box=box))).permute(2, 0, 1)
            else:
                window = pixels[:, :, int(top):int(bottom), int(left):int(right)]
                # Match PIL's order on the upright image: a transposing orientation swaps the axes.
                vertical_first = pil_vertical_first(int(w), int(h), spec.size) != (orientation >= 5)
                view = resize_uint8(window, spec.size, interpolation, vertical_first)[0]
            view = _orient(view, orientation)
            if flip:
                view = view.flip(-1)
            views.append(view.contiguous())
        return views, crops, (height, width)


# An unreadable file's place goes to the first image that decodes among MAX_STAND_INS drawn for it,
# then, should they all fail (a folder mostly unreadable), among every image of the folder in an
# order drawn for it: a batch keeps its size whenever one image of the folder decodes.
MAX_STAND_INS = 8
# Keys that keep the stand-ins' draws apart from the sample's own crops (numpy seeds [a, b] and
# [a, b, 0] alike, so the keys are not 0).
STAND_INS, STAND_IN_CROPS, STAND_IN_SWEEP = 1, 2, 3


class _ViewDataset(torch.utils.data.Dataset):
    """Map-style dataset over ``(index, epoch, batch_number)`` keys; returns a sample or its failure."""

    def __init__(self, samples, recipe: Recipe, seed: int):
        self.samples = samples
        self.recipe = recipe
        self.seed = seed
        # Files this process failed to decode: a file that failed fails again, so skipping it
        # saves the decode without changing which candidate stands in.
        self.undecodable = {}

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, epoch, batch_number = key
        failure = None
        for attempt, candidate in enumerate(self.candidates(index, epoch)):
            path, label = self.samples[candidate]
            if candidate in self.undecodable:
                failure = failure or self.undecodable[candidate]
                continue
            rng = np.random.default_rng([self.seed, epoch, index] + ([STAND_IN_CROPS, attempt] if attempt else []))
            try:
                views, crops, size = decode_views(path, self.recipe.views, self.recipe.interpolation, rng)
            except Exception as error:  # any undecodable file is skipped and reported, never fatal mid-epoch
                reason = (str(path), f"{type(error).__name__}: {error}")
                if not isinstance(error, MemoryError) and getattr(error, "errno", None) is None:
                    # The file's content (an I/O error or a full memory may pass: not remembered, or
                    # which worker met it would decide later stand-ins)
                    self.undecodable[candidate] = reason
                # Only the sample's own file is reported here: a failed stand-in is reported where it is visited.
                failure = failure or reason
                continue
            return dict(views=views, crops=crops, size=size, index=candidate, label=label, batch_number=batch_number, epoch=epoch, skipped=failure)
        # No image of the folder decodes: the loader stops with an error naming the folder.
        return dict(error=failure, batch_number=batch_number, epoch=epoch)

    def candidates(self, index: int, epoch: int) -> Iterator[int]:
        """``index``, then the images that stand in for it, in order, should its file not decode:
        MAX_STAND_INS drawn at random, then every image of the folder."""
        yield index
        yield from np.random.default_rng([self.seed, epoch, index, STAND_INS]).integers(len(self.samples), size=MAX_STAND_INS).tolist()
        yield from np.random.default_rng([self.seed, epoch, index, STAND_IN_SWEEP]).permutation(len(self.samples)).tolist()


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
        errors = [item.get("error") or item["skipped"] for item in items if item.get("error") or item.get("skipped")]
        out = dict(errors=errors, positions=len(items), epoch=items[0]["epoch"], batch_number=items[0]["batch_number"])
        if not good:
            out["views"] = None
            return out
        out["views"] = []
        for v in range(self.recipe.num_views):
            views = [item["views"][v] for item in good]
            # uint8 views that leave the worker as they are go straight into shared memory.
            stacked = torch.empty(0, dtype=torch.uint8) if self.finish_in_worker else batch_buffer((len(views), *views[0].shape), torch.uint8)
            out["views"].append(torch.stack(views, out=stacked))
        out["crops"] = torch.from_numpy(np.stack([item["crops"] for item in good]))
        out["size"] = torch.tensor([item["size"] for item in good], dtype=torch.int64)
        out["index"] = torch.tensor([item["index"] for item in good], dtype=torch.int64)
        out["label"] = torch.tensor([item["label"] for item in good], dtype=torch.int64)
        if self.finish_in_worker:
            out["views"] = finish_views(out["views"], self.recipe, self.photometric, self.seed, out["epoch"], self.shard_id, out["batch_number"])
        return out


# Images finished together on a CPU: a few hundred kB of float pixels that stay in cache through the
# dozen passes of the colour pipeline (whole 64-image batches run 2.4x slower, bound by memory).
CPU_CHUNK = 8


def finish_views(views: List[torch.Tensor], recipe: Recipe, photometric: bool, seed: int, epoch: int, shard_id: int, batch_number: int):
    """uint8 ``[B, 3, H, W]`` views (any strides) -> normalised float views, colour-augmented.

    Each view's colour parameters are drawn for its whole batch (:func:`sample_params`, as
    :func:`apply_photometric` draws them), then applied a chunk of images at a time on a CPU.
    """
    finished = []
    for v, (view, spec) in enumerate(zip(views, recipe.views)):
        out = batch_buffer(view.shape, torch.float32, view.device)
        if photometric:
            generator = torch.Generator().manual_seed(sample_seed(seed, epoch, shard_id, batch_number, v))
            params = sample_params(spec, view.shape[0], generator)
        chunk = CPU_CHUNK if view.device.type == "cpu" else max(view.shape[0], 1)
        for start in range(0, view.shape[0], chunk):
            rows = slice(start, start + chunk)
            images = out[rows].copy_(view[rows]).div_(255)
            if photometric:
                images.copy_(apply_params(images, params[rows], spec.blur_kernel_size, spec.solarize_threshold))
            normalize(images, recipe.mean, recipe.std, inplace=True)
        finished.append(out)
    return finished


def batch_buffer(shape, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """An empty batch tensor; in a ``DataLoader`` worker, in shared memory from the start (as
    ``default_collate`` does), so the batch reaches the main process without another copy."""
    if torch.utils.data.get_worker_info() is None or torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class TorchLoader:
    """Views with matrices from an image folder, decoded by PIL in ``num_workers`` processes.

    Yields :class:`~fastdense.pipelines.batch.ViewBatch` objects. ``len(loader)`` is the number of
    batches per epoch; another image of the folder stands in for a file that cannot be read (it is
    reported in :attr:`skipped`), so batches keep their size. Each pass over
    the loader is one epoch: epochs 0, 1, 2, ... unless :meth:`set_epoch` picks one.
    """

    def __init__(self, data, recipe="scrl", batch_size: int = 256, seed: int = 0, shard_id: int = 0, num_shards: int = 1,
                 num_workers: int = 8, device=None, photometric: bool = True, shuffle: bool = True, drop_last: bool = True):
        check_loader_args(batch_size, shard_id, num_shards, seed)
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        self.index = scan_image_folder(data)
        check_has_batches(len(self.index), batch_size, shard_id, num_shards, drop_last)
        self.recipe = get_recipe(recipe)
        self.batch_size, self.seed, self.shard_id, self.num_shards = batch_size, seed, shard_id, num_shards
        self.shuffle, self.drop_last, self.photometric = shuffle, drop_last, photometric
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.num_workers = num_workers
        self._report = SkipReport()
        self._next_epoch = 0
        self._start = 0  # the next pass's first batch (start_at)
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
    def num_samples(self) -> int:
        """Images an epoch draws from (the whole folder: an unreadable one is replaced batch by batch)."""
        return len(self.index)

    def sample_names(self) -> List[str]:
        """Each sample as ``path/relative/to/the/folder<TAB>label``, in dataset order: the same names
        wherever the folder is moved, and others when a file is added, removed or renamed."""
        return [f"{Path(path).relative_to(self.index.root).as_posix()}\t{label}" for path, label in self.index.samples]

    @property
    def skipped(self) -> List[Tuple[str, str]]:
        """``(path, reason)`` of the files the current (or last) epoch could not read."""
        return self._report.skipped

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass over the loader epoch ``epoch`` (its order and its augmentations)."""
        self._next_epoch = int(epoch)

    def start_at(self, batch: int) -> None:
        """Make the next pass begin at batch ``batch`` of its epoch, without decoding the ones before:
        they are the same batches a whole pass would give, since every random draw is keyed by epoch,
        image and batch number. (A resumed run continues mid-epoch with this.) The end-of-epoch report
        then covers the batches decoded."""
        check_start_batch(batch, len(self))
        self._start = batch

    def _order(self, epoch: int) -> np.ndarray:
        return epoch_order(len(self.index), self.seed, epoch, self.shard_id, self.num_shards, self.shuffle, self.drop_last)

    def __len__(self) -> int:
        return num_batches(len(self._order(0)), self.batch_size, self.drop_last)

    def __iter__(self):
        epoch = self._next_epoch
        self._next_epoch = epoch + 1
        self._sampler.epoch = epoch
        start, self._start = self._start, 0
        self._sampler.first = start
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(batch_sampler=self._sampler, **self._loader_kwargs)
        self._report.reset()
        seen = 0
        last = len(self) - 1
        for number, part in enumerate(self._loader, start):
            for path, reason in part["errors"]:
                self._report.add(path, reason)
            seen += part["positions"]
            if part["views"] is None or len(part["index"]) < part["positions"]:
                # Every image of the folder was tried as a stand-in (the other backends check files
                # before they start and refuse such a folder; this one learns it at its first batch).
                path, reason = self._report.skipped[0]
                raise ValueError(f"data folder {str(self.index.root)!r}: no readable image among its {len(self.index)} files; "
                                 f"first failure: {path}: {reason}")
            if number == last:
                self._end_epoch(epoch, seen)
            yield self._to_batch(part)
        self._end_epoch(epoch, seen)

    def _end_epoch(self, epoch: int, seen: int) -> None:
        self._report.report(epoch, seen)

    def _to_batch(self, part) -> ViewBatch:
        views = [v.to(self.device, non_blocking=True) for v in part["views"]]
        if self.device.type == "cuda":
            views = finish_views(views, self.recipe, self.photometric, self.seed, part["epoch"], self.shard_id, part["batch_number"])
        matrices = crops_to_matrices(part["crops"], [spec.size for spec in self.recipe.views])
        return ViewBatch.on_device(views, matrices, part["size"], part["index"], part["label"], self.device)


class _EpochBatches(torch.utils.data.Sampler):
    """Batches of ``(index, epoch, batch_number)`` keys for the loader's current epoch."""

    def __init__(self, loader: TorchLoader):
        self.loader = loader
        self.epoch = 0
        self.first = 0  # the current pass's first batch (TorchLoader.start_at)

    def __len__(self):
        return len(self.loader) - self.first

    def __iter__(self):
        order = self.loader._order(self.epoch)
        size = self.loader.batch_size
        for number in range(self.first, len(self.loader)):
            chunk = order[number * size:(number + 1) * size]
            yield [(int(index), self.epoch, number) for index in chunk]
