"""The model registry (`[model]` in a recipe): build by name; initial weights and freezing are in `weights.py`.

Names: `small_cnn` (ours, for MNIST-size input), `fast_cnn` (ours, for CIFAR-size input, see `imgcls.models.fast_cnn`),
`gem_resnet` (the original tool's GeM-pooling ResNet, see `imgcls.models.gem`), every torchvision classification model
(`resnet18`, `vit_b_16`, ...) and every timm model as `timm:<name>` (`timm:convnext_tiny`,
`timm:resnet18.a1_in1k`; see `imgcls.models.timm_models`). Built freshly
initialised, or with `[model] pretrained` weights (see `imgcls.models.pretrained`); `[model] weights` brings weights
from a file instead. The first convolution is adapted to the input's channel count, and each model's classifier
is found by `classifier_prefix`, so "backbone" means everything else. List the names from the shell with
`imgcls-models [PART]` and `imgcls-models --timm 'convnext*' [--pretrained]` (or `python -m imgcls.models`).

    model = build_model(cfg.model, num_classes=10, in_channels=1, image_size=(28, 28))
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import inspect
import math
import os
import re
import sys
from typing import Any, Callable

import torch
import torchvision
from accelerate import init_empty_weights
from accelerate.logging import get_logger
from torch import nn

from imgcls.models import timm_models
from imgcls.models.fast_cnn import fast_cnn
from imgcls.models.gem import GeMResNet
from imgcls.models.pretrained import check_pretrained, fetching, timm_source, torchvision_state_dict
from imgcls.models.parts import adapt_first_conv, classifier_prefix, count_parameters, info
from imgcls.models.spec import ModelSpec
from imgcls.models.weights import load_state
from imgcls.errors import RecipeError

_log = get_logger(__name__)

NORMS = ("batch", "group", "none")
# torchvision defaults that would make a model return a tuple in train mode or warn about its init
_TORCHVISION_DEFAULTS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
_RUNTIME_ARGS = {"num_classes", "in_channels", "image_size", "input_size", "weights", "progress"}


class SmallCNN(nn.Module):
    """`blocks` blocks of [conv3x3-norm-relu x2, maxpool], widths width, 2*width, 4*width, ...; global average
    pool; linear `head`."""

    def __init__(self, num_classes: int, in_channels: int, width: int, dropout: float, norm: str,
                 blocks: int = 2) -> None:
        super().__init__()
        widths = [width * 2 ** i for i in range(blocks)]
        self.features = nn.Sequential(*(_block(cin, cout, norm) for cin, cout in zip([in_channels] + widths, widths)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pool(self.features(x)).flatten(1)))


def _block(cin: int, cout: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in (cin, cout):
        layers.append(nn.Conv2d(c, cout, 3, padding=1, bias=norm == "none"))
        if norm == "batch":
            layers.append(nn.BatchNorm2d(cout))
        elif norm == "group":
            layers.append(nn.GroupNorm(math.gcd(8, cout), cout))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers, nn.MaxPool2d(2))


def small_cnn(num_classes: int, in_channels: int, image_size: tuple[int, int], *,
              width: int = 32, dropout: float = 0.25, norm: str = "batch", blocks: int = 2) -> nn.Module:
    if norm not in NORMS:
        raise RecipeError(f"model.args.norm: {norm!r} is not one of {', '.join(NORMS)}")
    if not 1 <= blocks or min(image_size) < 2 ** blocks:
        raise RecipeError(f"model.args.blocks: {blocks} blocks halve the image {blocks} times, which "
                          f"{image_size[0]}x{image_size[1]} cannot take; use 1 to {int(math.log2(min(image_size)))}")
    return SmallCNN(num_classes, in_channels, width, dropout, norm, blocks)


def gem_resnet(num_classes: int, in_channels: int, image_size: tuple[int, int], *,
               backbone: str = "resnet34", p: float = 3.0) -> nn.Module:
    model = GeMResNet(num_classes, backbone=backbone, p=p)
    adapt_first_conv(model, in_channels)
    return model


_OWN: dict[str, Callable[..., nn.Module]] = {"small_cnn": small_cnn, "gem_resnet": gem_resnet, "fast_cnn": fast_cnn}


@functools.lru_cache(maxsize=None)
def _torchvision_names() -> tuple[str, ...]:
    # module=torchvision.models lists classification models only (not detection/segmentation/video/quantized)
    return tuple(torchvision.models.list_models(module=torchvision.models))


@functools.lru_cache(maxsize=None)
def _torchvision_params(name: str) -> dict[str, inspect.Parameter]:
    """The constructor parameters of the class behind a torchvision builder (found without allocating weights)."""
    with init_empty_weights():
        model = torchvision.models.get_model(name, weights=None, num_classes=2, **_TORCHVISION_DEFAULTS.get(name, {}))
    return dict(inspect.signature(type(model).__init__).parameters)


def _torchvision_model(name: str, num_classes: int, in_channels: int, image_size: tuple[int, int],
                       **args: Any) -> nn.Module:
    kwargs = {**_TORCHVISION_DEFAULTS.get(name, {}), **args}
    params = _torchvision_params(name)
    if "image_size" in params:  # the ViT family takes one side length
        if image_size[0] != image_size[1]:
            raise RecipeError(f"model.name: {name} needs a square image, got image_size {list(image_size)}")
        kwargs["image_size"] = image_size[0]
    elif "input_size" in params:  # maxvit
        kwargs["input_size"] = tuple(image_size)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    adapt_first_conv(model, in_channels)
    return model


def available_models() -> list[str]:
    """Every name `build_model` accepts, but timm's (`timm:<name>`: `timm_models.list_names`)."""
    return sorted([*_OWN, *_torchvision_names()])


