"""Helpers every model family shares, below the registry (they never import it): the input convolution and its
adaptation to another channel count, the classifier head, parameter counts, and one logging call that works
before accelerate's state exists.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import extract_model_from_parallel
from torch import nn

from imgcls.errors import RecipeError

_log = get_logger("imgcls.models")


def info(msg: str, *args: Any) -> None:
    """Log once per job under accelerate; plain logging before any Accelerator/PartialState exists."""
    try:
        _log.info(msg, *args)
    except RuntimeError:  # accelerate's logger refuses to log before PartialState exists
        logging.getLogger("imgcls.models").info(msg, *args)


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
    model = unwrap(model)
    modules = list(model.named_modules())
    for kind, out in ((nn.Linear, "out_features"), (nn.Conv2d, "out_channels")):
        found = [n for n, m in modules if isinstance(m, kind) and num_classes in (None, getattr(m, out))]
        if found:
            parent = found[-1].rpartition(".")[0]
            return parent if parent and isinstance(model.get_submodule(parent), nn.Sequential) else found[-1]
    raise ValueError(f"{type(model).__name__}: no layer with {num_classes} outputs to call the classifier")


def unwrap(model: nn.Module) -> nn.Module:
    return extract_model_from_parallel(model, keep_torch_compile=False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

