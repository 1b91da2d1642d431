"""The batch every pipeline backend yields (``CONVENTIONS.md`` section 2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch


def to_device_async(tensor: torch.Tensor, device) -> torch.Tensor:
    """``tensor`` on ``device``; a CPU tensor goes to a GPU through pinned memory without the host
    waiting: a plain (or pageable) copy waits for every kernel queued before it, a training step's
    included, which the loader would then count as its own time."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu" and tensor.numel():
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=True)
    return tensor.to(device)


@dataclass
class ViewBatch:
    """Augmented views of ``B`` images and where each view came from.

    Attributes:
        views: ``V`` tensors ``[B, 3, H_v, W_v]``, normalised; sizes may differ between views.
        matrices: ``[B, V, 3, 3]`` float32; ``matrices[b, v]`` maps view pixel coordinates of view
            ``v`` to source pixel coordinates of image ``b`` (see :mod:`fastdense.geometry`).
        source_size: ``[B, 2]`` integer ``(H, W)`` of each decoded source image.
        index: ``[B]`` int64 dataset index of each sample.
        label: ``[B]`` int64 class labels, or ``None`` when the dataset has none.
    """

    views: List[torch.Tensor]
    matrices: torch.Tensor
    source_size: torch.Tensor
    index: torch.Tensor
    label: Optional[torch.Tensor] = None
    extras: dict = field(default_factory=dict)
    # CPU copies of the small tensors, kept by loaders that made them there (:meth:`on_device`), so
    # host-side work reads them without waiting for the device (:meth:`on_host`).
    host: Optional[dict] = field(default=None, repr=False, compare=False)

    @classmethod
    def on_device(cls, views: List[torch.Tensor], matrices: torch.Tensor, source_size: torch.Tensor, index: torch.Tensor,
                  label: Optional[torch.Tensor], device) -> "ViewBatch":
        """A batch whose ``views`` are given on the training device and whose other tensors, made on
        the CPU, go to ``device`` without the host waiting (:func:`to_device_async`), their CPU
        copies kept for :meth:`on_host`."""
        host = {"matrices": matrices, "source_size": source_size, "index": index, "label": label}
        moved = {name: None if t is None else to_device_async(t, device) for name, t in host.items()}
        return cls(views=views, host=host, **moved)

    def __post_init__(self):
        if not self.views:
            raise ValueError("ViewBatch.views must hold at least one view")
        batch = self.views[0].shape[0]
        for v, view in enumerate(self.views):
            if view.dim() != 4 or view.shape[0] != batch or view.shape[1] != 3:
                raise ValueError(f"ViewBatch.views[{v}] must have shape [{batch}, 3, H, W], got {tuple(view.shape)}")
        expected = (batch, len(self.views), 3, 3)
        if tuple(self.matrices.shape) != expected:
            raise ValueError(f"ViewBatch.matrices must have shape {list(expected)}, got {list(self.matrices.shape)}")
        if tuple(self.source_size.shape) != (batch, 2):
            raise ValueError(f"ViewBatch.source_size must have shape [{batch}, 2], got {list(self.source_size.shape)}")
        if tuple(self.index.shape) != (batch,):
            raise ValueError(f"ViewBatch.index must have shape [{batch}], got {list(self.index.shape)}")
        if self.label is not None and tuple(self.label.shape) != (batch,):
            raise ValueError(f"ViewBatch.label must have shape [{batch}], got {list(self.label.shape)}")

    def on_host(self, name: str) -> Optional[torch.Tensor]:
        """Field ``name`` (``matrices``, ``source_size``, ``index`` or ``label``) on the CPU: the
        loader's own copy when it kept one, which costs no device synchronisation, else a copy."""
        if self.host is not None and name in self.host:
            return self.host[name]
        value = getattr(self, name)
        return None if value is None else value.cpu()

    @property
    def batch_size(self) -> int:
        return self.views[0].shape[0]

    @property
    def num_views(self) -> int:
        return len(self.views)

    def to(self, device, non_blocking: bool = False) -> "ViewBatch":
        """The same batch with every tensor on ``device``."""

        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return ViewBatch(
            views=[move(v) for v in self.views],
            matrices=move(self.matrices),
            source_size=move(self.source_size),
            index=move(self.index),
            label=move(self.label),
            extras={k: move(v) if torch.is_tensor(v) else v for k, v in self.extras.items()},
            host=self.host,
        )
