"""Backbones from torchvision (ResNet) and timm (ViT, ConvNeXt), trimmed to their feature maps."""

from __future__ import annotations

import torch
from torch import nn

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50")
TIMM_PREFIXES = ("vit_", "convnext_")


class Backbone(nn.Module):
    """A trunk with its output description.

    ``forward(images)`` returns the last feature map ``[B, C, h, w]`` for CNNs, or the patch tokens
    ``[B, T, C]`` for ViTs (``kind == "vit"``). A ConvNeXt's map has been through its final
    LayerNorm at every location, as VICRegL's ConvNeXt returns it (timm would normalise after
    pooling). ``out_channels`` is ``C``; ``stride`` is the input
    pixels per output cell. ``name`` and ``trunk`` say where the weights come from, so
    ``trunk.state_dict()`` loads into the matching torchvision or timm model.
    """

    def __init__(self, name: str, trunk: nn.Module, out_channels: int, stride: int, kind: str):
        super().__init__()
        self.name = name
        self.trunk = trunk
        self.out_channels = out_channels
        self.stride = stride
        self.kind = kind

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "resnet":
            t = self.trunk
            x = t.maxpool(t.relu(t.bn1(t.conv1(images))))
            return t.layer4(t.layer3(t.layer2(t.layer1(x))))
        if self.kind == "vit":
            return self.trunk.forward_features(images)
        return self.trunk.head.norm(self.trunk.forward_features(images))


def build_backbone(name: str, **kwargs) -> Backbone:
    """``resnet18``/``resnet34``/``resnet50`` (torchvision, random init; ``kwargs`` go to the
    constructor, e.g. ``zero_init_residual=True``), or a timm model name starting with ``vit_`` or
    ``convnext_`` (needs ``timm``; ``kwargs`` go to ``timm.create_model``)."""
    if name in TORCHVISION_RESNETS:
        import torchvision

        trunk = getattr(torchvision.models, name)(weights=None, **kwargs)
        trunk.fc = nn.Identity()  # kept as a module so the state dict still loads into torchvision
        channels = trunk.layer4[-1].conv3.out_channels if hasattr(trunk.layer4[-1], "conv3") else trunk.layer4[-1].conv2.out_channels
        return Backbone(name, trunk, channels, 32, "resnet")
    if name.startswith(TIMM_PREFIXES):
        try:
            import timm
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError(f"backbone {name!r} needs timm: pip install 'fastdense[timm]'") from e
        trunk = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        if name.startswith("vit_"):
            return Backbone(name, trunk, trunk.embed_dim, trunk.patch_embed.patch_size[0], "vit")
        return Backbone(name, trunk, trunk.num_features, 32, "convnext")
    raise ValueError(f"backbone must be one of {TORCHVISION_RESNETS} or a timm name starting with {TIMM_PREFIXES}, got {name!r}")
