"""What every method offers the trainer and the evaluator."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from fastdense.models import Backbone


class Method(nn.Module):
    """A self-supervised method: an online network, optionally a target, and a loss.

    Subclasses set ``name`` and ``recipe`` (a pipeline recipe name) and implement
    :meth:`forward`, which takes a :class:`fastdense.pipelines.ViewBatch` and returns a dict with a
    scalar ``loss`` and any float metrics to log. ``backbone`` is the online trunk that evaluation and
    export use. Methods with an EMA target update it in :meth:`update_target`.
    """

    name: str = ""
    recipe: str = ""
    backbone: Backbone
    # The smallest batch per process that a training step works on; the trainer refuses a smaller
    # batch_size at set-up rather than crashing at the first step.
    min_batch_size: int = 1

    @property
    def synchronises_batchnorm(self) -> bool:
        """Whether the method's recipe takes BatchNorm statistics over every process's images
        (``sync_batchnorm: auto`` follows it when more than one process trains)."""
        return True

    def exempt_from_decay(self, name: str, param: nn.Parameter) -> Optional[bool]:
        """Whether ``param`` (named as ``named_parameters()`` names it) gets no weight decay and no
        LARS trust ratio; None: the trainer's rule (biases and every parameter of fewer than two
        dimensions, what BYOL's and VICRegL's code exempt)."""
        return None

    @classmethod
    def default_options(cls) -> Dict:
        """Every option with its default, as the YAML config shows them."""
        return {}

    @classmethod
    def recipe_name(cls, options: Dict) -> str:
        """The pipeline recipe (a ``RECIPES`` name) the method trains with under ``options``."""
        return cls.name

    def forward(self, batch) -> Dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, batch, step: int) -> None:
        """Host-side work for ``batch`` ahead of training step ``step``, left in ``batch.extras`` for
        :meth:`forward`. The trainer calls it as it fetches the batch, while the device still runs
        the step before, so the work overlaps it. Nothing by default."""

    def frozen_parameters(self, epoch: int) -> List[nn.Parameter]:
        """Parameters the trainer leaves unchanged in ``epoch`` (0-based): their gradients are dropped
        before the optimiser step."""
        return []

    @torch.no_grad()
    def update_target(self, step: int, total_steps: int) -> None:
        """Move the target towards the online network after optimisation step ``step`` (of ``total_steps``)."""
