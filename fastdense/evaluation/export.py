"""Export a trained backbone as the plain state dict of its torchvision or timm model.

ResNets load with ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` (only the
classifier ``fc`` is missing); timm models with ``timm.create_model(name, num_classes=0).load_state_dict(sd)``.
Detection and segmentation frameworks take the file as-is: mmdetection through
``init_cfg=dict(type="Pretrained", checkpoint=PATH)`` on a torchvision-style ResNet, detectron2 after
its ``tools/convert-torchvision-to-d2.py`` (which renames torchvision keys to detectron2's).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastdense.models import Backbone


def backbone_state_dict(backbone: Backbone) -> dict:
    """The trunk's weights with the key names of the torchvision/timm model it came from."""
    return {k: v.detach().cpu().clone() for k, v in backbone.trunk.state_dict().items()}


def export_backbone(backbone: Backbone, path) -> Path:
    """Save the plain state dict to ``path`` atomically; the architecture and the library it loads
    into go to a sidecar ``.json``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(backbone_state_dict(backbone), tmp)
    os.replace(tmp, path)
    source = "torchvision" if backbone.kind == "resnet" else "timm"
    path.with_suffix(".json").write_text(json.dumps({"arch": backbone.name, "source": source}) + "\n")
    return path
