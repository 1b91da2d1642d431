"""Backbones from torchvision (ResNet) and timm (ViT, ConvNeXt), trimmed to their feature maps."""

from __future__ import annotations

import functools
from typing import Tuple

import torch
import torch.nn.functional as F
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


def dino_resample_pos_embed(pos_embed: torch.Tensor, new_size: Tuple[int, int], old_size: Tuple[int, int]) -> torch.Tensor:
    """A ViT's patch position embedding ``[1, old_h * old_w, C]`` resized to the ``new_size`` token grid
    as DINO and SelfPatch do (their ``interpolate_pos_encoding``): bicubic, no antialiasing, at the
    scale factor ``(new + 0.1) / old`` per axis. The 0.1 only makes ``floor(old * scale)`` come out
    as ``new``, but as the factor is given, not the size, it also places the samples
    (``(i + 0.5) * old / (new + 0.1) - 0.5``), so the result differs from a resize to ``new_size``
    (timm's ``resample_abs_pos_embed``, which antialiases when shrinking, differs more). The same
    grid is returned as it is.

    >>> dino_resample_pos_embed(torch.randn(1, 196, 8), (6, 6), (14, 14)).shape
    torch.Size([1, 36, 8])
    """
    new_size, old_size = tuple(new_size), tuple(old_size)
    if new_size == old_size:
        return pos_embed
    dim = pos_embed.shape[-1]
    if pos_embed.shape[1] != old_size[0] * old_size[1]:
        raise ValueError(f"pos_embed has {pos_embed.shape[1]} rows, not the {old_size[0]} x {old_size[1]} grid's {old_size[0] * old_size[1]}")
    grid = pos_embed.reshape(1, *old_size, dim).permute(0, 3, 1, 2).float()
    scale = tuple((new + 0.1) / old for new, old in zip(new_size, old_size))
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(grid.shape[-2:]) != new_size:  # pragma: no cover - the 0.1 guards against it
        raise RuntimeError(f"resizing the position embedding from {old_size} to {new_size} gave {tuple(grid.shape[-2:])}")
    return grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, new_size[0] * new_size[1], dim)


def _reference_pos_embed(trunk: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """timm's ``VisionTransformer._pos_embed`` for a trunk with patch tokens only (no class or
    register token, ``dynamic_img_size``), its embedding resized by :func:`dino_resample_pos_embed`."""
    batch, height, width, dim = tokens.shape
    pos_embed = dino_resample_pos_embed(trunk.pos_embed, (height, width), trunk.patch_embed.grid_size)
    return trunk.pos_drop(tokens.reshape(batch, height * width, dim) + pos_embed)


def use_reference_pos_embed(trunk: nn.Module) -> nn.Module:
    """Make a timm ViT built with ``dynamic_img_size=True`` and without class or register tokens
    resize its position embedding for other input sizes as DINO and SelfPatch do
    (:func:`dino_resample_pos_embed`) instead of timm's way. Parameters and state dict are unchanged,
    so the weights still load into the plain timm model. Returns ``trunk``."""
    if not getattr(trunk, "dynamic_img_size", False) or trunk.pos_embed is None:
        raise ValueError("the reference position-embedding resize needs a timm ViT built with dynamic_img_size=True and a pos_embed")
    if trunk.num_prefix_tokens:
        raise ValueError(f"the reference position-embedding resize supports patch tokens only; this ViT has {trunk.num_prefix_tokens} class/register tokens")
    # An instance attribute in front of the class's method; functools.partial (not a closure) so
    # that deepcopy and pickle bind the copy to the copied trunk.
    trunk._pos_embed = functools.partial(_reference_pos_embed, trunk)
    return trunk


def uses_reference_pos_embed(trunk: nn.Module) -> bool:
    """Whether :func:`use_reference_pos_embed` was applied to ``trunk``."""
    step = vars(trunk).get("_pos_embed")
    return isinstance(step, functools.partial) and step.func is _reference_pos_embed
