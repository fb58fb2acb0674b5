"""`train.channels_last` and `train.compile` applied to the model, and the EMA copy taken before compiling."""
from __future__ import annotations

import os
import shutil

import torch

from imgcls.errors import RecipeError
from imgcls.recipe import TrainConfig
from imgcls.training.ema import WeightEma


def speed_and_ema(model: torch.nn.Module, train: TrainConfig, device: torch.device
                  ) -> tuple[torch.nn.Module, WeightEma | None]:
    """train.channels_last and train.compile applied to the model; its EMA copy is taken before compiling."""
    if train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = WeightEma(model, train.ema_decay, train.ema_warmup_steps) if train.ema_decay else None
    if ema is not None:
        ema.module.to(device)
    if train.compile:
        if device.type == "cpu" and not any(map(shutil.which, (os.environ.get("CXX", "g++"), "c++", "clang++"))):
            raise RecipeError("train.compile = true: torch.compile on the CPU generates C++ and needs a compiler "
                              "(g++ or clang++ on PATH, or CXX=<compiler>); none was found. Install one, or set "
                              "train.compile = false")
        model.compile()  # in place: parameter names, state_dict and artifacts stay those of the plain model
    return model, ema
