"""The semantic check of a recipe for a given world size: data sources load, the model name and arguments
resolve, the global batch divides; the result (`Plan`) is what the trainer builds on."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from imgcls.data.loaders import DataSplits, build_splits
from imgcls.training.distributed import per_device_batch
from imgcls.models.registry import build_model, check_model_args
from imgcls.models.parts import count_parameters
from imgcls.training.preprocess import resolve_preprocess
from imgcls.models.weights import apply_freeze, load_weights
from imgcls.recipe import Recipe
from imgcls.errors import RecipeError


@dataclass
class Plan:
    """Everything derived from the recipe and the world size before training starts."""

    splits: DataSplits
    model: torch.nn.Module
    frozen: list[str]
    per_device_batch: int
    steps_per_epoch: int
    total_steps: int
    recipe: Recipe  # as run: [data] preprocessing from the pretrained weights where the recipe left it unset

    @property
    def num_classes(self) -> int:
        return len(self.splits.class_names)

    def summary(self, recipe: Recipe, world_size: int) -> str:
        trainable, total = count_parameters(self.model)
        return (f"{recipe.name}: {self.num_classes} classes, {self.splits.sizes()}, "
                f"model {recipe.model.name} {total:,} parameters ({trainable:,} trainable), global batch "
                f"{recipe.train.global_batch_size} = {world_size} process(es) x {self.per_device_batch} x "
                f"{recipe.train.grad_accum_steps} accumulation, {self.steps_per_epoch} steps/epoch, "
                f"{self.total_steps} steps")


def make_plan(recipe: Recipe, world_size: int) -> Plan:
    per_dev = per_device_batch(recipe.train.global_batch_size, world_size, recipe.train.grad_accum_steps)
    check_model_args(recipe.model)
    recipe = resolve_preprocess(recipe)
    splits = build_splits(recipe.data)
    model = build_model(recipe.model, len(splits.class_names), recipe.data.channels, recipe.data.image_size)
    if recipe.model.weights:
        load_weights(model, recipe.model.weights, recipe.model.train_mode, recipe.data.channels)
    frozen = apply_freeze(model, recipe.model.freeze)
    steps_per_epoch = len(splits.train) // recipe.train.global_batch_size
    if steps_per_epoch == 0 and recipe.train.epochs:
        raise RecipeError(f"train.global_batch_size = {recipe.train.global_batch_size} is larger than the "
                          f"training split ({len(splits.train)} images)")
    total = steps_per_epoch * recipe.train.epochs
    if recipe.train.max_steps:
        total = min(total, recipe.train.max_steps)
    return Plan(splits, model, frozen, per_dev, steps_per_epoch, total, recipe)
