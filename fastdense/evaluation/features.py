"""Frozen-feature extraction, computed once and cached on disk."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Dict

import torch
from tqdm import tqdm

from fastdense.models import Backbone


def feature_maps(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` maps for CNNs; ViT tokens ``[B, T, C]`` laid back on their square grid."""
    out = backbone(images)
    if backbone.kind == "vit":
        side = int(math.isqrt(out.shape[1]))
        if side * side != out.shape[1]:
            raise ValueError(f"cannot lay {out.shape[1]} ViT tokens on a square grid (is there a class token?)")
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], side, side)
    return out


@torch.no_grad()
def extract(backbone: Backbone, dataset, dense: bool, batch_size: int = 64, num_workers: int = 2, device="cpu", desc: str = "features") -> Dict[str, torch.Tensor]:
    """Run ``backbone`` in eval mode over ``dataset``; returns ``{"features": [N, C]}`` (global
    average pooled) and ``"labels"``, or ``{"maps": [N, C, h, w], "masks": [N, H, W]}`` when ``dense``.
    A dataset may yield a third item, a problem text (:class:`~fastdense.evaluation.data.EvalImages`:
    a file that failed to decode); such samples are left out and named on stderr."""
    backbone.eval().to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    outputs, targets, problems = [], [], []
    for images, target, *problem in tqdm(loader, desc=desc, leave=False):
        maps = feature_maps(backbone, images.to(device)).float().cpu()
        maps = maps if dense else maps.mean(dim=(2, 3))
        target = torch.as_tensor(target)
        if problem:
            keep = torch.tensor([not text for text in problem[0]])
            problems += [text for text in problem[0] if text]
            maps, target = maps[keep], target[keep]
        outputs.append(maps)
        targets.append(target)
    if problems:
        print(f"fastdense-eval: left out {len(problems)} images that failed to decode:\n" + "\n".join(f"  {text}" for text in problems), file=sys.stderr)
    key = ("maps", "masks") if dense else ("features", "labels")
    return {key[0]: torch.cat(outputs), key[1]: torch.cat(targets)}


def cached(cache_dir: Path, identity: Dict, compute) -> Dict[str, torch.Tensor]:
    """``compute()`` once per ``identity`` (a JSON-able dict naming weights, data and settings);
    later calls load the saved tensors. Written atomically."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"features-{digest}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(result, tmp)
    os.replace(tmp, path)
    return result
