"""Export a trained backbone as the plain state dict of its torchvision or timm model.

ResNets load with ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` (only the
classifier ``fc`` is missing). timm models load strictly into
``timm.create_model(arch, num_classes=0, **create_kwargs)``, where the sidecar ``.json`` lists the
``create_kwargs`` that shape the weights (SelfPatch's ViT, for instance, has no class token and no
final norm: ``class_token=False, global_pool="", final_norm=False``); :func:`load_exported` does
this. Its ViT also resizes the position embedding for other input sizes as SelfPatch's reference
does (sidecar ``"pos_embed_resize": "reference"``, which :func:`load_exported` applies again); a bare
timm model gives the same tokens at the trained grid (224 px) and resizes its own way elsewhere. Detection and segmentation frameworks take the file as-is: mmdetection through
``init_cfg=dict(type="Pretrained", checkpoint=PATH)`` on a torchvision-style ResNet, detectron2 after
its ``tools/convert-torchvision-to-d2.py`` (which renames torchvision keys to detectron2's).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict

import torch
from torch import nn

from fastdense.models import Backbone
from fastdense.models.backbones import use_reference_pos_embed, uses_reference_pos_embed


def backbone_state_dict(backbone: Backbone) -> dict:
    """The trunk's weights with the key names of the torchvision/timm model it came from."""
    return {k: v.detach().cpu().clone() for k, v in backbone.trunk.state_dict().items()}


def timm_create_kwargs(backbone: Backbone) -> Dict:
    """The ``timm.create_model`` arguments beyond ``num_classes=0`` under which a plain timm model
    has exactly the trunk's parameters: architecture choices that a method made (no class token,
    no final norm, another depth or input size) read back from the built trunk."""
    trunk = backbone.trunk
    if backbone.kind != "vit":
        return {}
    kwargs = {
        "img_size": list(trunk.patch_embed.img_size),
        "depth": len(trunk.blocks),
        "class_token": trunk.cls_token is not None,
        "global_pool": trunk.global_pool,
        "reg_tokens": trunk.num_reg_tokens,
        "no_embed_class": trunk.no_embed_class,
        "dynamic_img_size": trunk.dynamic_img_size,
    }
    if isinstance(trunk.norm, nn.Identity):
        kwargs["final_norm"] = False
    return kwargs


def export_backbone(backbone: Backbone, path) -> Path:
    """Save the plain state dict to ``path`` atomically; the architecture, the library it loads
    into and the ``create_kwargs`` it needs there go to a sidecar ``.json``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(backbone_state_dict(backbone), tmp)
    os.replace(tmp, path)
    source = "torchvision" if backbone.kind == "resnet" else "timm"
    sidecar = {"arch": backbone.name, "source": source, "create_kwargs": timm_create_kwargs(backbone)}
    if backbone.kind == "vit" and uses_reference_pos_embed(backbone.trunk):
        sidecar["pos_embed_resize"] = "reference"
    path.with_suffix(".json").write_text(json.dumps(sidecar) + "\n")
    return path


def load_exported(path) -> nn.Module:
    """The plain torchvision (``fc`` replaced by ``Identity``) or timm (``num_classes=0``) model
    with the exported weights, loaded strictly. Its ``forward_features`` (timm) or its layers up to
    ``layer4`` (torchvision) give what fastdense's backbone gave."""
    path = Path(path)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    state = torch.load(path, map_location="cpu", weights_only=True)
    if sidecar["source"] == "torchvision":
        import torchvision

        model = getattr(torchvision.models, sidecar["arch"])(weights=None)
        model.fc = nn.Identity()
    else:
        import timm

        model = timm.create_model(sidecar["arch"], pretrained=False, num_classes=0, **sidecar.get("create_kwargs", {}))
        if sidecar.get("pos_embed_resize") == "reference":
            use_reference_pos_embed(model)
    model.load_state_dict(state, strict=True)
    return model