def _builder(name: str) -> Callable[..., nn.Module]:
    if name in _OWN:
        return _OWN[name]
    if name in _torchvision_names():
        return functools.partial(_torchvision_model, name)
    if timm_models.is_timm(name):
        timm_models.check_name(name)
        return functools.partial(timm_models.build, name)
    raise RecipeError(unknown_model_message(name))


def unknown_model_message(name: str) -> str:
    """The closest names, and the command that lists them all (filtered by the name's leading letters when
    that finds any)."""
    names = available_models()
    close = [repr(n) for n in difflib.get_close_matches(name, names, n=3)]
    choices = f"{', '.join(close[:-1])} or {close[-1]}" if len(close) > 1 else "".join(close)
    hint = f"; did you mean {choices}?" if close else "."
    part = re.match(r"[a-z]*", name.lower()).group()
    example = f" (`imgcls-models {part}` for those containing {part!r})" \
        if len(part) >= 3 and any(part in n for n in names) else ""
    return f"model.name: unknown model {name!r}{hint} List the model names with `imgcls-models`{example}."


def accepted_args(name: str) -> list[str] | None:
    """The `[model] args` keys a model accepts (runtime values such as num_classes are not among them); None for
    the timm models that do not tell (see `timm_models.accepted_args`)."""
    _builder(name)
    if timm_models.is_timm(name):
        return timm_models.accepted_args(name)
    if name in _OWN:
        params = inspect.signature(_OWN[name]).parameters.values()
        return [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    # arguments without a default are architecture constants that the builder fixes itself
    return [p.name for p in _torchvision_params(name).values()
            if p.default is not p.empty and p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in _RUNTIME_ARGS]


def check_model_args(cfg: ModelSpec) -> None:
    """Raise RecipeError unless `cfg.name` exists, the model can be built with `cfg.args` (no weights allocated;
    timm models: their argument names are checked, the build itself reports the rest) and it has the weights
    `cfg.pretrained` asks for (nothing is downloaded)."""
    builder = _check_arg_names(cfg)
    runtime = {"num_classes": 2, "in_channels": 3, "image_size": (224, 224)}
    if not timm_models.is_timm(cfg.name):
        with init_empty_weights():
            _call(builder, cfg, "", **runtime)
    else:
        try:
            with init_empty_weights():
                builder(**runtime, **cfg.args)
        except TypeError as e:
            raise _argument_error(cfg, e) or RecipeError(f"model: cannot build {cfg.name} with args {dict(cfg.args)}: "
                                                         f"{e}") from None
        except Exception:  # a few timm families cannot be built on the meta device; the real build reports the rest
            pass
    check_pretrained(cfg)


def _check_arg_names(cfg: ModelSpec) -> Callable[..., nn.Module]:
    builder = _builder(cfg.name)
    accepted = accepted_args(cfg.name)
    runtime = timm_models.RUNTIME_ARGS if timm_models.is_timm(cfg.name) else _RUNTIME_ARGS
    problems = []
    for key in cfg.args:
        if key in runtime:
            problems.append(f"model.args.{key}: set from the data and the recipe, not from [model] args")
        elif accepted is not None and key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"model.args.{key}: unexpected argument {key!r} for {cfg.name}; "
                            f"{hint}accepted: {', '.join(accepted) or '(none)'}")
    if problems:
        raise RecipeError("\n  - ".join(["model.args: arguments that do not fit the model:", *problems])
                          if len(problems) > 1 else problems[0])
    return builder


