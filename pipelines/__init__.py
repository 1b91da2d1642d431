"""Data pipelines that emit augmented views with one 3x3 transform matrix per view
(installed as ``fastdense.pipelines``). Pipelines know nothing of methods.

One entry point, :func:`make_loader`, builds every backend (``CONVENTIONS.md`` section 2)::

    loader = fastdense.pipelines.make_loader(backend="torch", recipe="scrl", batch_size=64)
    for batch in loader:   # ViewBatch: views, matrices [B, V, 3, 3], source_size, index, label
        ...
"""

from __future__ import annotations

import importlib
from typing import Optional, Union

import torch

from fastdense.pipelines.batch import ViewBatch
from fastdense.pipelines.recipes import RECIPES, Recipe, ViewSpec, get_recipe

__all__ = ["ViewBatch", "Recipe", "ViewSpec", "RECIPES", "get_recipe", "make_loader", "write_beton", "BACKENDS"]

# backend name -> (module, class, the pip extra that provides its third-party package)
BACKENDS = {
    "torch": ("fastdense.pipelines.torch_backend", "TorchLoader", None),
    "dali": ("fastdense.pipelines.dali_backend", "DaliLoader", "dali"),
    "ffcv": ("fastdense.pipelines.ffcv_backend", "FfcvLoader", "ffcv"),
}


def make_loader(
    backend: str = "torch",
    data=None,
    recipe: Union[str, Recipe] = "scrl",
    batch_size: int = 256,
    seed: int = 0,
    shard_id: int = 0,
    num_shards: int = 1,
    num_workers: int = 8,
    device: Optional[Union[str, torch.device]] = None,
    photometric: bool = True,
    shuffle: bool = True,
    drop_last: bool = True,
    **backend_options,
):
    """A loader of :class:`ViewBatch` objects from ``backend`` (``"torch"``, ``"dali"`` or ``"ffcv"``).

    Args:
        data: an image folder (``root/<class>/<image>``; dali, torch; ffcv converts it) or a
            ``.beton`` file (ffcv). ``None`` uses the built-in dataset
            (:func:`fastdense.pipelines.builtin.ensure_builtin_dataset`, generated on first use).
        recipe: a recipe name from :data:`RECIPES` or a :class:`Recipe`.
        seed: with the epoch, decides the order, the crops and the colours.
        shard_id, num_shards: this process's share of each epoch; shards are disjoint and, with
            ``drop_last=False``, together complete (see :mod:`fastdense.pipelines.base`).
        device: where the views go; ``None`` means CUDA when present, else the CPU.
        photometric: ``False`` gives geometry only (crop, resize, flip), no colour change.
        shuffle: a new order every epoch (``False``: dataset order).
        drop_last: only full batches; every shard gets the same number of batches.
        backend_options: passed on to the backend's loader class.

    Every backend class takes these keyword arguments (``data`` already resolved, ``recipe`` a
    :class:`Recipe`, ``device`` a ``torch.device``) and provides ``len()``, ``set_epoch(epoch)``,
    ``skipped`` (the ``(path, reason)`` of files it could not read in the current epoch),
    ``num_samples`` (the samples an epoch draws from) and ``sample_names()`` (their names in dataset
    order, relative to the data folder; None where the data stores none), by which a resumed run
    checks that it reads the same data.

    >>> loader = make_loader("torch", recipe="plain", batch_size=8, num_workers=0)  # doctest: +SKIP
    >>> batch = next(iter(loader)); batch.matrices.shape                             # doctest: +SKIP
    torch.Size([8, 1, 3, 3])
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    recipe = get_recipe(recipe)
    if data is None:
        from fastdense.pipelines.builtin import ensure_builtin_dataset

        data = ensure_builtin_dataset()
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader_class = _backend_class(backend)
    return loader_class(data=data, recipe=recipe, batch_size=batch_size, seed=seed, shard_id=shard_id, num_shards=num_shards,
                        num_workers=num_workers, device=device, photometric=photometric, shuffle=shuffle, drop_last=drop_last,
                        **backend_options)


def _backend_class(backend: str):
    module_name, class_name, extra = BACKENDS[backend]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        hint = f" (install it with `pip install 'fastdense[{extra}]'`)" if extra else ""
        raise ImportError(f"the {backend!r} pipeline backend needs a package that is missing: {error}{hint}") from error
    return getattr(module, class_name)


def __getattr__(name):
    # write_beton lives with the ffcv backend, which imports ffcv; load it only when asked for.
    if name == "write_beton":
        try:
            from fastdense.pipelines.ffcv_backend import write_beton
        except ImportError as error:
            raise ImportError(f"write_beton needs the ffcv backend: {error} (install it with `pip install 'fastdense[ffcv]'`)") from error
        return write_beton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
