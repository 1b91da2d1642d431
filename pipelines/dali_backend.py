"""The DALI backend: decode, crop, resize, flip and colour-augment inside one NVIDIA DALI pipeline.

With a GPU, JPEGs are decoded by nvJPEG (``device='mixed'``) and every later operator runs on the
GPU; without one the same graph runs on the CPU (``device_id=None``), which is what CI tests.

Geometry is exact because the crop window is sampled explicitly inside the graph and returned as an
output: ``fn.peek_image_shape`` gives the decoded size (after EXIF orientation, as the decoder
applies it), ``fn.random_crop_generator`` draws a window with the view's area fraction ``scale`` and
aspect ratio ``ratio`` (RandomResizedCrop's rule: 10 tries, then the whole image cut to the nearest
allowed ratio, which DALI places at random where torchvision centres it), a coin draws the flip, and ``fn.resize`` samples the window through ``roi_start``/``roi_end`` in absolute pixel
coordinates, with the x range reversed for a flip. The window, the flip and the source shape leave the
pipeline beside the pixels and become the view matrices of ``CONVENTIONS.md`` section 1.

Photometric augmentation uses DALI operators with per-sample random parameters, each switched on by
its own per-view coin: brightness and contrast as arithmetic (contrast towards the grayscale mean, as
torchvision), then ``fn.color_twist`` for saturation and hue (grayscale folds in as saturation 0);
the jitter runs in this fixed order, not torchvision's random one; ``fn.gaussian_blur``; solarize as
arithmetic. ``photometric=False`` leaves only geometry.

Order and sharding: the same as every backend (:func:`fastdense.pipelines.base.epoch_order` over the
readable files): each epoch builds a pipeline whose file reader gets exactly this shard's files in
this epoch's order, so shards are disjoint and together complete. Every random operator has an
explicit seed derived from ``(seed, epoch, shard, view)``, so the same seed gives the same crops, and
switching photometric augmentation on or off does not change them.

Resuming mid-epoch: a pipeline's random streams run on from batch to batch, so a pass cannot start at
batch k by itself. Pipelines are built with DALI's checkpointing: :meth:`DaliLoader.resume_state`
takes the checkpoint of a pass in progress (generators and reader as of the batches yielded) and
:meth:`DaliLoader.resume_from` continues from it without decoding the batches before, with the same
crops and colours as the uninterrupted pass.

Unreadable files: DALI aborts the pipeline on a decode error, so files are checked once when the
loader is built (:mod:`fastdense.pipelines.validate`: header, structure and JPEG end marker, cached,
and :func:`dali_refuses`: the few image modes DALI's decoder cannot read)
and left out of the reader. They are listed in ``loader.skipped`` as ``(path, reason)`` and reported
on the ``fastdense.pipelines`` logger at the end of every epoch.
"""

from __future__ import annotations

import os
import warnings
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from fastdense.pipelines.base import SkipReport, check_has_batches, check_loader_args, check_start_batch, epoch_order, num_batches, sample_seed
from fastdense.pipelines.batch import ViewBatch
from fastdense.pipelines.folder import scan_image_folder
from fastdense.pipelines.photometric import GRAY_WEIGHTS
from fastdense.pipelines.recipes import Recipe, ViewSpec, get_recipe
from fastdense.pipelines.validate import find_unreadable
from fastdense.geometry import crop_matrix

READER_NAME = "reader"
INTERPOLATIONS = {"bicubic": "INTERP_CUBIC", "bilinear": "INTERP_LINEAR"}
# What fn.decoders.image reads, as PIL names the formats (PPM covers PGM and PBM; MPO is a JPEG
# with extra pictures). A GIF, even one named .jpg, stops DALI's whole pipeline.
DALI_FORMATS = ("JPEG", "MPO", "PNG", "TIFF", "BMP", "WEBP", "PPM", "JPEG2000")
TIFF_BITS_PER_SAMPLE = 258


def dali_refuses(image) -> Optional[str]:
    """Why DALI's decoder (``fn.decoders.image``, as tried on the CPU) stops its pipeline on an image
    of a format it reads, from the header PIL has parsed, or None. Found by decoding every PIL mode in
    every format above; the others (16-bit, float, CMYK, LA, palette TIFFs, 1-bit with its tag...) decode."""
    kind = (image.format, image.mode)
    if kind == ("TIFF", "I"):
        return "32-bit integer TIFF (PIL mode I): DALI cannot decode it (Invalid sample_type)"
    if image.format == "TIFF" and TIFF_BITS_PER_SAMPLE not in getattr(image, "tag_v2", {}):
        # The tag defaults to 1 in the TIFF standard (PIL writes bilevel images so); DALI requires it.
        return "TIFF without a BitsPerSample tag: DALI cannot decode it"
    if kind == ("PPM", "F"):
        return "float PFM image: DALI cannot decode it"
    if kind in (("JPEG2000", "CMYK"), ("JPEG2000", "LA")):
        return f"JPEG 2000 image in mode {image.mode}: DALI cannot decode it"
    return None