def _call(builder: Callable[..., nn.Module], cfg: ModelSpec, context: str, **runtime: Any) -> nn.Module:
    try:
        return builder(**runtime, **cfg.args)
    except RecipeError:
        raise
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise _argument_error(cfg, e) or RecipeError(f"model: cannot build {cfg.name} with args {dict(cfg.args)}"
                                                     f"{context}: {e}") from None


def _argument_error(cfg: ModelSpec, e: Exception) -> RecipeError | None:
    """The [model] args key behind a builder's TypeError, when the message names one."""
    fixed = re.search(r"multiple values for keyword argument '(\w+)'", str(e))
    if fixed:
        owner = f"timm's {timm_models.timm_name(cfg.name)}" if timm_models.is_timm(cfg.name) \
            else f"torchvision's {cfg.name}"
        return RecipeError(f"model.args.{fixed[1]}: fixed by {owner} itself; it cannot be set in [model] args")
    unexpected = re.search(r"unexpected keyword argument(?:\(s\): \[)? ?'(\w+)'", str(e))
    if unexpected:  # timm models whose class passes **kwargs on to a config of its own
        return RecipeError(f"model.args.{unexpected[1]}: unexpected argument {unexpected[1]!r} for {cfg.name} ({e})")
    return None


def build_model(cfg: ModelSpec, num_classes: int, in_channels: int, image_size: tuple[int, int]) -> nn.Module:
    """The model of `[model] name/args` for the data's classes, channels and image size: freshly initialised, or
    with `[model] pretrained` weights (a new classifier for num_classes, the first conv adapted to in_channels)."""
    context = f" for {in_channels}-channel {image_size[0]}x{image_size[1]} images"
    builder = _check_arg_names(cfg)
    check_pretrained(cfg)
    runtime = {"num_classes": num_classes, "in_channels": in_channels, "image_size": tuple(image_size)}
    timm_weights = timm_source(cfg) if cfg.pretrained and timm_models.is_timm(cfg.name) else None
    with fetching(timm_weights) if timm_weights else contextlib.nullcontext():  # timm loads them while it builds
        model = _call(builder, cfg, context, **runtime, **({"pretrained": True} if timm_weights else {}))
    if timm_weights:
        info("model weights loaded from %s (finetune)", timm_weights.what)
    elif cfg.pretrained:
        state, what = torchvision_state_dict(cfg)
        load_state(model, state, "finetune", in_channels, what, key="model.pretrained")
    info("model %s: %s parameters, head %r, %d input channel(s)", cfg.name, f"{count_parameters(model)[1]:,}",
         classifier_prefix(model, num_classes), in_channels)
    return model


def main(argv: list[str] | None = None) -> int:
    """`imgcls-models [PART]`: every name `model.name` accepts, one per line; with PART, those containing it.
    `imgcls-models --timm [PATTERN] [--pretrained]`: timm's, as `timm:<name>` (with --pretrained: `<name>.<tag>`)."""
    p = argparse.ArgumentParser(prog="imgcls-models", description="List the names `model.name` accepts.")
    p.add_argument("part", nargs="?", default="", help="show only names containing this (case-insensitive)")
    p.add_argument("--timm", nargs="?", const="*", metavar="PATTERN",
                   help="list timm's models instead, those matching the wildcard PATTERN (e.g. 'convnext*')")
    p.add_argument("--pretrained", action="store_true", help="with --timm: the names with pretrained weights")
    args = p.parse_args(argv)
    if args.pretrained and args.timm is None:
        p.error("--pretrained goes with --timm")
    if args.timm is not None:
        if args.part:
            p.error(f"PART filters imgcls' own and torchvision's names; for timm's, use --timm '*{args.part}*'")
        names = timm_models.list_names(args.timm, args.pretrained)
        missing = (f"no timm model{' with pretrained weights' if args.pretrained else ''} matches {args.timm!r}; "
                   "`imgcls-models --timm` lists them all")
    else:
        names = [n for n in available_models() if args.part.lower() in n]
        missing = f"no model name contains {args.part!r}; `imgcls-models` lists all {len(available_models())} names"
    if not names:
        print(missing, file=sys.stderr)
        return 1
    try:
        print("\n".join(names), flush=True)
    except BrokenPipeError:  # `imgcls-models | head`: the reader has what it wanted (Python docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
