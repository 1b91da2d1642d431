"""Scan an image folder laid out as ``root/<class>/<...>/<image>``, the layout torchvision's
``ImageFolder`` reads.

Semantics, shared by every backend that reads a folder:

- Classes are the sub-directories directly under ``root``, sorted by name; files directly under
  ``root`` are not samples.
- Every file whose extension is an image extension (case-insensitive), at any depth below a class
  directory, is a sample of that class (torchvision walks nested folders the same way). Hidden
  files and directories (names starting with ``.``) are skipped.
- Symlinked directories are followed, but every directory is read once: a link to a folder
  already read (a loop back to a parent, or to itself) is skipped with a warning.
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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Set, Tuple, Union

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
    # Each directory is read once (see _images_below); the root and the class folders are reserved
    # up front, so a link from one class to the root or to another class is not read under it.
    visited = {_identity(root), *(_identity(root / name) for name in class_dirs)}
    per_class = [(name, _images_below(root / name, visited)) for name in class_dirs]
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


def _identity(directory: Path) -> Tuple[int, int]:
    info = os.stat(directory)
    return info.st_dev, info.st_ino


def _images_below(directory: Path, visited: Set[Tuple[int, int]]) -> List[Path]:
    """The images below ``directory``; ``visited`` holds the ``(st_dev, st_ino)`` of the directories
    already read, and gains those read here."""
    found = []
    for current, dirs, files in os.walk(directory, followlinks=True):
        # Symlinked folders are followed (a class folder may link elsewhere), each directory once:
        # a link back to a folder already read would count its images again, or loop for ever.
        if current != str(directory):
            identity = _identity(Path(current))
            if identity in visited:
                warnings.warn(f"data folder: skipping {current!r}, a link to a folder already read (a symlink loop?)", stacklevel=3)
                dirs[:] = []
                continue
            visited.add(identity)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(current) / name)
    return found
