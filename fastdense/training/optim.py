"""Optimisers and schedules: LARS and AdamW, linear warm-up then cosine, lr scaled by the global batch.

Biases and normalisation parameters (every parameter with fewer than two dimensions) get no weight
decay and, under LARS, no trust-ratio adaptation, as BYOL's and VICRegL's code do; a method may
follow its reference's own rule instead (SCRL's exempts by name, :meth:`fastdense.methods.scrl.SCRL.exempt_from_decay`).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al., 2017), in the BYOL/SimCLR form.

    For each parameter ``p`` with gradient ``g`` in a group with ``lars_adapt=True``::

        g = g + weight_decay * p
        g = g * eta * ||p|| / ||g||     (when both norms are > 0)
        buf = momentum * buf + g
        p = p - lr * buf

    Groups with ``lars_adapt=False`` (biases, norm parameters) skip the first two lines.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> opt = LARS(param_groups(model, weight_decay=1e-6), lr=0.1)
        >>> model(torch.randn(3, 4)).sum().backward(); opt.step()
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_adapt=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["lars_adapt"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    param_norm = torch.linalg.vector_norm(p)
                    grad_norm = torch.linalg.vector_norm(grad)
                    trust = torch.where(
                        (param_norm > 0) & (grad_norm > 0), group["eta"] * param_norm / grad_norm, torch.ones_like(param_norm)
                    )
                    grad = grad.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(grad)
                p.add_(buf, alpha=-group["lr"])
        return loss


def is_excluded(name: str, param: torch.Tensor) -> bool:
    """Biases and normalisation weights: no weight decay, no LARS adaptation."""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Two groups: regular weights (decayed, adapted) and biases/norm parameters (neither), as
    :func:`is_excluded` tells them apart or, where ``model`` has its own rule (a method's
    ``exempt_from_decay`` returning a bool), as that rule does."""
    own_rule = getattr(model, "exempt_from_decay", None)
    decayed, excluded = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = own_rule(name, param) if own_rule is not None else None
        (excluded if (is_excluded(name, param) if exempt is None else exempt) else decayed).append(param)
    groups = []
    if decayed:
        groups.append({"params": decayed, "weight_decay": weight_decay, "lars_adapt": True, "decays": True})
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "lars_adapt": False, "decays": False})
    return groups


def clip_each_gradient(params: List[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale each parameter's gradient by ``max_norm / (|g| + 1e-6)`` where that is below 1, each on
    its own (DINO's and SelfPatch's ``clip_gradients``); returns the global norm before clipping."""
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [torch.clamp(max_norm / (norm + 1e-6), max=1.0) for norm in norms])
    return torch.linalg.vector_norm(torch.stack(norms))


def scaled_lr(lr: float, global_batch: int, lr_batch: int = 256) -> float:
    """The linear scaling rule the recipes state: ``lr * global_batch / lr_batch``."""
    return lr * global_batch / lr_batch


def build_optimizer(model: nn.Module, options: Dict, global_batch: int) -> torch.optim.Optimizer:
    name = options["name"]
    lr = scaled_lr(options["lr"], global_batch, options["lr_batch"])
    groups = param_groups(model, options["weight_decay"])
    if name == "lars":
        opt = LARS(groups, lr=lr, momentum=options["momentum"], weight_decay=options["weight_decay"], eta=options["eta"])
    elif name == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(options["betas"]), weight_decay=options["weight_decay"])
    else:
        raise ValueError(f"optimizer.name must be 'lars' or 'adamw', got {name!r}")
    for group in opt.param_groups:
        group["base_lr"] = lr
    return opt


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear warm-up ``start * (step + 1) / warmup_steps`` (so the first step already moves, and step
    ``warmup_steps - 1`` reaches ``start``; the references begin at 0: VICRegL and BYOL
    ``start * step / warmup_steps``, DINO ``linspace(0, start, warmup_steps)``), then cosine from ``start``
    at step ``warmup_steps`` to ``end`` at ``total_steps``."""
    if step < warmup_steps:
        return start * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    progress = min(1.0, step / max(1, total_steps))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Schedule:
    """Sets lr (warm-up + cosine) and weight decay (constant or cosine) on every group before a step.

    Stateless apart from its settings: the value at step ``s`` depends only on ``s``, so resuming needs
    only the step counter (saved with the settings in :meth:`state_dict`).
    """

    def __init__(self, optimizer, total_steps: int, warmup_steps: int, lr: float, min_lr: float,
                 weight_decay: float, weight_decay_end=None):
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.warmup_steps = int(min(warmup_steps, total_steps))
        self.lr, self.min_lr = lr, min_lr
        self.weight_decay = weight_decay
        self.weight_decay_end = weight_decay if weight_decay_end is None else weight_decay_end

    def lr_at(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.lr, self.min_lr)

    def weight_decay_at(self, step: int) -> float:
        return cosine(step, self.total_steps, self.weight_decay, self.weight_decay_end)

    def apply(self, step: int) -> Dict[str, float]:
        lr, wd = self.lr_at(step), self.weight_decay_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd if group.get("decays", True) else 0.0
        return {"lr": lr, "weight_decay": wd}

    def state_dict(self) -> Dict:
        return {k: getattr(self, k) for k in ("total_steps", "warmup_steps", "lr", "min_lr", "weight_decay", "weight_decay_end")}

    def load_state_dict(self, state: Dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
