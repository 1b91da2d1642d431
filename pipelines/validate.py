"""Find the files of an image folder that cannot be decoded, once, before a pipeline starts.

DALI stops its whole pipeline on the first file it cannot decode, so the DALI backend has to know
the unreadable files before it builds the reader. :func:`find_unreadable` checks every file and
returns ``(path, reason)`` for those that fail:

- the file must open as an image (PIL identifies its format from its header, not its name) and pass
  ``Image.verify()`` (for PNG this checks every chunk's CRC, so a truncated PNG fails);
- a JPEG must end with its end-of-image marker ``FF D9``, or else decode in full (data appended
  after the marker is harmless): PIL's ``verify`` does not read the entropy-coded data, and a JPEG
  cut short is the usual corruption a copy leaves behind;
- any other format (BMP, TIFF, WebP, PNM), whose ``verify`` checks little, must decode in full.

A full decode would also find files damaged in the middle, at the cost of decoding the whole
dataset once more (minutes for ImageNet); these two checks cost one header parse and one 64-byte
read per file (and a decode for the rare JPEG with a trailer). Results are cached per folder (keyed by each file's size and modification time) in
``$FASTDENSE_CACHE`` (default ``~/.cache/fastdense``), so later runs only check new or changed files.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Collection, Dict, List, Optional, Sequence, Tuple

from PIL import Image

JPEG_END_OF_IMAGE = b"\xff\xd9"
# 2: JPEGs with data after the end marker are readable; 3: other formats decoded in full;
# 4: a backend can refuse files by their header (``refuse``: DALI and the 32-bit integer TIFF)
CACHE_VERSION = 4

# Why a backend's decoder cannot read an image PIL has opened (its header parsed), or None.
RefuseCheck = Callable[[Image.Image], Optional[str]]


def cache_dir() -> Path:
    """Where fastdense keeps derived files (``$FASTDENSE_CACHE``, default ``~/.cache/fastdense``)."""
    return Path(os.environ.get("FASTDENSE_CACHE", Path.home() / ".cache" / "fastdense")).expanduser()


def check_image_file(path: Path, formats: Optional[Collection[str]] = None, refuse: Optional[RefuseCheck] = None) -> Optional[str]:
    """Why ``path`` cannot be decoded, or ``None`` when it can (see the module docstring); with
    ``formats`` (PIL format names), a file in any other format cannot be decoded either, nor, with
    ``refuse``, one for which it gives a reason."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as image:
            image_format = image.format
            refused = refuse(image) if refuse is not None and (formats is None or image_format in formats) else None
            image.verify()
    except Exception as error:  # PIL raises many types (SyntaxError, OSError, struct.error...) for bad files
        return f"not a decodable image: {type(error).__name__}: {error}"
    if formats is not None and image_format not in formats:
        return f"{image_format} image (read by its content, whatever its name): a format this backend cannot decode"
    if refused is not None:
        return refused
    if image_format in ("JPEG", "MPO"):  # MPO: a JPEG with more pictures after the first (phones)
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - 64))
            tail = handle.read().rstrip(b"\x00")
        if not tail.endswith(JPEG_END_OF_IMAGE):
            # Cameras and editors may append data after the end marker (Samsung's trailer, for one),
            # which every decoder ignores: only a file that also fails to decode is cut short.
            error = _decode_error(path)
            return None if error is None else f"truncated JPEG (no end-of-image marker; {error})"
    elif image_format != "PNG":
        # verify() checks little or nothing of the other formats (a BMP or TIFF cut in half passes);
        # they are rare in training sets, so they are decoded in full.
        error = _decode_error(path)
        return None if error is None else f"not a decodable image: {error}"
    return None


def _decode_error(path: Path) -> Optional[str]:
    """Why decoding ``path`` in full fails, or ``None``."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # PIL raises many types for damaged data
        return f"{type(error).__name__}: {error}"
    return None


def file_stamp(path: Path) -> List[int]:
    """``[size, mtime_ns]``: what tells a file rewritten in place (same path) from the one a cache saw."""
    info = os.stat(path)
    return [info.st_size, info.st_mtime_ns]


def find_unreadable(paths: Sequence[Path], root: Path, num_workers: int = 8, use_cache: bool = True,
                    formats: Optional[Collection[str]] = None, refuse: Optional[RefuseCheck] = None) -> List[Tuple[Path, str]]:
    """``(path, reason)`` for every file in ``paths`` that :func:`check_image_file` rejects, in input order."""
    key = str(Path(root).resolve()) + ("" if formats is None else "|" + ",".join(sorted(formats)))
    if refuse is not None:  # each backend's verdicts are cached apart
        key += f"|{refuse.__module__}.{refuse.__qualname__}"
    cache_file = cache_dir() / "validated" / (hashlib.sha1(key.encode()).hexdigest() + ".json")
    cached: Dict[str, list] = {}
    if use_cache and cache_file.is_file():
        try:
            stored = json.loads(cache_file.read_text())
            if stored.get("version") == CACHE_VERSION:
                cached = stored["files"]
        except (OSError, ValueError, KeyError):
            cached = {}  # a damaged cache is rebuilt, never trusted

    results: Dict[str, list] = {}
    todo = []
    for path in paths:
        key = str(path)
        entry = cached.get(key)
        current = file_stamp(path)
        if entry is not None and entry[:2] == current:
            results[key] = entry
        else:
            todo.append((path, current))
    if todo:
        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            reasons = list(pool.map(lambda item: check_image_file(item[0], formats, refuse), todo))
        for (path, current), reason in zip(todo, reasons):
            results[str(path)] = current + [reason]
        if use_cache:
            try:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"version": CACHE_VERSION, "files": {**cached, **results}}))
                tmp.replace(cache_file)
            except OSError:
                pass  # a read-only home only costs a re-check next time
    return [(Path(p), results[str(p)][2]) for p in paths if results[str(p)][2] is not None]
