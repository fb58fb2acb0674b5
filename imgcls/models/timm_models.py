"""timm's models as `model.name = "timm:<name>"`, with or without a pretrained tag (`timm:convnext_tiny`,
`timm:resnet18.a1_in1k`), built by `timm.create_model` for the data's classes, channels and image size.

    build("timm:resnet18.a1_in1k", num_classes=10, in_channels=1, image_size=(32, 32), drop_rate=0.1)
    accepted_args("timm:resnet18")     # the [model] args its class takes; None where timm cannot tell
    list_names("convnext*", pretrained=True)

Models whose class takes `img_size` (ViT, Swin, ...) are built for the data's image size; timm resizes pretrained
position embeddings to it. With `pretrained=True` timm fetches the weights itself (from the Hugging Face hub, or
the URL of the few without a hub copy), re-initialises the classifier for `num_classes` and sums the RGB kernels
of the first convolution for one input channel. timm is imported on first use: it adds ~1.5 s to every start.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import re
from typing import Any

from accelerate import init_empty_weights
from torch import nn

from imgcls.errors import RecipeError

PREFIX = "timm:"
# set from the data and the recipe (device, dtype: by accelerate), or meaningless for a classifier
RUNTIME_ARGS = {"num_classes", "in_chans", "img_size", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                "checkpoint_path", "cache_dir", "features_only", "out_indices", "device", "dtype"}
# arguments of timm.create_model itself (layer configuration), accepted for every model
CREATE_ARGS = ["scriptable", "exportable", "no_jit"]


def is_timm(name: str) -> bool:
    return name.startswith(PREFIX)


def _timm():
    import timm

    return timm


def timm_name(name: str) -> str:
    """`timm:resnet18.a1_in1k` -> `resnet18.a1_in1k`, the name timm knows."""
    return name[len(PREFIX):]


def check_name(name: str) -> None:
    """RecipeError unless timm has this architecture (and this pretrained tag, when one is given)."""
    timm = _timm()
    short = timm_name(name)
    arch, _, tag = short.partition(".")
    if not timm.is_model(arch):
        raise RecipeError(unknown_message(name))
    if tag and short not in timm.list_models(short, pretrained=True):
        tags = [n.partition(".")[2] for n in timm.list_models(f"{arch}.*", pretrained=True)]
        raise RecipeError(f"model.name: timm's {arch} has no pretrained tag {tag!r}; "
                          f"its tags: {', '.join(tags) or '(none: use timm:' + arch + ')'}")


def unknown_message(name: str) -> str:
    """The closest timm names, and the command that lists them (a wildcard on the name's leading letters)."""
    timm = _timm()
    short = timm_name(name)
    names = timm.list_models(pretrained=True) if "." in short else timm.list_models()
    close = [repr(PREFIX + n) for n in difflib.get_close_matches(short, names, n=3)]
    choices = f"{', '.join(close[:-1])} or {close[-1]}" if len(close) > 1 else "".join(close)
    hint = f"; did you mean {choices}?" if close else "."
    part = re.match(r"[a-z]*", short.lower()).group()
    pattern = f"{part[:4]}*" if part else "*"
    return (f"model.name: unknown timm model {short!r}{hint} List timm's names with "
            f"`imgcls-models --timm '{pattern}'` (add --pretrained for those with pretrained weights).")


@functools.lru_cache(maxsize=None)
def class_params(name: str) -> dict[str, inspect.Parameter]:
    """The constructor parameters of the class behind a timm name, found by building it without weights: on the
    meta device, or for real for the few families whose construction computes on tensors."""
    timm = _timm()
    try:
        with init_empty_weights():
            model = timm.create_model(timm_name(name), num_classes=2)
    except (RuntimeError, NotImplementedError):  # "Cannot copy out of meta tensor" and the like
        model = timm.create_model(timm_name(name), num_classes=2)
    return dict(inspect.signature(type(model).__init__).parameters)


def accepted_args(name: str) -> list[str] | None:
    """The `[model] args` a timm model takes: its class's keyword parameters and create_model's layer options.
    None when the class passes **kwargs on to a config of its own (ByobNet, RegNet, ...): the build then says
    which argument it refused."""
    params = class_params(name)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    own = [p.name for p in params.values() if p.default is not p.empty and p.name not in RUNTIME_ARGS
           and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return own + CREATE_ARGS


def build(name: str, num_classes: int, in_channels: int, image_size: tuple[int, int], pretrained: bool = False,
          **args: Any) -> nn.Module:
    kwargs = dict(args)
    if "img_size" in class_params(name):
        kwargs["img_size"] = tuple(image_size)
    return _timm().create_model(timm_name(name), pretrained=pretrained, num_classes=num_classes,
                                in_chans=in_channels, **kwargs)


def pretrained_cfg(name: str) -> dict:
    """timm's pretrained config of the name's tag (its default tag without one): where the weights come from
    (`hf_hub_id`, `url`) and the preprocessing they were trained with. {} when timm has no weights for it."""
    cfg = _timm().models.get_pretrained_cfg(timm_name(name))
    return cfg.to_dict() if cfg is not None and (cfg.hf_hub_id or cfg.url) else {}


def data_config(name: str) -> dict:
    """input_size, mean, std, interpolation and crop_pct of the name's pretrained weights, as timm resolves them."""
    return _timm().data.resolve_data_config(pretrained_cfg=pretrained_cfg(name))


def list_names(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """`timm:`-prefixed names matching the wildcard; with `pretrained`, the tagged names that have weights."""
    return [PREFIX + n for n in _timm().list_models(pattern, pretrained=pretrained)]
