"""RandAugment, TrivialAugmentWide and AutoAugment (ImageNet policy) on whole float batches, per-sample choices.

    ops, magnitude = policy_plan("randaugment", u, (h, w), num_ops=2, magnitude=9)   # u: uniforms [B, k]
    x = apply_ops(x, ops, magnitude, "bilinear")                                        # x: float32 [B, C, h, w]

`augment.BatchAugment` draws u from its counter-based RNG (`policy_uniforms(name, num_ops)` numbers per sample)
and calls these after the flip. The ops, their magnitude tables (signed ranges, bins) and the 25 ImageNet
sub-policies are torchvision v2's (`_AUGMENTATION_SPACE`, `_get_policies`; tests hold them equal). A step
applies one op per sample: ops [B, S] holds each sample's op per step (Identity where AutoAugment skips one),
magnitude [B, S] its signed magnitude. Each op family is one torch call with per-sample parameters: geometric
ops one grid_sample with per-sample inverse-affine matrices (torchvision's formula; fill 0, as its default
fill=None), colour ops one blend with per-sample degenerate image and factor, posterize/solarize per-sample
thresholds, equalize torchvision's per-image `equalize` on the uint8 levels. On CPU a family runs on the samples
that chose it; elsewhere on the whole batch with each sample keeping its own op's result (no data-dependent
shapes, so no host sync). Both give the same pixels.

Differences from torchvision on uint8: images stay float32 in [0, 1] between ops (torchvision rounds or
truncates to uint8 after each op, and floors the grayscale of Color/Contrast); posterize, the solarize threshold
and equalize see the image rounded to uint8 levels (round(255 x)), since their meaning is defined on those
levels; posterize and equalize output those levels, solarize inverts the unrounded pixels; geometric ops use
bilinear unless the model's interpolation is nearest (torchvision's tensor affine has no bicubic); the random
numbers are ours (the op choice is floor(u * number of ops), a sign is negative when u < 0.5, AutoAugment
applies a step when u < its probability). Reductions (the Contrast mean, the Sharpness blur) are fixed-order
sums, so a sample's pixels do not depend on its batch.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
IDENTITY, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y, ROTATE = range(6)
BRIGHTNESS, COLOR, CONTRAST, SHARPNESS, POSTERIZE, SOLARIZE, AUTOCONTRAST, EQUALIZE, INVERT = range(6, 15)
RAND_OPS = 14  # RandAugment and TrivialAugmentWide choose among OPS[:14] (no Invert)
SIGNED = torch.tensor([SHEAR_X <= k <= SHARPNESS for k in range(len(OPS))])
POLICIES = ("randaugment", "trivialaugment", "autoaugment")
NUM_BINS = {"randaugment": 31, "trivialaugment": 31, "autoaugment": 10}

# torchvision's AutoAugmentPolicy.IMAGENET: (op, probability, magnitude bin) x 2 per sub-policy
IMAGENET_POLICY = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)), (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)), (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)), (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)), (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)


@functools.lru_cache(maxsize=64)
def magnitude_table(policy: str, size: tuple[int, int]) -> torch.Tensor:
    """float64 [len(OPS), bins]: the unsigned magnitude of every op at every bin for images of size (h, w),
    computed as torchvision computes it (float32 linspace; zero for ops without a magnitude)."""
    bins, (height, width) = NUM_BINS[policy], size
    wide = policy == "trivialaugment"
    lin = functools.partial(torch.linspace, steps=bins)
    rows = {"ShearX": lin(0.0, 0.99 if wide else 0.3), "ShearY": lin(0.0, 0.99 if wide else 0.3),
            "TranslateX": lin(0.0, 32.0 if wide else 150.0 / 331.0 * width),
            "TranslateY": lin(0.0, 32.0 if wide else 150.0 / 331.0 * height),
            "Rotate": lin(0.0, 135.0 if wide else 30.0),
            "Posterize": (8 - (torch.arange(bins) / ((bins - 1) / (6 if wide else 4)))).round().int(),
            "Solarize": lin(1.0, 0.0)}
    for name in ("Brightness", "Color", "Contrast", "Sharpness"):
        rows[name] = lin(0.0, 0.99 if wide else 0.9)
    return torch.stack([rows[name].double() if name in rows else torch.zeros(bins, dtype=torch.float64)
                        for name in OPS])


def policy_uniforms(policy: str, num_ops: int = 2) -> int:
    """How many uniforms per sample `policy_plan` takes."""
    return {"randaugment": 2 * num_ops, "trivialaugment": 3, "autoaugment": 5}[policy]


def policy_plan(policy: str, u: torch.Tensor, size: tuple[int, int], num_ops: int = 2,
                magnitude: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's ops int64 [B, S] and signed magnitudes float64 [B, S] from its uniforms u [B, k].

    randaugment: S = num_ops steps, each a uniform op at bin `magnitude` of 31; trivialaugment: one uniform op
    at a uniform bin of 31; autoaugment: one of the 25 ImageNet sub-policies, each of its two steps applied
    with its probability (else Identity), magnitudes from 10 bins."""
    u = u.double()
    table = magnitude_table(policy, size).to(u.device)
    if policy == "randaugment":
        ops = torch.floor(u[:, 0::2] * RAND_OPS).long()
        bins, negative = torch.full_like(ops, magnitude), u[:, 1::2] < 0.5
    elif policy == "trivialaugment":
        ops = torch.floor(u[:, :1] * RAND_OPS).long()
        bins, negative = torch.floor(u[:, 1:2] * NUM_BINS[policy]).long(), u[:, 2:3] < 0.5
    elif policy == "autoaugment":
        steps = [step for sub in IMAGENET_POLICY for step in sub]
        sub_ops = torch.tensor([OPS.index(op) for op, _, _ in steps], device=u.device).view(-1, 2)
        prob = torch.tensor([p for _, p, _ in steps], dtype=torch.float64, device=u.device).view(-1, 2)
        sub_bins = torch.tensor([b or 0 for _, _, b in steps], device=u.device).view(-1, 2)
        sub = torch.floor(u[:, 0] * len(IMAGENET_POLICY)).long()
        ops = torch.where(u[:, 1:3] < prob[sub], sub_ops[sub], IDENTITY)
        bins, negative = sub_bins[sub], u[:, 3:5] < 0.5
    else:
        raise ValueError(f"auto augment policy must be one of {POLICIES}; got {policy!r}")
    sign = torch.where(negative & SIGNED.to(u.device)[ops], -1.0, 1.0).double()
    return ops, table[ops, bins] * sign


