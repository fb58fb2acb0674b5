"""Generalized-mean (GeM) pooling and the GeM-ResNet of the tool this project replaces.

`GeMResNet` is a torchvision ResNet body (`conv1` ... `layer4`, same module names, so an ImageNet
`resnet34` checkpoint fine-tunes into it directly) followed by the classifier `fc`: GeM pooling with a
learnable exponent, flatten, linear. GeM pools over the whole feature map, so any input size works.
Registered in `imgcls.models.registry` as `gem_resnet`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

BODY = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


class GeM(nn.Module):
    """Generalized-mean pooling: (mean(x^p))^(1/p) over H and W, with p learned (p=1 is average pooling)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # clamp keeps x^p and its 1/p root defined for the zeros a ReLU produces
        return F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1).pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class GeMResNet(nn.Module):
    """A torchvision ResNet body with GeM pooling and a linear classifier in `fc`."""

    def __init__(self, num_classes: int, backbone: str = "resnet34", p: float = 3.0) -> None:
        super().__init__()
        net = torchvision.models.get_model(backbone, weights=None)
        if not isinstance(net, torchvision.models.ResNet):
            raise ValueError(f"backbone {backbone!r} is not a torchvision ResNet (resnet18, resnet34, resnet50, ...)")
        for name in BODY:
            setattr(self, name, getattr(net, name))
        self.fc = nn.Sequential(GeM(p), nn.Flatten(), nn.Linear(net.fc.in_features, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in BODY:
            x = getattr(self, name)(x)
        return self.fc(x)