def _import_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as error:  # pragma: no cover - depends on the machine
        raise ImportError(
            "the dali backend needs NVIDIA DALI: pip install 'fastdense[dali]' (or nvidia-dali-cuda130)"
        ) from error
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dali_math

    return fn, pipeline_def, types, dali_math


def operator_seed(*keys: int) -> int:
    """A 31-bit operator seed from integer keys, stable across runs and machines."""
    return sample_seed(*keys) & 0x7FFFFFFF


def _view_graph(fn, types, dali_math, images, shape, spec: ViewSpec, interp, on_gpu: bool, photometric: bool, mean, std, seeds):
    """One view inside the pipeline: ``(pixels CHW float, window [x0, y0, w, h, flip])``.

    ``seeds`` are the keys of this view's random operators (seed, epoch, shard, view)."""

    def to_device(node):
        return node.gpu() if on_gpu else node

    def as_float(node):
        return fn.cast(node, dtype=types.FLOAT)

    anchor, size = fn.random_crop_generator(
        shape, random_area=list(spec.scale), random_aspect_ratio=list(spec.ratio), seed=operator_seed(*seeds, 0)
    )
    y0, x0, h, w = anchor[0], anchor[1], size[0], size[1]
    flip = fn.random.coin_flip(probability=float(spec.flip_p), dtype=types.INT32, seed=operator_seed(*seeds, 1))
    # A reversed x range makes fn.resize mirror the window: view x = 0 samples source x = x0 + w.
    x_start = x0 + flip * w
    x_end = x0 + w - flip * w
    roi_start = as_float(fn.stack(y0, x_start))
    roi_end = as_float(fn.stack(y0 + h, x_end))
    view = fn.resize(
        images,
        size=[spec.size, spec.size],
        roi_start=roi_start,
        roi_end=roi_end,
        roi_relative=False,
        interp_type=interp,
        antialias=True,
        dtype=types.FLOAT,
    )
    view = dali_math.clamp(view, 0.0, 255.0)  # cubic overshoot, as PIL clips it
    if photometric:
        view = _photometric_graph(fn, types, dali_math, view, spec, to_device, as_float, seeds)
    view = fn.crop_mirror_normalize(
        view,
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[255.0 * m for m in mean],
        std=[255.0 * s for s in std],
    )
    window = fn.stack(x0, y0, w, h, flip)
    return view, window


def _photometric_graph(fn, types, dali_math, view, spec: ViewSpec, to_device, as_float, seeds):
    """The BYOL colour pipeline on a float ``[0, 255]`` HWC view, one coin per operation and sample.

    Jitter runs in a fixed order (brightness, contrast, then saturation and hue in one
    ``fn.color_twist``), each step clamped to ``[0, 255]`` as torchvision clamps. Contrast blends
    towards the mean of the image's grayscale, as torchvision does: ``fn.color_twist``'s own contrast
    pivots on half the type's range, which for float input is 0.5, a shade of black here."""
    counter = iter(range(2, 100))

    def uniform(low, high):
        if low == high:  # fn.random.uniform rejects an empty range
            return float(low)
        return fn.random.uniform(range=[low, high], seed=operator_seed(*seeds, next(counter)))

    def coin(p):
        return as_float(fn.random.coin_flip(probability=float(p), dtype=types.INT32, seed=operator_seed(*seeds, next(counter))))

    def factor(strength, applied):
        drawn = uniform(max(0.0, 1.0 - strength), 1.0 + strength)
        return 1.0 + applied * (drawn - 1.0)

    def clamp(node):
        return dali_math.clamp(node, 0.0, 255.0)

    if spec.jitter_p > 0 or spec.grayscale_p > 0:
        jitter = coin(spec.jitter_p)
        strength_b, strength_c, strength_s, strength_h = spec.jitter
        brightness = factor(strength_b, jitter)
        contrast = factor(strength_c, jitter)
        saturation = factor(strength_s, jitter)
        hue_degrees = jitter * uniform(-strength_h, strength_h) * 360.0
        keep_colour = 1.0 - coin(spec.grayscale_p)
        view = clamp(view * to_device(brightness))
        luma = types.Constant(np.array(GRAY_WEIGHTS, dtype=np.float32))
        gray_mean = 3.0 * fn.reductions.mean(view * luma, axes=[0, 1, 2], keep_dims=True)
        view = clamp(gray_mean + to_device(contrast) * (view - gray_mean))
        view = clamp(fn.color_twist(view, saturation=saturation * keep_colour, hue=hue_degrees, dtype=types.FLOAT))
    if spec.blur_p > 0:
        sigma = uniform(spec.blur_sigma[0], spec.blur_sigma[1])
        blurred = fn.gaussian_blur(view, window_size=spec.blur_kernel_size, sigma=sigma)
        view = view + to_device(coin(spec.blur_p)) * (blurred - view)
    if spec.solarize_p > 0:
        above = view >= 255.0 * spec.solarize_threshold
        view = view + to_device(coin(spec.solarize_p)) * above * (255.0 - 2.0 * view)
    return view


