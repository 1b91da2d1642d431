"""Method options: defaults, named presets, validation and the recipe a method trains with."""

from __future__ import annotations

from typing import Dict, Mapping, Optional

from fastdense.pipelines.recipes import RECIPES, Recipe


def resolve_options(method_name: str, defaults: Mapping, presets: Mapping[str, Mapping], options: Mapping, preset: Optional[str] = None) -> Dict:
    """``defaults``, overridden by ``presets[preset]``, overridden by ``options``.

    Unknown option names and unknown presets raise ``ValueError`` listing the valid ones.
    """
    resolved = dict(defaults)
    if preset is not None:
        if preset not in presets:
            raise ValueError(f"{method_name}: preset must be one of {sorted(presets)} or None, got {preset!r}")
        resolved.update(presets[preset])
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"{method_name}: unknown option(s) {unknown}; valid options are {sorted(defaults)}")
    resolved.update(options)
    return resolved


def resized_recipe(recipe_name: str, view_sizes: Mapping) -> Recipe:
    """The method's recipe with view sizes mapped through ``view_sizes`` (old size -> new size)."""
    return RECIPES[recipe_name].resized({int(k): int(v) for k, v in dict(view_sizes or {}).items()})


def check_choice(method_name: str, option: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{method_name}: option {option} must be one of {list(choices)}, got {value!r}")


def check_range(method_name: str, option: str, value, low, high=None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{method_name}: option {option} must be a number {bound}, got {value!r}")
