"""Checkpoints that are never half-written, RNG state capture, and a run-directory check up front.

A checkpoint is written to a temporary file in the same directory, flushed and fsync'ed, then
renamed over the old one (``os.replace`` is atomic on POSIX), and the directory entry is fsync'ed:
a crash or SIGKILL at any moment leaves either the previous checkpoint or the new one, whole.
"""

from __future__ import annotations

import io
import os
import random
import secrets
import shutil
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch


class RunDirError(RuntimeError):
    """The run directory cannot hold this run (unwritable, or not enough free space)."""


def atomic_write_bytes(data: bytes, path) -> None:
    path = Path(path)
    # Not tempfile.mkstemp: its files are 0600, and the rename would keep that, so a checkpoint or
    # config.yaml could not be read by the group's other users (an eval job, a colleague). Created
    # like open() creates files, the umask decides, as it does for every other file of the run.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems refuse directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: Dict, path) -> None:
    """``torch.save(state)`` to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable (cut short, corrupt) or not a fastdense-train checkpoint."""


# What every checkpoint that :class:`fastdense.training.Trainer` writes holds.
CHECKPOINT_KEYS = ("step", "position", "model", "optimizer", "schedule", "rng_per_rank", "config")


def load_checkpoint(path, map_location="cpu") -> Dict:
    """The state saved by :func:`save_checkpoint` at ``path``; :class:`CheckpointError` naming the
    file when it is missing or cannot be read whole."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        # weights_only: a checkpoint from elsewhere cannot run code while it loads.
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load raises many types on a cut-short or foreign file
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {e}); it is cut short, corrupt, "
            "not a torch.save file, or holds Python objects besides tensors and plain data (not loaded: "
            "unpickling them could run code)"
        ) from e


def load_training_checkpoint(path, map_location="cpu") -> Dict:
    """:func:`load_checkpoint`, and a :class:`CheckpointError` unless it holds a training state."""
    state = load_checkpoint(path, map_location)
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a fastdense-train checkpoint: it lacks {missing}")
    return state


def rng_state(include_cuda: bool = True) -> Dict:
    # numpy's state as tensors and plain numbers: a checkpoint then holds nothing that
    # torch.load(weights_only=True) refuses, so loading one never runs pickled code.
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if include_cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """A seed for ``rank``'s own random stream, distinct for every (seed, rank) pair.

    >>> rank_seed(0, 1) != rank_seed(0, 2) != rank_seed(1, 1)
    True
    """
    words = np.random.SeedSequence([seed % 2**63, rank, 0x5EED]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def check_run_dir(run_dir, needed_bytes: int, min_free_bytes: Optional[int] = None) -> None:
    """Create ``run_dir`` and prove it takes a synced write; refuse when free space is short.

    ``needed_bytes`` is what the run will keep on disk (checkpoint plus its temporary copy); the
    check demands ``min_free_bytes`` when given, else ``needed_bytes``.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        # mkdir would say "File exists", which reads as a permissions problem.
        raise RunDirError(f"run directory {str(run_dir)!r} is a file, not a directory; choose another --run-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(b"fastdense write probe\n", run_dir / ".write-probe")
        (run_dir / ".write-probe").unlink()
    except OSError as e:
        raise RunDirError(f"run directory {str(run_dir)!r} is not writable: {e.strerror or e}") from e
    need = needed_bytes if min_free_bytes is None else int(min_free_bytes)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise RunDirError(
            f"run directory {str(run_dir)!r} has {free / 2**30:.2f} GiB free; this run needs at least "
            f"{need / 2**30:.2f} GiB for its checkpoints (set min_free_gb to change the limit)"
        )


def state_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if torch.is_tensor(t))
