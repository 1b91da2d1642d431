"""The FFCV backend: a ``.beton`` writer for an image folder and a loader whose decoders report their crops.

Writing (:func:`write_beton`, or ``python -m fastdense.pipelines.ffcv_backend write FOLDER OUT.beton``,
or the ``fastdense-write-beton`` command) stores, per readable image: the RGB pixels
(``RGBImageField``, JPEG at ``jpeg_quality`` or raw, after an optional ``max_resolution`` downscale
of the longer side), the class ``label``, the sample's ``index`` in the folder
(:func:`~fastdense.pipelines.folder.scan_image_folder` order, so indices match the other backends)
and ``source_size``, the stored ``(H, W)``. "Source" for the view matrices is this stored image.
Files that cannot be decoded are skipped, counted, reported, and listed beside the ``.beton`` in
``<path>.skipped.json``, which the loader reports again at the end of each epoch.

Loading (:class:`FfcvLoader`): FFCV's ``RandomResizedCropRGBImageDecoder`` draws its window inside
compiled code and keeps it. :class:`ViewCropDecoder` is the same decode-crop-resize operation but
draws the window itself (torchvision's RandomResizedCrop rule, as :func:`fastdense.pipelines.crops.sample_crop`),
applies the flip, and appends the window ``(x0, y0, w, h, flip)`` to its output; one decoder per view
reads the same ``image`` field. Its random numbers come from a counter-based generator keyed by
``(seed, epoch, sample index, view)``, so results do not depend on thread scheduling: the same seed
gives the same crops. The crop is resized with OpenCV's ``INTER_AREA`` (FFCV's resize, which has no
other mode), whatever the recipe's interpolation: of OpenCV's modes the closest to the recipes'
antialiased resize when shrinking (README, Performance; ``benchmarks/bench_ffcv_resize.py``).
Photometric augmentation and normalisation then run batched on the target device
(:mod:`fastdense.pipelines.photometric`).

Order and sharding: the same as every backend (:func:`fastdense.pipelines.base.epoch_order` over the
stored samples), handed to FFCV as a custom traversal order, so shards are disjoint and together
complete. ``data`` may also be an image folder: it is then written once to a ``.beton`` in the
cache (``$FASTDENSE_CACHE/beton``, keyed by the folder's files, sizes and modification times).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from fastdense.geometry import crop_matrix
from fastdense.pipelines.base import SkipReport, check_has_batches, check_loader_args, check_start_batch, epoch_order, num_batches
from fastdense.pipelines.batch import ViewBatch
from fastdense.pipelines.folder import scan_image_folder
from fastdense.pipelines.recipes import Recipe, ViewSpec, get_recipe
from fastdense.pipelines.torch_backend import to_rgb
from fastdense.pipelines.validate import cache_dir, check_image_file

#: bytes appended to every view after its pixels: five little-endian int32 ``(x0, y0, w, h, flip)``
WINDOW_BYTES = 20
MIN_PAGE_SIZE = 1 << 23
LOG = logging.getLogger("fastdense.pipelines")


def _import_ffcv():
    try:
        import ffcv  # noqa: F401
    except ImportError as error:  # pragma: no cover - depends on the machine
        raise ImportError("the ffcv backend needs FFCV 1.0.2: see scripts/install.sh (pip install 'fastdense[ffcv]')") from error
    _stop_ffcv_mutating_numba_types()


def _stop_ffcv_mutating_numba_types() -> None:
    """Make FFCV's OS-cache reader declare a *new* read-only array type.

    FFCV 1.0.2's ``OSCacheManager.state_type`` sets ``mutable = False`` on ``numba.uint8[::1]``, the
    one interned type every numba function uses for a contiguous uint8 array. That changes the
    type's hash after numba has stored it in dispatchers' signature dictionaries, so the next
    compilation that looks one up (the second loader in a process) raises ``KeyError`` inside
    FFCV's loader thread, and the main thread then waits for a batch forever. The replacement
    reads the same bytes with the same (read-only) types, built without touching shared ones."""
    from ffcv.memory_managers.os_cache import OSCacheManager
    from ffcv.pipeline.compiler import Compiler
    from numba import types

    if getattr(OSCacheManager, "_fastdense_patched", False):
        return
    readonly_bytes = types.Array(types.uint8, 1, "C", readonly=True)
    state_type = types.Tuple([readonly_bytes, types.uint64[::1], types.uint64[::1]])

    def compile_reader(self):
        def read(address, mem_state):
            size = mem_state[2][np.searchsorted(mem_state[1], address)]
            return mem_state[0][address:address + size]

        return Compiler.compile(read, readonly_bytes(types.uint64, state_type))

    OSCacheManager.state_type = property(lambda self: state_type)
    OSCacheManager.compile_reader = compile_reader
    OSCacheManager._fastdense_patched = True


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def load_rgb(path) -> np.ndarray:
    """Decode ``path`` to ``uint8 [H, W, 3]`` RGB: EXIF orientation applied (as DALI's decoder does),
    then every mode converted as the torch backend converts it (:func:`~fastdense.pipelines.torch_backend.to_rgb`:
    alpha dropped, CMYK and grayscale converted, 16-bit samples scaled from 0-65535 to 0-255)."""
    with Image.open(path) as image:
        return np.asarray(to_rgb(ImageOps.exif_transpose(image)))


def stored_size(height: int, width: int, max_resolution: Optional[int]) -> Tuple[int, int]:
    """``(H, W)`` after FFCV's downscale rule: the longer side cut to ``max_resolution``, never enlarged."""
    if max_resolution is None or max(height, width) <= max_resolution:
        return height, width
    ratio = max_resolution / max(height, width)
    return max(1, int(ratio * height)), max(1, int(ratio * width))


class _FolderSamples:
    """The indexable dataset FFCV's writer reads: ``(image, label, index, source_size)``."""

    def __init__(self, samples: Sequence[Tuple[str, int, int]], max_resolution: Optional[int]):
        self.samples = list(samples)
        self.max_resolution = max_resolution

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        import cv2

        path, label, index = self.samples[i]
        image = load_rgb(path)
        height, width = stored_size(image.shape[0], image.shape[1], self.max_resolution)
        if (height, width) != image.shape[:2]:
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        return image, label, index, np.array([height, width], dtype=np.int32)


def _storable(file, max_resolution: Optional[int]) -> Tuple[Optional[str], Tuple[int, int]]:
    """``(why file cannot be stored or None, its stored (H, W))``. Every file is decoded here in
    full: a file that passes the cheap checks but fails to decode (damage inside the data) kills
    FFCV's writer process, and the write then waits for it forever."""
    reason = check_image_file(file)
    if reason is not None:
        return reason, (0, 0)
    try:
        height, width = load_rgb(file).shape[:2]
    except Exception as error:  # PIL raises many types for damaged data
        return f"not a decodable image: {type(error).__name__}: {error}", (0, 0)
    return None, stored_size(height, width, max_resolution)


def write_beton(
    image_folder,
    path,
    max_resolution: Optional[int] = None,
    jpeg_quality: int = 90,
    num_workers: int = -1,
    write_mode: str = "jpg",
) -> dict:
    """Write the image folder ``image_folder`` to the FFCV file ``path``, with a progress bar.

    Every file is decoded once first (``num_workers`` threads), so that only files that decode are
    handed to FFCV's writer. ``write_mode`` is ``"jpg"`` (JPEG at ``jpeg_quality``) or ``"raw"`` (lossless pixels). Returns
    ``{"written": n, "skipped": [(file, reason), ...]}``; skipped files are also printed and saved to
    ``<path>.skipped.json``. A missing or empty folder raises before anything is written.

    >>> write_beton("/data/train", "/data/train.beton", max_resolution=512)  # doctest: +SKIP
    """
    _import_ffcv()
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm  # comes with FFCV

    if write_mode not in ("jpg", "raw"):
        raise ValueError(f"write_mode must be 'jpg' or 'raw', got {write_mode!r}")
    if not (isinstance(jpeg_quality, int) and 1 <= jpeg_quality <= 100):
        raise ValueError(f"jpeg_quality must be an int in [1, 100], got {jpeg_quality!r}")
    if max_resolution is not None and (not isinstance(max_resolution, int) or max_resolution < 1):
        raise ValueError(f"max_resolution must be None or a positive int, got {max_resolution!r}")
    index = scan_image_folder(image_folder)
    keep, skipped, largest = [], [], 0
    threads = num_workers if num_workers > 0 else (os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        checked = pool.map(lambda sample: _storable(sample[0], max_resolution), index.samples)
        for i, ((file, label), (reason, size)) in enumerate(tqdm(zip(index.samples, checked), total=len(index), desc="decoding")):
            if reason is None:
                keep.append((str(file), label, i))
                largest = max(largest, 3 * size[0] * size[1])
            else:
                skipped.append((str(file), reason))
    if not keep:
        raise ValueError(f"data folder {str(index.root)!r} holds no readable image ({len(skipped)} unreadable)")
    # A sample must fit in one page; raw pixels of a large image do not fit FFCV's default 8 MiB.
    page_size = max(MIN_PAGE_SIZE, 1 << math.ceil(math.log2(largest + (1 << 20))))
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=None, jpeg_quality=jpeg_quality),
        "label": IntField(),
        "index": IntField(),
        "source_size": NDArrayField(np.dtype("int32"), (2,)),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = DatasetWriter(str(path), fields, page_size=page_size, num_workers=num_workers)
    writer.from_indexed_dataset(_FolderSamples(keep, max_resolution), chunksize=16)
    Path(str(path) + ".skipped.json").write_text(json.dumps(skipped, indent=1))
    if skipped:
        lines = "\n".join(f"  {file}: {reason}" for file, reason in skipped)
        LOG.warning("write_beton: skipped %d of %d files that could not be read:\n%s", len(skipped), len(index.samples), lines)
    return {"written": len(keep), "skipped": skipped}


# ---------------------------------------------------------------------------------------------
# Crop sampling inside FFCV's compiled code
# ---------------------------------------------------------------------------------------------

try:  # the crop sampler is compiled into FFCV's pipeline; numba comes with FFCV
    from numba import njit as _njit
except ImportError:  # pragma: no cover - without numba the ffcv backend cannot load anyway

    def _njit(function):
        return function


_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


@_njit
def _splitmix64(state):
    """One step of SplitMix64: ``(new_state, 64 random bits)``; all arithmetic modulo 2**64."""
    state = np.uint64(state + np.uint64(_GOLDEN))
    z = state
    z = np.uint64((z ^ (z >> np.uint64(30))) * np.uint64(_MIX1))
    z = np.uint64((z ^ (z >> np.uint64(27))) * np.uint64(_MIX2))
    return state, np.uint64(z ^ (z >> np.uint64(31)))


@_njit
def _uniform(state):
    """``(new_state, u)`` with ``u`` uniform in ``[0, 1)`` (53 random bits)."""
    state, bits = _splitmix64(state)
    return state, float(bits >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@_njit
def _stream(seed, epoch, index, view):
    """The generator state for one (seed, epoch, sample, view): each key goes through a full mix."""
    _, state = _splitmix64(np.uint64(seed))
    _, state = _splitmix64(np.uint64(state ^ np.uint64(epoch)))
    _, state = _splitmix64(np.uint64(state ^ np.uint64(index)))
    _, state = _splitmix64(np.uint64(state ^ np.uint64(view)))
    return state


@_njit
def _sample_window(state, height, width, scale_low, scale_high, log_ratio_low, log_ratio_high, flip_p):
    """torchvision's RandomResizedCrop window and a flip coin: ``(state, x0, y0, w, h, flip)``."""
    area = height * width
    for _ in range(10):
        state, u = _uniform(state)
        target_area = area * (scale_low + (scale_high - scale_low) * u)
        state, u = _uniform(state)
        aspect = math.exp(log_ratio_low + (log_ratio_high - log_ratio_low) * u)
        w = int(np.round(math.sqrt(target_area * aspect)))
        h = int(np.round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            state, u = _uniform(state)
            y0 = min(int(u * (height - h + 1)), height - h)
            state, u = _uniform(state)
            x0 = min(int(u * (width - w + 1)), width - w)
            state, u = _uniform(state)
            return state, x0, y0, w, h, 1 if u < flip_p else 0
    image_ratio = width / height
    if image_ratio < math.exp(log_ratio_low):
        w, h = width, max(1, int(np.round(width / math.exp(log_ratio_low))))
    elif image_ratio > math.exp(log_ratio_high):
        w, h = max(1, int(np.round(height * math.exp(log_ratio_high)))), height
    else:
        w, h = width, height
    state, u = _uniform(state)
    return state, (width - w) // 2, (height - h) // 2, w, h, 1 if u < flip_p else 0


@_njit
def _write_window(record, x0, y0, w, h, flip):
    values = (x0, y0, w, h, flip)
    for k in range(5):
        for b in range(4):
            record[4 * k + b] = (values[k] >> (8 * b)) & 255


def read_windows(packed: np.ndarray, view_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Split a :class:`ViewCropDecoder` output ``[B, S*S*3 + 20]`` into pixels ``[B, S, S, 3]`` and
    windows ``[B, 5]`` int32 ``(x0, y0, w, h, flip)``."""
    n_pixels = view_size * view_size * 3
    pixels = packed[:, :n_pixels].reshape(-1, view_size, view_size, 3)
    windows = np.ascontiguousarray(packed[:, n_pixels:n_pixels + WINDOW_BYTES]).view("<i4")
    return pixels, windows


_POINTER_INTRINSIC = []


def _address_as_pointer():
    """A numba intrinsic turning an integer address into a pointer, so compiled code can read the
    loader's live ``[seed, epoch]`` array: numba freezes captured arrays as constants."""
    if _POINTER_INTRINSIC:  # one intrinsic per process: numba keys compiled callers on it
        return _POINTER_INTRINSIC[0]
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def address_as_pointer(typingctx, address):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], cgutils.voidptr_t)

        return types.voidptr(address), codegen

    _POINTER_INTRINSIC.append(address_as_pointer)
    return address_as_pointer


def _view_crop_decoder_class():
    """Build the decoder class lazily: FFCV (and numba) are optional imports."""
    _import_ffcv()
    from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    import numba

    class ViewCropDecoder(SimpleRGBImageDecoder):
        """Decode an ``RGBImageField``, crop a random window, resize it to ``size x size``, maybe
        flip it, and append the window (see :func:`read_windows`).

        ``clock`` is an int64 array ``[seed, epoch]`` that the owner updates between epochs; the
        compiled code reads it through its address each batch.
        """

        def __init__(self, spec: ViewSpec, view: int, clock: np.ndarray):
            super().__init__()
            if clock.dtype != np.int64 or clock.shape != (2,) or not clock.flags.c_contiguous:
                raise ValueError("clock must be a contiguous int64 array of shape [2] (seed, epoch)")
            self.spec = spec
            self.view = view
            self.clock = clock

        def declare_state_and_memory(self, previous_state):
            widths = self.metadata["width"]
            heights = self.metadata["height"]
            largest = np.uint64(widths.max()) * np.uint64(heights.max()) * np.uint64(3)
            shape = (self.spec.size * self.spec.size * 3 + WINDOW_BYTES,)
            dtype = np.dtype("<u1")
            return (
                replace(previous_state, jit_mode=True, shape=shape, dtype=dtype),
                (AllocationQuery(shape, dtype), AllocationQuery((largest,), dtype)),
            )

        def generate_code(self) -> Callable:
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            stream, sample_window, write_window = _stream, _sample_window, _write_window
            address_as_pointer = _address_as_pointer()
            clock_address = self.clock.ctypes.data
            size = self.spec.size
            n_pixels = size * size * 3
            view = self.view
            scale_low, scale_high = float(self.spec.scale[0]), float(self.spec.scale[1])
            log_ratio_low, log_ratio_high = math.log(self.spec.ratio[0]), math.log(self.spec.ratio[1])
            flip_p = float(self.spec.flip_p)

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                clock = numba.carray(address_as_pointer(clock_address), (2,), np.int64)
                seed, epoch = clock[0], clock[1]
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                        temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    state = stream(seed, epoch, source_ix, view)
                    state, x0, y0, w, h, flip = sample_window(
                        state, int(height), int(width), scale_low, scale_high, log_ratio_low, log_ratio_high, flip_p
                    )
                    out = destination[dst_ix]
                    pixels = out[:n_pixels].reshape(size, size, 3)
                    resize_crop_c(temp_buffer, y0, y0 + h, x0, x0 + w, pixels)
                    if flip:
                        for row in range(size):
                            for col in range(size // 2):
                                for c in range(3):
                                    left = pixels[row, col, c]
                                    pixels[row, col, c] = pixels[row, size - 1 - col, c]
                                    pixels[row, size - 1 - col, c] = left
                    write_window(out[n_pixels:], x0, y0, w, h, flip)
                return destination[: len(batch_indices)]

            decode.is_parallel = True
            return decode

    return ViewCropDecoder


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def beton_for_folder(folder) -> Path:
    """The cached ``.beton`` of an image folder, written on first use (and again when files change)."""
    index = scan_image_folder(folder)
    digest = hashlib.sha1(str(index.root.resolve()).encode())
    for path, label in index.samples:
        info = os.stat(path)
        digest.update(f"{path}|{label}|{info.st_size}|{info.st_mtime_ns}".encode())
    path = cache_dir() / "beton" / f"{index.root.name}-{digest.hexdigest()[:16]}.beton"
    if not path.is_file():
        partial = path.with_name(path.name + f".{os.getpid()}.partial")
        write_beton(index.root, partial)
        os.replace(str(partial) + ".skipped.json", str(path) + ".skipped.json")
        os.replace(partial, path)
    return path


def _traversal_order(seed: int, shard_id: int, num_shards: int, shuffle: bool, drop_last: bool, batch_size: int):
    """An FFCV traversal order following :func:`fastdense.pipelines.base.epoch_order`.

    FFCV 1.0.2 accepts a custom order only as a ``TraversalOrder`` *instance* that it then calls with
    the loader (``order(loader)``), so the object is made first and bound to its loader on call."""
    from ffcv.traversal_order.base import TraversalOrder

    class EpochOrder(TraversalOrder):
        def __init__(self):  # bound to a loader by __call__
            self.start = 0  # samples of the next epoch's order left out (whole batches: FfcvLoader.start_at)

        def __call__(self, loader):
            TraversalOrder.__init__(self, loader)
            return self

        def sample_order(self, epoch: int):
            order = epoch_order(len(self.indices), seed, epoch, shard_id, num_shards, shuffle, drop_last)
            if drop_last:
                order = order[: len(order) // batch_size * batch_size]
            return self.indices[order[self.start:]]

    return EpochOrder()


BETON_FIELDS = ("image", "label", "index", "source_size")


def read_beton(path: Path):
    """FFCV's ``Reader`` of ``path``, or a ValueError naming it when it is not a whole .beton from
    :func:`write_beton`: FFCV meets a foreign, empty or truncated file with an AssertionError
    ("file format mismatch"), an IndexError or "negative dimensions are not allowed", none naming it."""
    from ffcv.reader import Reader

    problem = f"{str(path)!r} is not a .beton written by write_beton, or it was cut short"
    try:
        reader = Reader(str(path))
    except Exception as error:  # whatever FFCV raises on bytes it cannot parse
        raise ValueError(f"{problem} ({type(error).__name__}: {error})") from None
    size = os.path.getsize(path)
    table = reader.alloc_table
    data_end = int((table["ptr"] + table["size"]).max()) if len(table) else 0
    missing = [name for name in BETON_FIELDS if name not in reader.field_names]
    if missing:
        raise ValueError(f"{problem} (it has no field {', '.join(missing)})")
    # The allocation table is written last, one entry per sample for each field stored out of line
    # (all but the integers and floats): a file cut short loses entries, or the whole table.
    from ffcv.fields import FloatField, IntField

    allocated = sum(not isinstance(handler, (IntField, FloatField)) for handler in reader.handlers.values())
    per_sample = np.bincount(table["sample_id"].astype(np.int64), minlength=reader.num_samples) if len(table) else np.zeros(1, np.int64)
    table_bytes = size - int(reader.header["alloc_table_ptr"])
    if (len(reader.metadata) != reader.num_samples or per_sample.min() != allocated or per_sample.max() != allocated
            or table_bytes < 0 or table_bytes % table.dtype.itemsize or data_end > size):
        raise ValueError(f"{problem} (its header lists {reader.num_samples} samples; its {size} bytes do not hold them all)")
    return reader


class FfcvLoader:
    """Batches of augmented views from a ``.beton`` file written by :func:`write_beton`.

    Arguments are those of :func:`fastdense.pipelines.make_loader` (without ``backend``); ``data`` is
    a ``.beton`` path (or an image folder, converted once into the cache) and ``num_workers`` FFCV's
    thread count. ``device`` ``None`` means CUDA if present, else CPU. ``len(loader)`` is this
    shard's number of batches per epoch.

    >>> loader = FfcvLoader(data="/data/train.beton", recipe="scrl", batch_size=64)  # doctest: +SKIP
    >>> batch = next(iter(loader))                                                   # doctest: +SKIP
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
        path = Path(data).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data {str(path)!r} does not exist (a .beton file written by fastdense.pipelines.write_beton, or an image folder)")
        if path.is_dir():
            path = beton_for_folder(path)
        _import_ffcv()
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.ndarray import NDArrayDecoder
        from ffcv.loader import Loader
        from ffcv.pipeline import PipelineSpec

        self.recipe = get_recipe(recipe)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.photometric = bool(photometric)
        self.drop_last = bool(drop_last)
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        sidecar = Path(str(path) + ".skipped.json")
        self.unreadable: List[Tuple[str, str]] = [tuple(item) for item in json.loads(sidecar.read_text())] if sidecar.is_file() else []
        self._report = SkipReport()

        self.num_stored = read_beton(path).num_samples
        if self.num_stored == 0:
            raise ValueError(f"beton file {str(path)!r} holds no sample")
        check_has_batches(self.num_stored, batch_size, shard_id, num_shards, self.drop_last)
        self.clock = np.array([self.seed, 0], dtype=np.int64)
        decoder_class = _view_crop_decoder_class()
        pipelines = {
            "image": [decoder_class(self.recipe.views[0], 0, self.clock)],
            "label": [IntDecoder()],
            "index": [IntDecoder()],
            "source_size": [NDArrayDecoder()],
        }
        for v, spec in enumerate(self.recipe.views[1:], start=1):
            pipelines[f"view{v}"] = PipelineSpec("image", decoder=decoder_class(spec, v, self.clock))
        self.output_names = list(pipelines)
        self._order = _traversal_order(self.seed, shard_id, num_shards, bool(shuffle), self.drop_last, batch_size)
        self._start = 0
        self.loader = Loader(
            str(path),
            batch_size=batch_size,
            num_workers=max(1, int(num_workers)),
            order=self._order,
            seed=self.seed,
            pipelines=pipelines,
            drop_last=False,  # the traversal order already keeps whole batches only when asked
            os_cache=True,
            batches_ahead=2,
        )
        self.epoch = 0

    @property
    def skipped(self) -> List[Tuple[str, str]]:
        """``(path, reason)`` of the files left out of the current (or last finished) epoch."""
        return self._report.skipped

    @property
    def num_samples(self) -> int:
        """Samples the ``.beton`` file holds (its header's count, a numpy integer there)."""
        return int(self.num_stored)

    def sample_names(self) -> None:
        """None: a ``.beton`` file stores no file names, so only :attr:`num_samples` identifies it."""
        return None

    def __len__(self) -> int:
        shard = len(epoch_order(self.num_stored, self.seed, 0, self.shard_id, self.num_shards, False, self.drop_last))
        return num_batches(shard, self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and crops the next iteration produces."""
        self.epoch = int(epoch)

    def start_at(self, batch: int) -> None:
        """Make the next pass begin at batch ``batch`` of its epoch, without decoding the ones before:
        they are the same batches a whole pass would give, since crops are keyed by epoch, image and
        view and colours by batch number. (A resumed run continues mid-epoch with this.)"""
        check_start_batch(batch, len(self))
        self._start = batch

    def __iter__(self) -> Iterator[ViewBatch]:
        from fastdense.pipelines.torch_backend import finish_views

        epoch = self.epoch
        self.epoch = epoch + 1  # now, not at the end: a pass stopped early must not repeat its epoch
        self._report.reset()
        self.clock[1] = epoch
        self.loader.next_epoch = epoch
        position = {name: k for k, name in enumerate(self.output_names)}
        sizes = [spec.size for spec in self.recipe.views]
        for path, reason in self.unreadable:
            self._report.add(path, reason)
        last = len(self) - 1
        start, self._start = self._start, 0
        self._order.start = start * self.batch_size
        try:
            iterator = iter(self.loader)  # FFCV takes the epoch's order here
        finally:
            self._order.start = 0
        for batch_number, outputs in enumerate(iterator, start):
            if batch_number == last:
                self._report.report(epoch, self.num_stored + len(self.unreadable))
            packed = [outputs[position["image"]]] + [outputs[position[f"view{v}"]] for v in range(1, len(sizes))]
            views_nchw, windows = [], []
            for size, out in zip(sizes, packed):
                pixels, window = read_windows(np.asarray(out), size)
                views_nchw.append(torch.from_numpy(pixels).to(self.device, non_blocking=True).permute(0, 3, 1, 2))
                windows.append(torch.from_numpy(window.copy()))
            views = finish_views(views_nchw, self.recipe, self.photometric, self.seed, epoch, self.shard_id, batch_number)
            x0, y0, w, h, flip = torch.stack(windows, dim=1).to(torch.float32).unbind(-1)  # each [B, V]
            size = torch.tensor(sizes, dtype=torch.float32)
            yield ViewBatch.on_device(
                views, crop_matrix(x0, y0, w, h, size, size, flip.bool()), _column(outputs[position["source_size"]], 2),
                _column(outputs[position["index"]]), _column(outputs[position["label"]]), self.device,
            )
        self._report.report(epoch, self.num_stored + len(self.unreadable))


def _column(values, width: int = 0) -> torch.Tensor:
    """An FFCV integer column as an int64 CPU tensor (``[B, width]`` when ``width``)."""
    array = np.asarray(values).astype(np.int64)  # a copy: FFCV reuses its buffers
    return torch.from_numpy(array.reshape(-1, width) if width else array.reshape(-1))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``fastdense-write-beton IMAGE_FOLDER OUT.beton`` (also ``python -m fastdense.pipelines.ffcv_backend write ...``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "write":
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="fastdense-write-beton", description="Write an image folder to an FFCV .beton file.")
    parser.add_argument("image_folder")
    parser.add_argument("output")
    parser.add_argument("--max-resolution", type=int, default=None, help="downscale the longer side to this many pixels")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--write-mode", choices=("jpg", "raw"), default="jpg")
    parser.add_argument("--num-workers", type=int, default=-1, help="writer processes (default: all cores)")
    args = parser.parse_args(argv)
    try:
        summary = write_beton(args.image_folder, args.output, args.max_resolution, args.jpeg_quality, args.num_workers, args.write_mode)
    except (FileNotFoundError, ValueError) as error:  # a user's mistake: a message, not a traceback
        parser.error(str(error))
    print(f"wrote {summary['written']} images to {args.output}; skipped {len(summary['skipped'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
