"""`[data]` image_size, mean, std, interpolation and crop_pct from the initial weights: each key the recipe leaves
unset takes the weights' value, each key it sets otherwise is kept with a warning naming both values. Runs once
in the plan, so the run's recipe.toml and the artifact hold the values used.

    recipe = resolve_preprocess(recipe)
"""
from __future__ import annotations

import logging
import math
from typing import Any

from accelerate.logging import get_logger

from imgcls.models.weights_preprocess import PREPROCESS_KEYS, weights_preprocess
from imgcls.recipe import DataConfig, Recipe

_log = get_logger(__name__)


def _warn(msg: str) -> None:
    try:
        _log.warning(msg)
    except RuntimeError:  # before any Accelerator/PartialState exists
        logging.getLogger(__name__).warning(msg)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def _shown(value: Any) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)


def pretrained_preprocess(recipe: Recipe) -> tuple[dict[str, Any], list[str]]:
    """With `model.pretrained` or `model.weights`: the data.* values (image_size, mean, std, interpolation,
    crop_pct) the weights were trained with, for each key the recipe leaves unset; a warning for each key it
    sets otherwise, naming both values."""
    if recipe.model.pretrained is False and not recipe.model.weights:
        return {}, []
    found = weights_preprocess(recipe.model, recipe.data.channels)
    if found is None:
        return {}, []
    label, values = found
    offered = DataConfig.model_fields["interpolation"].annotation.__args__
    overrides, warnings = {}, []
    for key in PREPROCESS_KEYS:
        theirs, ours = values[key], getattr(recipe.data, key)
        if (key == "interpolation" and theirs not in offered) or (key == "crop_pct" and not 0 < theirs <= 1):
            warnings.append(f"{label} {key} {_shown(theirs)} is not one imgcls offers; "
                            f"keeping data.{key} = {_shown(ours)}")
        elif key not in recipe.data.model_fields_set:
            overrides[key] = theirs
        elif not _same(ours, theirs):
            warnings.append(f"data.{key} = {_shown(ours)} differs from {label} {key} "
                            f"{_shown(theirs)}; keeping the recipe's")
    return overrides, warnings


def resolve_preprocess(recipe: Recipe) -> Recipe:
    """The recipe with `pretrained_preprocess`'s values in [data] (so the run's recipe.toml and artifact hold
    them), its warnings logged."""
    overrides, warnings = pretrained_preprocess(recipe)
    for text in warnings:
        _warn(text)
    if not overrides:
        return recipe
    data = DataConfig.model_validate({**recipe.data.model_dump(exclude_unset=True), **overrides})
    return recipe.model_copy(update={"data": data})
