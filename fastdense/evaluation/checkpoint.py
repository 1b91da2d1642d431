"""Rebuild a trained method from a ``fastdense-train`` checkpoint."""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from fastdense.training.checkpoint import load_checkpoint
from fastdense.training.loop import build_method


def load_trained_method(path, random_init: bool = False) -> Tuple[torch.nn.Module, Dict]:
    """``(method, info)``: the method built from the checkpoint's saved config, with its trained
    weights unless ``random_init`` (then the same architecture, freshly initialised). ``info`` names
    the method, the training data (``None``: the built-in dataset) and the first view's size."""
    state = load_checkpoint(path)
    config = state["config"]
    method = build_method(config)
    if not random_init:
        method.load_state_dict(state["model"])
    info = {"method": config["method"], "data": config.get("data") or None, "image_size": method.recipe.views[0].size, "step": state.get("step")}
    return method, info
