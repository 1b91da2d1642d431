"""Augmentation recipes as data, shared by every backend (``METHODS.md``).

A recipe lists its views; each :class:`ViewSpec` says how that view is cropped (geometry) and how
its colours are changed (photometric, never moving a pixel). Backends read these fields and nothing
else, so a recipe means the same thing whichever backend runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Tuple, Union

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VICREGL_STD = (0.228, 0.224, 0.225)  # the VICRegL reference code's value


@dataclass(frozen=True)
class ViewSpec:
    """One view: a RandomResizedCrop to ``size`` plus per-view photometric probabilities."""

    size: int
    scale: Tuple[float, float]
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 128 / 255

    def __post_init__(self):
        # Checked here, before any work: a bad value would otherwise fail inside every sample's
        # decode, which loaders report as that file being unreadable.
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"ViewSpec.size must be a positive int, got {self.size!r}")
        for name, low_limit, high_limit in (("scale", 0.0, None), ("ratio", 0.0, None), ("blur_sigma", 0.0, None)):
            low, high = getattr(self, name)
            if not low_limit < low <= high:
                raise ValueError(f"ViewSpec.{name} must be (low, high) with 0 < low <= high, got {getattr(self, name)!r}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p", "solarize_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ViewSpec.{name} must lie in [0, 1], got {getattr(self, name)!r}")
        if len(self.jitter) != 4 or min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise ValueError(f"ViewSpec.jitter must be (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5, got {self.jitter!r}")

    @property
    def blur_kernel_size(self) -> int:
        """Odd kernel of about 10% of the view, as BYOL and DINO use (23 px at 224)."""
        k = max(3, int(round(0.1 * self.size)))
        return k if k % 2 else k + 1


@dataclass(frozen=True)
class Recipe:
    name: str
    views: Tuple[ViewSpec, ...]
    interpolation: str = "bicubic"  # "bicubic" | "bilinear"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if not self.views or not all(isinstance(v, ViewSpec) for v in self.views):
            raise ValueError(f"Recipe.views must be one or more ViewSpec objects, got {self.views!r}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"Recipe.interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}")

    @property
    def num_views(self) -> int:
        return len(self.views)

    def resized(self, sizes: Dict[int, int]) -> "Recipe":
        """The same recipe with view sizes replaced through ``sizes`` (old size -> new size), for
        small presets: ``recipe.resized({224: 96, 96: 48})``."""
        return replace(self, views=tuple(replace(v, size=sizes.get(v.size, v.size)) for v in self.views))


def _byol_pair(scale, size=224) -> Tuple[ViewSpec, ViewSpec]:
    return (
        ViewSpec(size, scale, blur_p=1.0, solarize_p=0.0),
        ViewSpec(size, scale, blur_p=0.1, solarize_p=0.2),
    )


RECIPES: Dict[str, Recipe] = {
    "scrl": Recipe("scrl", _byol_pair((0.2, 1.0)), interpolation="bicubic"),
    "lewel": Recipe("lewel", _byol_pair((0.2, 1.0)), interpolation="bilinear"),
    # VICRegL's multi-crop recipe (its ConvNeXt runs): the local views alternate the two BYOL colour
    # pipelines, as the reference's transforms do (left=(j % 2 == 0)).
    "vicregl": Recipe(
        "vicregl",
        _byol_pair((0.4, 1.0)) + 3 * _byol_pair((0.08, 0.4), size=96),
        interpolation="bicubic",
        std=VICREGL_STD,
    ),
    # VICRegL's ResNet-50 recipe: two 224 px views only.
    "vicregl_two_views": Recipe("vicregl_two_views", _byol_pair((0.08, 1.0)), interpolation="bicubic", std=VICREGL_STD),
    "selfpatch": Recipe(
        "selfpatch",
        _byol_pair((0.25, 1.0)) + tuple(ViewSpec(96, (0.05, 0.25), blur_p=0.5) for _ in range(8)),
        interpolation="bicubic",
    ),
    # Geometry only: the round-trip tests and evaluation use it.
    "plain": Recipe("plain", (ViewSpec(224, (0.08, 1.0), jitter_p=0.0, grayscale_p=0.0),)),
}


def get_recipe(recipe: Union[str, Recipe]) -> Recipe:
    """A recipe object from a name (``scrl``, ``vicregl``, ``vicregl_two_views``, ``lewel``, ``selfpatch``,
    ``plain``) or a recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)} or a Recipe object, got {recipe!r}")
    return RECIPES[recipe]
