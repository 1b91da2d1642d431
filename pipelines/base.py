"""What every loader shares: the epoch's sample order per shard, and the skipped-file report.

Order: one permutation of the whole dataset per ``(seed, epoch)``, the same on every shard; shard
``k`` of ``n`` takes positions ``k, k + n, k + 2n, ...``. With ``drop_last=False`` the shards are
disjoint and together hold every sample once (their sizes differ by at most one); with
``drop_last=True`` every shard keeps ``len // n`` samples, so all ranks run the same number of full
batches (distributed training needs that), and at most ``n - 1`` samples sit out the epoch.
"""

from __future__ import annotations

import logging
import numbers
from typing import List, Tuple

import numpy as np

LOG = logging.getLogger("fastdense.pipelines")


def epoch_order(num_samples: int, seed: int, epoch: int, shard_id: int = 0, num_shards: int = 1, shuffle: bool = True, drop_last: bool = False) -> np.ndarray:
    """Dataset indices (int64) that shard ``shard_id`` visits in ``epoch``, in order.

    >>> [epoch_order(10, 0, 0, k, 3, shuffle=False).tolist() for k in range(3)]
    [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    """
    check_sharding(shard_id, num_shards)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    else:
        order = np.arange(num_samples)
    if drop_last:
        order = order[: (num_samples // num_shards) * num_shards]
    return order[shard_id::num_shards].astype(np.int64)


def check_loader_args(batch_size: int, shard_id: int, num_shards: int, seed: int = 0) -> None:
    """The arguments every backend's loader shares, checked before any work starts."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(seed, numbers.Integral) or seed < 0:  # numpy's and DALI's seeds are unsigned
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    check_sharding(shard_id, num_shards)


def check_sharding(shard_id: int, num_shards: int) -> None:
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
    if not isinstance(shard_id, int) or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be an int in [0, num_shards={num_shards}), got {shard_id!r}")


def check_start_batch(batch: int, batches: int) -> None:
    """``start_at``'s argument: a batch number from 0 to ``batches`` (the epoch's end)."""
    if not isinstance(batch, int) or not 0 <= batch <= batches:
        raise ValueError(f"batch must be an int in [0, {batches}], got {batch!r}")


def num_batches(num_samples: int, batch_size: int, drop_last: bool) -> int:
    return num_samples // batch_size if drop_last else -(-num_samples // batch_size)


class NoBatchError(ValueError):
    """An epoch of one shard would hold no batch. The message advises :func:`make_loader`'s caller;
    the attributes let a front end that sets those arguments itself (fastdense-train) advise its own
    options: ``where`` (what the shard gets, in words), ``num_samples``, ``shard_samples`` (the
    largest batch_size that gives the shard a batch; 0: the shard gets no sample), ``batch_size``,
    ``num_shards`` and ``drop_last``."""

    def __init__(self, where: str, num_samples: int, shard_samples: int, batch_size: int, num_shards: int, drop_last: bool):
        self.where, self.num_samples, self.shard_samples = where, num_samples, shard_samples
        self.batch_size, self.num_shards, self.drop_last = batch_size, num_shards, drop_last
        hint = "; pass drop_last=False or a smaller batch_size" if drop_last and shard_samples else ""
        super().__init__(f"an epoch would hold no batch: {where} and batch_size is {batch_size} (drop_last={drop_last}){hint}")


def check_has_batches(num_samples: int, batch_size: int, shard_id: int, num_shards: int, drop_last: bool) -> None:
    """Raise :class:`NoBatchError` before any work when an epoch of this shard (``num_samples``
    readable samples in all) would hold no batch: a training loop would otherwise run zero steps
    without a word."""
    shard = len(epoch_order(num_samples, 0, 0, shard_id, num_shards, shuffle=False, drop_last=drop_last))
    if num_batches(shard, batch_size, drop_last) > 0:
        return
    where = f"shard {shard_id} of {num_shards} gets {shard} of the {num_samples} samples" if num_shards > 1 else f"the data holds {num_samples} samples"
    raise NoBatchError(where, num_samples, shard, batch_size, num_shards, drop_last)


def sample_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (seed, epoch, index, ...), stable across processes."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class SkipReport:
    """Unreadable files met during one epoch: ``skipped`` is a list of ``(path, reason)``.

    Loaders call :meth:`reset` when an epoch starts, :meth:`add` per failure, and :meth:`report`
    when it ends; the report is a warning on the ``fastdense.pipelines`` logger naming every path,
    made once per epoch. Loaders report before they hand out an epoch's last batch: a training loop
    that takes ``len(loader)`` batches never asks for the end of the iteration.
    """

    def __init__(self):
        self.skipped: List[Tuple[str, str]] = []
        self.reported = False

    def reset(self) -> None:
        self.skipped = []
        self.reported = False

    def add(self, path, reason: str) -> None:
        self.skipped.append((str(path), str(reason)))

    def report(self, epoch: int, total: int) -> None:
        if self.reported:
            return
        self.reported = True
        if not self.skipped:
            return
        lines = "\n".join(f"  {path}: {reason}" for path, reason in self.skipped)
        LOG.warning("epoch %d: skipped %d of %d files that could not be read:\n%s", epoch, len(self.skipped), total, lines)
