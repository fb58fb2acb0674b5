"""RECIPE|FOLDER, the first argument of `imgcls-data check/stats/shard`, as a `DataConfig`.

    cfg = data_config("recipes/mnist.toml", ["data.cache=none"])   # the recipe's [data], with overrides
    cfg = data_config("photos/", [], image_size=(224, 224))        # a class-folder tree (train/<class>/...)

A folder is read as `data.source = "folder"` with its `root`; `image_size`/`channels` (and the mean/std that
go with the channel count) come from the options, since a bare folder has no recipe to say them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from imgcls.recipe import DataConfig, load_recipe
from imgcls.errors import RecipeError


def add_target_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="RECIPE|FOLDER", help="a recipe TOML file, or a folder of train/<class>/ "
                                                          "(and val/, test/) images")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="recipe overrides, as for imgcls-train (e.g. data.root=/data/photos)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="working size for a FOLDER (a recipe says its own); default 224 224")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="for a FOLDER; default 3")


def data_config(target: str, overrides: list[str], image_size: tuple[int, int] | None = None,
                channels: int | None = None) -> DataConfig:
    path = Path(target)
    if path.is_dir():
        if overrides:
            raise RecipeError(f"{target} is a folder: overrides ({' '.join(overrides)}) apply to a recipe file")
        extra = {} if channels is None else {"channels": channels, "mean": [0.5] * channels,
                                             "std": [0.25] * channels}
        return DataConfig(source="folder", root=str(path), image_size=tuple(image_size or (224, 224)), **extra)
    if not path.is_file():
        raise RecipeError(f"{target}: no such recipe file or folder")
    if image_size is not None or channels is not None:
        raise RecipeError(f"{target} is a recipe: set data.image_size / data.channels as overrides instead of "
                          f"--image-size / --channels")
    return load_recipe(path, overrides).data


def data_config_of(args: argparse.Namespace) -> DataConfig:
    return data_config(args.target, args.overrides, args.image_size, args.channels)
