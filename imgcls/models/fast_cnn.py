"""`fast_cnn`: a small VGG-style network for 32x32-class images, after Keller Jordan's airbench94 (the fastest
published CIFAR-10 trainer: 94 % in 10 epochs on a GPU), kept to its plain architecture.

    stem:   conv 2x2 (no padding) -> batch norm -> GELU                 32 -> 31
    groups: per width w: conv 3x3 -> max pool 2 -> BN -> GELU -> conv 3x3 -> BN -> GELU    31 -> 15 -> 7 -> 3
    head:   global max pool -> linear (no bias) -> x head_scale

Each 3x3 convolution starts as identity on its first input-count channels (airbench's Dirac init), so the net
starts close to a shallow one. Not taken from airbench: its frozen whitening first layer (fitted to the
training images), Lookahead and its own optimizer scaling; those belong to a training loop, not a model.
Widths (32, 128, 128) train CIFAR-10 at ~850 images/s on 2 CPU cores in fp32 with channels-last, ~1,300 in bf16
on a CPU with AVX512-BF16; airbench94's own widths are (64, 256, 256): ~270 / ~460 images/s.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from imgcls.errors import RecipeError


class ConvGroup(nn.Sequential):
    def __init__(self, cin: int, cout: int, bn_momentum: float) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2),
                         nn.BatchNorm2d(cout, momentum=bn_momentum), nn.GELU(),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                         nn.BatchNorm2d(cout, momentum=bn_momentum), nn.GELU())
        for conv in (self[0], self[4]):
            with torch.no_grad():
                nn.init.dirac_(conv.weight[:conv.in_channels])


class FastCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, stem: int, widths: tuple[int, ...],
                 head_scale: float, bn_momentum: float) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 2, bias=False),
                                  nn.BatchNorm2d(stem, momentum=bn_momentum), nn.GELU())
        cins = (stem, *widths[:-1])
        self.groups = nn.Sequential(*(ConvGroup(cin, cout, bn_momentum) for cin, cout in zip(cins, widths)))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        self.head_scale = head_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.groups(self.stem(x))).flatten(1)) * self.head_scale


def fast_cnn(num_classes: int, in_channels: int, image_size: tuple[int, int], *, stem: int = 24,
             widths: tuple[int, ...] = (32, 128, 128), head_scale: float = 1 / 9, bn_momentum: float = 0.4
             ) -> nn.Module:
    widths = tuple(widths)
    if not widths or min(widths) < 1 or stem < 1:
        raise RecipeError(f"model.args.widths: {list(widths)} (stem {stem}): give one positive width per group, "
                          "e.g. [32, 128, 128]")
    side = min(image_size) - 1
    if side < 2 ** len(widths):
        raise RecipeError(f"model.args.widths: {len(widths)} groups halve the image {len(widths)} times, which "
                          f"{image_size[0]}x{image_size[1]} cannot take; use at most "
                          f"{max(int(math.log2(max(side, 1))), 0)} widths")
    if not 0.0 < bn_momentum <= 1.0:
        raise RecipeError(f"model.args.bn_momentum: {bn_momentum} is outside (0, 1] (torch's convention: the "
                          "weight of the newest batch in the running statistics)")
    return FastCNN(num_classes, in_channels, stem, widths, head_scale, bn_momentum)
