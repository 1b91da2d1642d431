"""Scan an image folder laid out as ``root/<class>/<...>/<image>``, the layout torchvision's
``ImageFolder`` reads.

Semantics, shared by every backend that reads a folder:

- Classes are the sub-directories directly under ``root``, sorted by name; files directly under
  ``root`` are not samples.
- Every file whose extension is an image extension (case-insensitive), at any depth below a class
  directory, is a sample of that class (torchvision walks nested folders the same way). Hidden
  files and directories (names starting with ``.``) are skipped.
- Class directories holding no image file are ignored: they get no label. (torchvision keeps them
  and raises; here they are dropped so a stray empty folder never stops training. Labels are
  therefore the indices of the non-empty classes in sorted order.)
- Whether a file decodes is not checked here: unreadable files are skipped, and reported, by the
  loaders while they run.
- A missing root, a root that is not a directory, or a root with no image in any class directory
  raises before any work starts, with the path in the message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple, Union

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageFolderIndex:
    """The samples of an image folder: ``samples[i] = (path, label)`` and ``classes[label]``."""

    root: Path
    samples: List[Tuple[Path, int]]
    classes: List[str]

    def __len__(self) -> int:
        return len(self.samples)


def scan_image_folder(root: Union[str, os.PathLike]) -> ImageFolderIndex:
    """Index the images under ``root`` (``root/<class>/**/<image>``), in a deterministic order.

    Raises ``FileNotFoundError`` when ``root`` does not exist and ``ValueError`` when it is not a
    directory or holds no image inside a class directory; both messages name the path.

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "cat").mkdir(); (root / "cat" / "a.jpg").write_bytes(b"")
    0
    >>> scan_image_folder(root).classes
    ['cat']
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"data folder {str(root)!r} is not a directory (expected root/<class>/<image> files)")
    class_dirs = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    per_class = [(name, _images_below(root / name)) for name in class_dirs]
    per_class = [(name, files) for name, files in per_class if files]
    if not per_class:
        loose = [p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS][:3]
        hint = f"; images directly under it ({', '.join(loose)}...) need a class folder" if loose else ""
        raise ValueError(
            f"data folder {str(root)!r} holds no image in any class folder "
            f"(expected root/<class>/<image> with extensions {', '.join(IMAGE_EXTENSIONS)}){hint}"
        )
    classes = [name for name, _ in per_class]
    samples = [(path, label) for label, (_, files) in enumerate(per_class) for path in files]
    return ImageFolderIndex(root=root, samples=samples, classes=classes)


def _images_below(directory: Path) -> List[Path]:
    found = []
    for current, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(current) / name)
    return found
