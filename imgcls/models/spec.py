"""What the model code needs to know about a model: its name, arguments and initial weights. The recipe's
`[model]` section (`imgcls.recipe.ModelConfig`) is one such object; model code never imports the recipe, so it
can be used (by predict, export, convert, a notebook) without one.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class ModelSpec(Protocol):
    name: str  # a registry name, or "timm:<name>"
    args: Mapping[str, Any]  # the builder's keyword arguments
    pretrained: bool | str  # false, true (the default weights) or a torchvision weights name
    weights: str  # "" or a file / artifact folder / "hf-hub:owner/repo" to start from


@dataclass(frozen=True)
class Spec:
    """A `ModelSpec` without a recipe (an artifact's config.json, `imgcls.convert --model`)."""

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)
    pretrained: bool | str = False
    weights: str = ""