class DaliLoader:
    """Batches of augmented views from an image folder through an NVIDIA DALI pipeline.

    Arguments are those of :func:`fastdense.pipelines.make_loader` (without ``backend``). ``device``
    ``None`` uses the current CUDA device when there is one (GPU decode and augmentation) and the
    CPU otherwise; ``num_workers`` is DALI's thread count. ``len(loader)`` is this shard's number of
    batches per epoch; with ``drop_last=False`` the last batch may be smaller.

    >>> loader = DaliLoader(data="/data/train", recipe="scrl", batch_size=64)  # doctest: +SKIP
    >>> batch = next(iter(loader))                                             # doctest: +SKIP
    >>> batch.matrices.shape                                                   # doctest: +SKIP
    torch.Size([64, 2, 3, 3])
    """

    def __init__(
        self,
        data,
        recipe: Union[str, Recipe],
        batch_size: int,
        seed: int = 0,
        shard_id: int = 0,
        num_shards: int = 1,
        num_workers: int = 4,
        device=None,
        photometric: bool = True,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        check_loader_args(batch_size, shard_id, num_shards, seed)
        _import_dali()
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.recipe = get_recipe(recipe)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.num_threads = max(1, int(num_workers))
        self.photometric = bool(photometric)
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type not in ("cuda", "cpu"):
            raise ValueError(f"device must be a CUDA device, 'cpu' or None, got {device!r}")

        index = scan_image_folder(data)
        self.classes = index.classes
        paths = [path for path, _ in index.samples]
        self.labels = torch.tensor([label for _, label in index.samples], dtype=torch.int64)
        self.unreadable: List[Tuple[str, str]] = [(str(p), r) for p, r in find_unreadable(paths, index.root, self.num_threads, formats=DALI_FORMATS, refuse=dali_refuses)]
        self._report = SkipReport()
        bad = {path for path, _ in self.unreadable}
        self.readable = np.array([i for i, p in enumerate(paths) if str(p) not in bad], dtype=np.int64)
        if len(self.readable) == 0:
            raise ValueError(f"data folder {str(index.root)!r} holds no readable image ({len(self.unreadable)} unreadable)")
        check_has_batches(len(self.readable), batch_size, shard_id, num_shards, self.drop_last)
        self.paths = [str(p) for p in paths]
        self.epoch = 0
        self._iterator = None  # the pass in progress: (epoch, DALI iterator, batches it has yielded)
        self._resume = None  # a state from :meth:`resume_state` that the next pass continues from

    @property
    def skipped(self) -> List[Tuple[str, str]]:
        """``(path, reason)`` of the files left out of the current (or last finished) epoch."""
        return self._report.skipped

    @property
    def num_samples(self) -> int:
        """Images an epoch draws from: those DALI can decode (the others are left out up front)."""
        return len(self.readable)

    def sample_names(self) -> List[str]:
        """The readable samples' paths relative to the folder that holds them all, in dataset order:
        the same names wherever the folder is moved, and others when a file is added, removed or renamed."""
        root = os.path.commonpath(self.paths) if len(self.paths) > 1 else ""
        return [os.path.relpath(self.paths[i], root) if root else self.paths[i] for i in self.readable]

    def epoch_samples(self, epoch: int) -> np.ndarray:
        """Dataset indices this shard reads in ``epoch``, in order (whole batches with ``drop_last``)."""
        order = self.readable[epoch_order(len(self.readable), self.seed, epoch, self.shard_id, self.num_shards, self.shuffle, self.drop_last)]
        if self.drop_last:
            order = order[: len(order) // self.batch_size * self.batch_size]
        return order

    def __len__(self) -> int:
        shard = len(epoch_order(len(self.readable), self.seed, 0, self.shard_id, self.num_shards, False, self.drop_last))
        return num_batches(shard, self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and crops the next iteration produces."""
        self.epoch = int(epoch)

    def resume_state(self) -> Optional[dict]:
        """Where the pass in progress stands, to continue it later with :meth:`resume_from`:
        ``{"epoch", "batch", "dali"}``, the batches yielded so far and DALI's own checkpoint (every
        random generator's state and the reader's position, taken as of those batches, whatever
        DALI has prefetched), or None when no pass is in progress."""
        if self._iterator is None:
            return None
        epoch, iterator, yielded = self._iterator
        return {"epoch": epoch, "batch": yielded, "dali": iterator.checkpoints()[0]}

    def resume_from(self, state: dict) -> None:
        """Make the next pass continue a pass of :meth:`resume_state`'s epoch after its ``batch`` batches,
        with the same crops and colours as the uninterrupted pass and without decoding the batches
        before (a resumed run continues mid-epoch with this). It applies to the epoch selected by
        :meth:`set_epoch` when that is the state's; a DALI that cannot read the checkpoint (another
        version) makes the pass decode and drop the batches before instead, with a warning."""
        if not isinstance(state, dict) or not {"epoch", "batch", "dali"} <= state.keys():
            raise ValueError(f"state must be a dict from DaliLoader.resume_state() with keys epoch, batch and dali, got {state!r:.200}")
        check_start_batch(state["batch"], len(self))
        self._resume = state

    # -- pipeline --------------------------------------------------------------------------------
    def _build(self, epoch: int, checkpoint: Optional[str] = None):
        fn, pipeline_def, types, dali_math = _import_dali()
        order = self.epoch_samples(epoch)
        on_gpu = self.device.type == "cuda"
        interp = getattr(types, INTERPOLATIONS[self.recipe.interpolation])
        recipe, photometric = self.recipe, self.photometric

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device.index if on_gpu else None,
            seed=operator_seed(self.seed, epoch, self.shard_id),
            prefetch_queue_depth=2,
            # DALI tracks its generators' and reader's states at no measurable cost (its documentation)
            enable_checkpointing=True,
            checkpoint=checkpoint,
        )
        def graph():
            encoded, sample_index = fn.readers.file(
                files=[self.paths[i] for i in order],
                labels=[int(i) for i in order],
                random_shuffle=False,
                pad_last_batch=False,
                name=READER_NAME,
            )
            shape = fn.peek_image_shape(encoded)
            images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
            outputs = [sample_index, shape]
            for v, spec in enumerate(recipe.views):
                seeds = (self.seed, epoch, self.shard_id, v)
                outputs.extend(_view_graph(fn, types, dali_math, images, shape, spec, interp, on_gpu, photometric, recipe.mean, recipe.std, seeds))
            return tuple(outputs)

        pipe = graph()
        pipe.build()
        return pipe

    def output_names(self) -> List[str]:
        names = ["index", "shape"]
        for v in range(self.recipe.num_views):
            names += [f"view{v}", f"window{v}"]
        return names

    def __iter__(self) -> Iterator[ViewBatch]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        epoch = self.epoch
        self.epoch = epoch + 1  # now, not at the end: a pass stopped early must not repeat its epoch
        resume, self._resume = self._resume, None
        start, drop = (resume["batch"], 0) if resume is not None and resume["epoch"] == epoch else (0, 0)
        self._report.reset()
        pipe = None
        if start:
            try:
                pipe = self._build(epoch, checkpoint=resume["dali"])
            except Exception as error:  # a checkpoint of another DALI version, for instance
                warnings.warn(f"DALI could not restore its checkpoint ({error}); decoding the epoch's first {start} batches again to continue after them")
                drop = start
        if pipe is None:
            pipe = self._build(epoch)
        iterator = DALIGenericIterator(
            pipe, self.output_names(), reader_name=READER_NAME, last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False
        )
        sizes = [spec.size for spec in self.recipe.views]
        for path, reason in self.unreadable:
            self._report.add(path, reason)
        last = len(self) - 1
        self._iterator = (epoch, iterator, start - drop)
        try:
            for number, outputs in enumerate(iterator, start=start - drop):
                if number < start:
                    self._iterator = (epoch, iterator, number + 1)
                    continue
                batch = self._to_batch(outputs[0], sizes)
                if number == last:
                    self._report.report(epoch, len(self.paths))
                self._iterator = (epoch, iterator, number + 1)
                yield batch
        finally:
            self._iterator = None
            del iterator, pipe
        self._report.report(epoch, len(self.paths))

    def _to_batch(self, out: dict, sizes: List[int]) -> ViewBatch:
        index = out["index"].reshape(-1).to(torch.int64).cpu()
        windows = torch.stack([out[f"window{v}"].cpu() for v in range(len(sizes))], dim=1).to(torch.float32)  # [B, V, 5]
        size = torch.tensor(sizes, dtype=torch.float32)
        x0, y0, w, h, flip = windows.unbind(-1)
        matrices = crop_matrix(x0, y0, w, h, size, size, flip.bool())
        views = [out[f"view{v}"].to(self.device, non_blocking=True) for v in range(len(sizes))]
        return ViewBatch.on_device(views, matrices, out["shape"][:, :2].to(torch.int64), index, self.labels[index], self.device)