def apply_ops(x: torch.Tensor, ops: torch.Tensor, magnitude: torch.Tensor, interpolation: str) -> torch.Tensor:
    """The plan's steps in order on float images x [B, C, H, W] in [0, 1]."""
    for step in range(ops.shape[1]):
        x = apply_op(x, ops[:, step], magnitude[:, step], interpolation)
    return x


def geometric_mode(interpolation: str) -> str:
    """The grid_sample mode of the geometric ops for the model's interpolation."""
    return "nearest" if interpolation == "nearest" else "bilinear"


def apply_op(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor, interpolation: str,
             grouped: bool | None = None) -> torch.Tensor:
    """Sample b gets OPS[op[b]] with magnitude[b] (signed, as torchvision passes it to the op).

    grouped (default: on CPU, where a group's size costs no host sync): each op family runs on its own samples
    only; else on the whole batch, each sample keeping its own op's result (no data-dependent shapes). The
    pixels are the same either way."""
    mode = geometric_mode(interpolation)
    colour_ops = (BRIGHTNESS <= op) & (op <= SHARPNESS)
    if x.shape[1] == 1:  # torchvision's adjust_saturation leaves one-channel images alone
        colour_ops = colour_ops & (op != COLOR)
    families = [((SHEAR_X <= op) & (op <= ROTATE), lambda x, op, m: warp(x, op, m, mode)), (colour_ops, colour),
                (op == POSTERIZE, posterize), (op == SOLARIZE, solarize),
                (op == AUTOCONTRAST, lambda x, op, m: autocontrast(x)),
                (op == EQUALIZE, lambda x, op, m: TF.equalize(_levels(x).to(torch.uint8)).float() / 255.0),
                (op == INVERT, lambda x, op, m: 1.0 - x)]
    grouped = x.device.type == "cpu" if grouped is None else grouped
    out = x.clone() if grouped else x
    for mask, fn in families:
        if grouped:
            idx = mask.nonzero()[:, 0]
            if idx.numel():
                out[idx] = fn(x[idx], op[idx], magnitude[idx])
        else:
            out = torch.where(mask.view(-1, 1, 1, 1), fn(x, op, magnitude), out)
    return out


def _levels(x: torch.Tensor) -> torch.Tensor:
    """The uint8 level of each pixel, as float: round(255 x)."""
    return torch.round(x * 255.0)


