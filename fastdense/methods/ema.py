"""Exponential-moving-average targets (BYOL, SCRL, LEWEL, DINO/SelfPatch) and their pieces."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastdense.methods.base import Method


def cosine_momentum(base_momentum: float, step: int, total_steps: int) -> float:
    """BYOL's schedule ``m = 1 - (1 - m0) (cos(pi s / S) + 1) / 2``: ``m0`` at step 0, 1 at step ``S``.

    >>> cosine_momentum(0.99, 0, 100), cosine_momentum(0.99, 100, 100)
    (0.99, 1.0)
    """
    if not 0.0 <= base_momentum <= 1.0:
        raise ValueError(f"base_momentum must be in [0, 1], got {base_momentum}")
    if total_steps < 1 or not 0 <= step <= total_steps:
        raise ValueError(f"need 0 <= step <= total_steps and total_steps >= 1, got step={step}, total_steps={total_steps}")
    return 1.0 - (1.0 - base_momentum) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float, buffers: bool = False) -> None:
    """``target <- momentum * target + (1 - momentum) * online`` for every parameter.

    With ``buffers=True`` (EMAN, Cai et al. 2021, as LEWEL uses it) floating-point buffers such as
    batch-norm running statistics are averaged too, and integer buffers (batch counters) copied.
    """
    target_params = list(target.parameters())
    online_params = list(online.parameters())
    if len(target_params) != len(online_params):
        raise ValueError("target and online networks must have the same parameters")
    torch._foreach_lerp_(target_params, online_params, 1.0 - momentum)
    if buffers:
        for target_buffer, online_buffer in zip(target.buffers(), online.buffers()):
            if target_buffer.is_floating_point():
                target_buffer.lerp_(online_buffer, 1.0 - momentum)
            else:
                target_buffer.copy_(online_buffer)


def make_target(online: nn.Module, fresh: nn.Module = None) -> nn.Module:
    """A gradient-free target: ``fresh`` (an independently initialised twin, SCRL's reference) or,
    when ``fresh`` is None, a copy of ``online``."""
    target = copy.deepcopy(online) if fresh is None else fresh
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss per row: ``2 - 2 cos(prediction, target)``, shape ``[N]``; no gradient
    reaches ``target`` (BYOL's stop-gradient).

    >>> byol_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]]))
    tensor([2.])
    """
    return 2 - 2 * F.cosine_similarity(prediction, target.detach(), dim=-1)


class EmaTargetMethod(Method):
    """A method with gradient-free target modules that follow online ones by EMA.

    Subclasses list ``(online, target)`` module pairs in :meth:`ema_pairs` and set
    ``self.base_momentum`` and ``self.eman``. With ``eman`` the targets stay in eval mode (their
    batch norms use the averaged running statistics) and buffers are averaged too.
    """

    base_momentum: float = 0.996
    eman: bool = False

    def ema_pairs(self):  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def update_target(self, step: int, total_steps: int) -> None:
        self.momentum = cosine_momentum(self.base_momentum, step, total_steps)
        for online, target in self.ema_pairs():
            ema_update(target, online, self.momentum, buffers=self.eman)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.eman:
            for _, target in self.ema_pairs():
                target.eval()
        return self
