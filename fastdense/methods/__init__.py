"""The four methods. Each is one module whose loss reads like the paper's pseudo-code.

>>> from fastdense.methods import build_method
>>> method = build_method("scrl", preset="cpu", num_boxes=6)
>>> method.options["backbone"], method.options["num_boxes"]
('resnet18', 6)
"""

from __future__ import annotations

from typing import Dict, Optional, Type

from fastdense.methods.base import Method
from fastdense.methods.lewel import LEWEL
from fastdense.methods.options import resized_recipe, resolve_options
from fastdense.methods.scrl import SCRL
from fastdense.methods.selfpatch import SelfPatch
from fastdense.methods.vicregl import VICRegL

METHODS: Dict[str, Type[Method]] = {cls.name: cls for cls in (SCRL, VICRegL, LEWEL, SelfPatch)}
PRESETS = ("cpu",)


def method_class(name: str) -> Type[Method]:
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]


def method_options(name: str, preset: Optional[str] = None, **options) -> Dict:
    """Every option of method ``name`` as it would be built: defaults, then ``preset``, then ``options``."""
    cls = method_class(name)
    return resolve_options(name, cls.default_options(), cls.PRESETS, options, preset)


def build_method(name: str, preset: Optional[str] = None, **options) -> Method:
    """Build a method by name (``scrl``, ``vicregl``, ``lewel``, ``selfpatch``).

    ``preset="cpu"`` picks a small configuration (ResNet-18 or ViT-Ti, small heads, small views)
    that trains on a laptop CPU; ``options`` override single options (see each class's
    ``default_options()``). Unknown names, presets and options raise ``ValueError``. The built
    method's ``recipe`` is the :class:`fastdense.pipelines.recipes.Recipe` to give ``make_loader``.
    """
    return method_class(name)(preset=preset, **options)


def recipe_for(name: str, preset: Optional[str] = None, **options):
    """The recipe method ``name`` would train with, without building its networks."""
    resolved = method_options(name, preset, **options)
    return resized_recipe(method_class(name).recipe_name(resolved), resolved["view_sizes"])


__all__ = ["Method", "METHODS", "PRESETS", "build_method", "method_options", "recipe_for", "SCRL", "VICRegL", "LEWEL", "SelfPatch"]
