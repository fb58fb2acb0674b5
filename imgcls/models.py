"""The model registry (`[model]` in a recipe): build by name, load initial weights, freeze parts.

Names: `small_cnn` (ours, for MNIST-size input), `gem_resnet` (the original tool's GeM-pooling ResNet,
see `imgcls.gem`) and every torchvision classification model (`resnet18`, `vit_b_16`, ...), always built
without downloaded weights; `[model] weights` brings weights from a file instead. The first convolution
is adapted to the input's channel count, and each model's classifier is found by `classifier_prefix`,
so "backbone" means everything else. List the names from the shell with `imgcls-models [PART]`
(or `python -m imgcls.models [PART]`).

    model = build_model(cfg.model, num_classes=10, in_channels=1, image_size=(28, 28))
    load_weights(model, cfg.model.weights, cfg.model.train_mode, in_channels=1)   # unless fromscratch
    frozen = apply_freeze(model, cfg.model.freeze)
    set_train_mode(model, frozen)   # at the start of every training epoch, instead of model.train()
"""
from __future__ import annotations

import argparse
import difflib
import functools
import inspect
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Union

import safetensors.torch
import torch
import torchvision
from accelerate import init_empty_weights
from accelerate.logging import get_logger
from accelerate.utils import extract_model_from_parallel
from torch import nn

from imgcls.gem import GeMResNet
from imgcls.recipe import ModelConfig, RecipeError

_log = get_logger(__name__)

NORMS = ("batch", "group", "none")
# torchvision defaults that would make a model return a tuple in train mode or warn about its init
_TORCHVISION_DEFAULTS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
_RUNTIME_ARGS = {"num_classes", "in_channels", "image_size", "input_size", "weights", "progress"}


def _info(msg: str, *args: Any) -> None:
    """Log once per job under accelerate; plain logging before any Accelerator/PartialState exists."""
    try:
        _log.info(msg, *args)
    except RuntimeError:  # accelerate's logger refuses to log before PartialState exists
        logging.getLogger(__name__).info(msg, *args)


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


_OWN: dict[str, Callable[..., nn.Module]] = {"small_cnn": small_cnn, "gem_resnet": gem_resnet}


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
    """Every name `build_model` accepts."""
    return sorted([*_OWN, *_torchvision_names()])


def _builder(name: str) -> Callable[..., nn.Module]:
    if name in _OWN:
        return _OWN[name]
    if name in _torchvision_names():
        return functools.partial(_torchvision_model, name)
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


def accepted_args(name: str) -> list[str]:
    """The `[model] args` keys a model accepts (runtime values such as num_classes are not among them)."""
    _builder(name)
    if name in _OWN:
        params = inspect.signature(_OWN[name]).parameters.values()
        return [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    # arguments without a default are architecture constants that the builder fixes itself
    return [p.name for p in _torchvision_params(name).values()
            if p.default is not p.empty and p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in _RUNTIME_ARGS]


def check_model_args(cfg: ModelConfig) -> None:
    """Raise RecipeError unless `cfg.name` exists and the model can be built with `cfg.args` (no weights allocated)."""
    with init_empty_weights():
        _call(_check_arg_names(cfg), cfg, "", num_classes=2, in_channels=3, image_size=(224, 224))


def _check_arg_names(cfg: ModelConfig) -> Callable[..., nn.Module]:
    builder = _builder(cfg.name)
    accepted = accepted_args(cfg.name)
    problems = []
    for key in cfg.args:
        if key in _RUNTIME_ARGS:
            problems.append(f"model.args.{key}: set from the data and the recipe, not from [model] args")
        elif key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"model.args.{key}: unexpected argument {key!r} for {cfg.name}; "
                            f"{hint}accepted: {', '.join(accepted) or '(none)'}")
    if problems:
        raise RecipeError("\n  - ".join(["model.args: arguments that do not fit the model:", *problems])
                          if len(problems) > 1 else problems[0])
    return builder


def _call(builder: Callable[..., nn.Module], cfg: ModelConfig, context: str, **runtime: Any) -> nn.Module:
    try:
        return builder(**runtime, **cfg.args)
    except RecipeError:
        raise
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        fixed = re.search(r"multiple values for keyword argument '(\w+)'", str(e))
        if fixed:
            raise RecipeError(f"model.args.{fixed[1]}: fixed by torchvision's {cfg.name} itself; "
                              "it cannot be set in [model] args") from None
        raise RecipeError(f"model: cannot build {cfg.name} with args {dict(cfg.args)}{context}: {e}") from None


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int, image_size: tuple[int, int]) -> nn.Module:
    """A freshly initialised model from `[model] name/args` for the data's classes, channels and image size."""
    context = f" for {in_channels}-channel {image_size[0]}x{image_size[1]} images"
    model = _call(_check_arg_names(cfg), cfg, context, num_classes=num_classes, in_channels=in_channels,
                  image_size=tuple(image_size))
    _info("model %s: %s parameters, head %r, %d input channel(s)", cfg.name, f"{count_parameters(model)[1]:,}",
          classifier_prefix(model, num_classes), in_channels)
    return model


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The input convolution: the first Conv2d in module order (true for every registered model)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ValueError(f"{type(model).__name__} has no Conv2d")


def adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the input convolution by one taking `in_channels`, keeping the family's initialisation."""
    name, conv = first_conv(model)
    if conv.in_channels == in_channels:
        return
    if conv.groups != 1:
        raise RecipeError(f"model: the first convolution {name} is grouped; cannot adapt it to {in_channels} channels")
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)
    new.to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        # reuse the per-element initial values so each architecture keeps its own init scheme
        repeats = -(-in_channels // conv.in_channels)
        new.weight.copy_(conv.weight.repeat(1, repeats, 1, 1)[:, :in_channels])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Pretrained first-conv weights for another channel count, as timm's adapt_input_conv does:
    one channel gets the sum over the pretrained ones; more get the pretrained ones repeated and rescaled."""
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def classifier_prefix(model: nn.Module, num_classes: int | None = None) -> str:
    """Module name of the classifier head: the last Linear (last Conv2d if there is none, as in squeezenet)
    producing the logits; its parent when that is an nn.Sequential (vgg/mobilenet/efficientnet `classifier`,
    vit `heads`), else the layer itself (resnet `fc`, ours `head`)."""
    model = _unwrap(model)
    modules = list(model.named_modules())
    for kind, out in ((nn.Linear, "out_features"), (nn.Conv2d, "out_channels")):
        found = [n for n, m in modules if isinstance(m, kind) and num_classes in (None, getattr(m, out))]
        if found:
            parent = found[-1].rpartition(".")[0]
            return parent if parent and isinstance(model.get_submodule(parent), nn.Sequential) else found[-1]
    raise ValueError(f"{type(model).__name__}: no layer with {num_classes} outputs to call the classifier")


def _unwrap(model: nn.Module) -> nn.Module:
    return extract_model_from_parallel(model, keep_torch_compile=False)


def _under(name: str, prefixes: Union[str, list[str]]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in ([prefixes] if isinstance(prefixes, str) else prefixes))


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _listing(keys: list[str], limit: int = 5) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, a .pth/.pt file (weights_only) or an artifact dir's model.safetensors,
    with DDP `module.` and torch.compile `_orig_mod.` prefixes removed."""
    file = Path(path)
    if file.is_dir():
        file = file / "model.safetensors"
        if not file.is_file():
            raise RecipeError(f"model.weights: {path} is a directory without model.safetensors (not a model artifact)")
    elif not file.is_file():
        raise RecipeError(f"model.weights: {path}: file not found")
    if file.suffix == ".safetensors":
        try:
            state = safetensors.torch.load_file(file)
        except Exception as e:  # safetensors raises its own SafetensorError for a damaged file
            raise RecipeError(f"model.weights: {file}: not a readable safetensors file: {e}") from None
    elif file.suffix in (".pth", ".pt", ".bin"):
        state = _load_torch_file(file)
    else:
        raise RecipeError(f"model.weights: {file}: expected a .safetensors, .pth or .pt file, or a model artifact dir")
    return {_strip_prefixes(k): v for k, v in state.items()}


def _load_torch_file(file: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in several types
        raise RecipeError(f"model.weights: {file}: cannot be read as tensors only (weights_only=True): {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RecipeError(f"model.weights: {file}: expected a state_dict, or a dict holding one under "
                          "'state_dict' or 'model'")
    return obj


def _strip_prefixes(key: str) -> str:
    while key.startswith(("module.", "_orig_mod.")):
        key = key.partition(".")[2]
    return key


def load_weights(model: nn.Module, path: str, mode: str, in_channels: int) -> None:
    """Load initial weights. `update`: every key and shape must match. `finetune`: the head is re-initialised
    where the file's does not fit, a pretrained first conv is adapted to `in_channels`; anything else that does
    not fit is an error rather than a half-loaded model."""
    model = _unwrap(model)
    state = read_state_dict(path)
    own = model.state_dict()
    if mode == "update":
        _raise_on_mismatch(state, own, path, "does not fit the model exactly (train_mode = 'update'; "
                           "'finetune' replaces a classifier that does not fit)")
        model.load_state_dict(state, strict=True)
    elif mode == "finetune":
        model.load_state_dict(_finetune_subset(model, state, own, path, in_channels), strict=False)
    else:
        raise ValueError(f"load_weights: mode must be 'finetune' or 'update', got {mode!r}")
    _info("model weights loaded from %s (%s)", path, mode)


def _raise_on_mismatch(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], path: str, why: str,
                       ignore_missing: Callable[[str], bool] = lambda key: False) -> None:
    shapes = [f"{k} (file {_shape(v)}, model {_shape(own[k])})"
              for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state and not ignore_missing(k)]
    unexpected = sorted(k for k in state if k not in own)
    problems = [f"{what}: {_listing(keys)}" for what, keys in
                (("shape mismatch", shapes), ("missing from file", missing), ("not in model", unexpected)) if keys]
    if problems:
        raise RecipeError(f"model.weights: {path} {why}; " + "; ".join(problems))


def _finetune_subset(model: nn.Module, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                     path: str, in_channels: int) -> dict[str, torch.Tensor]:
    head = classifier_prefix(model)
    conv_key = first_conv(model)[0] + ".weight"
    if own[conv_key].shape[1] != in_channels:
        raise ValueError(f"load_weights: the model takes {own[conv_key].shape[1]} channels, not {in_channels}")
    pretrained, target = state.get(conv_key), own[conv_key]
    if pretrained is not None and pretrained.shape[1] != in_channels \
            and pretrained.shape[:1] + pretrained.shape[2:] == target.shape[:1] + target.shape[2:]:
        state = {**state, conv_key: adapt_input_conv(pretrained, in_channels)}
        _info("first conv %s %s -> %s adapted from %d to %d channels", conv_key, _shape(pretrained),
              _shape(target), pretrained.shape[1], in_channels)
    unfit = [k for k in state if _under(k, head) and (k not in own or state[k].shape != own[k].shape)]
    for key in unfit:
        _info("head %s %s -> %s re-initialised", key, _shape(state[key]),
              _shape(own[key]) if key in own else "(not in model)")
    state = {k: v for k, v in state.items() if k not in unfit}
    _raise_on_mismatch(state, own, path, f"does not fit the model outside its classifier {head!r}",
                       ignore_missing=lambda key: _under(key, head))
    absent = [k for k in own if _under(k, head) and k not in state and k not in unfit]
    if absent:
        _info("head %s not in %s: freshly initialised", _listing(absent), path)
    return state


def apply_freeze(model: nn.Module, freeze: Union[str, list[str]]) -> list[str]:
    """Set requires_grad=False under "backbone" (all but the classifier) or the given module-name prefixes.
    Returns the frozen prefixes (module or parameter names), for `set_train_mode`."""
    model = _unwrap(model)
    if freeze == "none":
        return []
    prefixes = _backbone(model, classifier_prefix(model)) if freeze == "backbone" else list(freeze)
    names = [n for n, _ in model.named_modules() if n] + [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(_under(n, prefix) for n in names):
            close = difflib.get_close_matches(prefix, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            top = [n for n, _ in model.named_children()]
            raise RecipeError(f"model.freeze: {prefix!r} matches no module of {type(model).__name__}{hint} "
                              f"(top-level modules: {_listing(top, 12)})")
    params = [p for n, p in model.named_parameters() if _under(n, prefixes)]
    if len(params) == len(list(model.parameters())):
        raise RecipeError(f"model.freeze: {freeze!r} freezes every parameter; nothing is left to train")
    for param in params:
        param.requires_grad_(False)
    trainable, total = count_parameters(model)
    _info("frozen: %s; %s of %s parameters trainable", ", ".join(prefixes), f"{trainable:,}", f"{total:,}")
    return prefixes


def _backbone(module: nn.Module, head: str, prefix: str = "") -> list[str]:
    """Names covering everything outside `head`: whole children, descending only into the head's ancestors."""
    out = [prefix + n for n, _ in module.named_parameters(recurse=False)]
    for name, child in module.named_children():
        full = prefix + name
        if full == head:
            continue
        out += _backbone(child, head, full + ".") if head.startswith(full + ".") else [full]
    return out


def set_train_mode(model: nn.Module, frozen: list[str]) -> None:
    """`model.train()`, but BatchNorm inside frozen parts stays in eval so its running statistics stay put."""
    model.train()
    for name, module in _unwrap(model).named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and _under(name, frozen):
            module.eval()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def main(argv: list[str] | None = None) -> int:
    """`imgcls-models [PART]`: every name `model.name` accepts, one per line; with PART, those containing it."""
    p = argparse.ArgumentParser(prog="imgcls-models", description="List the names `model.name` accepts.")
    p.add_argument("part", nargs="?", default="", help="show only names containing this (case-insensitive)")
    args = p.parse_args(argv)
    names = [n for n in available_models() if args.part.lower() in n]
    if not names:
        print(f"no model name contains {args.part!r}; `imgcls-models` lists all {len(available_models())} names",
              file=sys.stderr)
        return 1
    try:
        print("\n".join(names), flush=True)
    except BrokenPipeError:  # `imgcls-models | head`: the reader has what it wanted (Python docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