def inverse_affine(angle, translate_x, translate_y, shear_x, shear_y, center_x, center_y) -> torch.Tensor:
    """torchvision's `_get_inverse_affine_matrix` (scale 1) for per-sample float64 [B] values (degrees,
    pixels, centre relative to the image centre) -> float64 [B, 6], output pixel -> input pixel."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    cx_tx, cy_ty = center_x + translate_x, center_y + translate_y
    return torch.stack([d, -b, center_x - d * cx_tx + b * cy_ty, -c, a, center_y + c * cx_tx - a * cy_ty], dim=1)


def warp(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor, mode: str) -> torch.Tensor:
    """ShearX/Y (about the top-left corner, by atan(m) degrees as torchvision), TranslateX/Y (by int(m) pixels),
    Rotate (m degrees counter-clockwise about the centre) per sample; other samples get the identity."""
    _, _, height, width = x.shape
    m, zero = magnitude.double(), torch.zeros_like(magnitude, dtype=torch.float64)
    shear = torch.rad2deg(torch.atan(m))
    is_shear = (op == SHEAR_X) | (op == SHEAR_Y)
    matrix = inverse_affine(torch.where(op == ROTATE, -torch.remainder(m, 360.0), zero),
                            torch.where(op == TRANSLATE_X, torch.trunc(m), zero),
                            torch.where(op == TRANSLATE_Y, torch.trunc(m), zero),
                            torch.where(op == SHEAR_X, shear, zero), torch.where(op == SHEAR_Y, shear, zero),
                            torch.where(is_shear, -0.5 * width, zero), torch.where(is_shear, -0.5 * height, zero))
    t = (matrix / torch.tensor([0.5 * width] * 3 + [0.5 * height] * 3, dtype=torch.float64, device=x.device))
    t = t.float()[:, :, None, None].unbind(1)
    xs = (torch.arange(width, device=x.device, dtype=torch.float32) + (1 - width) * 0.5)[None, None, :]
    ys = (torch.arange(height, device=x.device, dtype=torch.float32) + (1 - height) * 0.5)[None, :, None]
    grid = torch.stack([t[0] * xs + t[1] * ys + t[2], t[3] * xs + t[4] * ys + t[5]], dim=-1)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-sample mean [B, 1, 1, 1] as a pairwise sum in a fixed order (torch.mean's order depends on B)."""
    flat = x.reshape(x.shape[0], -1)
    n = flat.shape[1]
    flat = F.pad(flat, (0, (1 << (n - 1).bit_length()) - n))
    while flat.shape[1] > 1:
        half = flat.shape[1] // 2
        flat = flat[:, :half] + flat[:, half:]
    return (flat / n).view(-1, 1, 1, 1)


def blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's `_blend` on float images with a per-sample factor [B, 1, 1, 1]."""
    return (x * factor.float() + other * (1.0 - factor).float()).clamp(0.0, 1.0)


def sharpness_degenerate(x: torch.Tensor) -> torch.Tensor:
    """adjust_sharpness's smoothed image: the 3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13 inside, the border as is."""
    height, width = x.shape[-2:]
    if height <= 2 or width <= 2:
        return x
    rows = x[..., :, :-2] + x[..., :, 1:-1] + x[..., :, 2:]  # elementwise sums: the same whatever the batch
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
    out = x.clone()
    out[..., 1:-1, 1:-1] = (box + 4.0 * x[..., 1:-1, 1:-1]) / 13.0
    return out


def colour(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Brightness, Color (saturation), Contrast, Sharpness per sample: blend(x, degenerate, 1 + m)."""
    gray = TF.rgb_to_grayscale(x) if x.shape[1] == 3 else x
    pick = op.view(-1, 1, 1, 1)
    degenerate = torch.where(pick == SHARPNESS, sharpness_degenerate(x), per_sample_mean(gray))
    degenerate = torch.where(pick == COLOR, gray, degenerate)
    degenerate = torch.where(pick == BRIGHTNESS, 0.0, degenerate)
    return blend(x, degenerate, (1.0 + magnitude.double()).view(-1, 1, 1, 1))


def posterize(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Keep the top int(m) bits of each uint8 level; 8 bits leave the image as it is (torchvision)."""
    bits = torch.trunc(magnitude).long().clamp(0, 8).view(-1, 1, 1, 1)
    return torch.where(bits >= 8, x, (_levels(x).to(torch.uint8) & (256 - (1 << (8 - bits)))).float() / 255.0)


def solarize(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Invert the pixels whose uint8 level is >= 255 m; the threshold is compared as float32, as torchvision
    compares a uint8 image with a Python float."""
    return torch.where(_levels(x) >= (255.0 * magnitude).float().view(-1, 1, 1, 1), 1.0 - x, x)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """torchvision's autocontrast per image and channel: stretch [min, max] to [0, 1]; flat channels as they are."""
    low, high = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    return ((x - torch.where(flat, 0.0, low)) / torch.where(flat, 1.0, high - low)).clamp(0.0, 1.0)
