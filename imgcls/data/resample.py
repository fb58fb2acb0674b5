"""Per-sample resampling of float image batches by separable gathers: `resized_crop` is torch's antialiased
`interpolate` (bilinear, bicubic as PIL's Keys a = -0.5, or nearest) of each sample's own box, with sums in a
fixed order so a sample's pixels do not depend on the batch. Used by `imgcls.data.augment` (random resized
crops, and `gather_rows` / `gather_cols` for padded crops)."""
from __future__ import annotations

import math

import torch

def _filter(x: torch.Tensor, mode: str) -> torch.Tensor:
    """torch's antialiased resize kernels: triangle, or Keys cubic with a = -0.5 (as PIL)."""
    x = x.abs()
    if mode == "bilinear":
        return (1.0 - x).clamp_min(0.0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _taps(origin: torch.Tensor, length: torch.Tensor, out: int, in_max: int, mode: str):
    """Source indices and weights [B, out, T] for resizing the window [origin, origin + length) of one axis
    to `out` pixels, as torch's `interpolate(antialias=True)` (bilinear, bicubic) or "nearest" resizes a
    cropped tensor: taps stay inside the window, like crop-then-resize."""
    scale = length.to(torch.float32)[:, None] / out
    i = torch.arange(out, device=origin.device, dtype=torch.float32)[None, :]
    last = (length - 1)[:, None, None]
    if mode == "nearest":
        rel = torch.floor(i * scale).long()[..., None]
        return origin[:, None, None] + torch.minimum(rel, last), torch.ones(rel.shape, device=origin.device)
    radius = 1.0 if mode == "bilinear" else 2.0
    # floor(c + s + .5) - floor(c - s + .5) <= ceil(2 s): the taps any output can have (torch keeps one more,
    # which only ever gets weight filter(radius) = 0)
    taps = math.ceil(2 * radius * max(1.0, in_max / out))
    support = torch.where(scale >= 1, radius * scale, radius)
    invscale = torch.where(scale >= 1, 1.0 / scale, 1.0)
    center = scale * (i + 0.5)
    xmin = torch.floor(center - support + 0.5).clamp_min(0).long()
    xsize = torch.minimum(torch.floor(center + support + 0.5).long(), length[:, None]) - xmin
    t = torch.arange(taps, device=origin.device)
    rel = xmin[..., None] + t
    weight = _filter((rel - center[..., None] + 0.5) * invscale[..., None], mode)
    weight = torch.where(t < xsize[..., None], weight, 0.0)
    total = weight[..., 0]
    for k in range(1, taps):  # fixed order: the same sum whatever the batch
        total = total + weight[..., k]
    return origin[:, None, None] + torch.minimum(rel, last), weight / total[..., None]


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W], rows int64 [B, h] -> [B, C, h, W]: one gather over the flattened image (an index that
    varies along W; torch's CPU gather is several times slower with a stride-0 innermost index)."""
    b, c, height, width = x.shape
    flat = (rows[:, :, None] * width + torch.arange(width, device=x.device)).view(b, 1, -1)
    return x.reshape(b, c, height * width).gather(2, flat.expand(b, c, -1)).view(b, c, -1, width)


def gather_cols(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W], cols int64 [B, w] -> [B, C, H, w]."""
    b, c, height, _ = x.shape
    return x.gather(3, cols[:, None, None, :].expand(b, c, height, -1))


def _resample_axis(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, dim: int) -> torch.Tensor:
    gather, view = (gather_rows, (idx.shape[0], 1, -1, 1)) if dim == 2 else (gather_cols, (idx.shape[0], 1, 1, -1))
    out = None
    for k in range(idx.shape[2]):  # fixed order: the same sum whatever the batch
        term = gather(x, idx[..., k]) * weight[..., k].reshape(view)
        out = term if out is None else out + term
    return out


def resized_crop(x: torch.Tensor, box: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Per-sample `v2.functional.resized_crop(x[b], *box[b], size, interpolation, antialias=True)` on float
    images [B, C, H, W]; box int64 [B, 4] (top, left, height, width). Separable gather, no host sync."""
    _, _, height, width = x.shape
    rows = _taps(box[:, 0], box[:, 2], size[0], height, interpolation)
    cols = _taps(box[:, 1], box[:, 3], size[1], width, interpolation)
    x = _resample_axis(_resample_axis(x, *rows, dim=2), *cols, dim=3)
    return x.clamp(0.0, 1.0) if interpolation == "bicubic" else x  # cubic overshoots; uint8 would clip too
