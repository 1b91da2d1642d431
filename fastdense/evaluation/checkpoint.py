"""Rebuild a trained method from a ``fastdense-train`` checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import torch

from fastdense.training.checkpoint import load_checkpoint
from fastdense.training.loop import build_method


class CheckpointError(ValueError):
    """A checkpoint that cannot be evaluated: missing, unreadable, not ``fastdense-train``'s, or
    holding weights that do not fit the architecture its own config names. The message names the file."""


def load_trained_method(path, random_init: bool = False) -> Tuple[torch.nn.Module, Dict]:
    """``(method, info)``: the method built from the checkpoint's saved config, with its trained
    weights unless ``random_init`` (then the same architecture, freshly initialised). ``info`` names
    the method, the training data (``None``: the built-in dataset) and the first view's size.

    Raises :class:`CheckpointError` (naming ``path``) for a file that is missing, truncated or
    corrupt, not written by ``fastdense-train`` (a bare state dict, another library's checkpoint),
    or whose weights do not match its config's method and backbone.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = load_checkpoint(path)
    except Exception as e:  # torch raises RuntimeError, EOFError or UnpicklingError for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a torch file?): {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or "model" not in state or "method" not in state["config"]:
        found = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a fastdense-train checkpoint (expected 'config' with a 'method' and 'model' entries, found {found})")
    config = state["config"]
    try:
        method = build_method(config)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot rebuild method {config.get('method')!r} from its saved config: {e}") from e
    if not random_init:
        missing, unexpected = _mismatch(method.state_dict(), state["model"])
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: its weights do not fit {config['method']} with backbone {method.backbone.name} "
                f"(missing or mis-shaped: {missing[:4]}{'...' if len(missing) > 4 else ''}; "
                f"unexpected: {unexpected[:4]}{'...' if len(unexpected) > 4 else ''})"
            )
        method.load_state_dict(state["model"])
    info = {"method": config["method"], "data": config.get("data") or None, "image_size": method.recipe.views[0].size, "step": state.get("step")}
    return method, info


def _mismatch(expected: Dict, found: Dict):
    """Keys of ``expected`` absent from ``found`` or of another shape, and keys ``found`` has in excess."""
    missing = [k for k, v in expected.items() if k not in found or not torch.is_tensor(found[k]) or found[k].shape != v.shape]
    unexpected = [k for k in found if k not in expected]
    return missing, unexpected


def select_backbone(method: torch.nn.Module, network: str = "online"):
    """The backbone to evaluate: ``"online"`` (the trained network, what BYOL, SCRL and VICRegL
    report) or ``"target"`` (the EMA copy of a method that has one: the teacher that DINO and
    SelfPatch report). The target backbone is the module at the online backbone's place in the
    method's ``(online, target)`` EMA pairs."""
    if network == "online":
        return method.backbone
    if network != "target":
        raise ValueError(f"network must be 'online' or 'target', got {network!r}")
    pairs = method.ema_pairs() if hasattr(method, "ema_pairs") else []
    for online, target in pairs:
        for name, module in online.named_modules():
            if module is method.backbone:
                return target.get_submodule(name) if name else target
    raise ValueError(f"method {getattr(method, 'name', type(method).__name__)!r} has no EMA target network; use --network online")
