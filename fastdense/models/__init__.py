"""Backbones and heads. Backbones return feature maps ``[B, C, h, w]`` (CNNs) or tokens ``[B, T, C]`` (ViTs)."""

from fastdense.models.backbones import Backbone, build_backbone

__all__ = ["Backbone", "build_backbone"]
