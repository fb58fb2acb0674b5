"""Train-time augmentation of whole uint8 batches on the batch's device, with per-sample random parameters.

    aug = BatchAugment.from_preprocess(recipe.data.augment, Preprocess.from_data(recipe.data))
    x = aug(images_uint8, index, epoch=epoch, seed=recipe.seed)   # float32 [B, C, h, w], normalized (and erased)
    x = normalize(images_uint8, pre.mean, pre.std)                 # evaluation: no augmentation

The random numbers of a sample come from `counter_uniform`, a hash of (seed, epoch, sample index, op) in
integer arithmetic. What holds, exactly:
- a sample's random parameters (crop box, flip, angle, jitter factors, policy ops, erase box) are the same bits
  on any device, batch size, place in the batch, worker count, process count and after a resume;
- its pixels are the same bits whatever the batch size, its place in the batch, its neighbours, the workers,
  the processes or a resume, on one device type;
- across device types (CPU vs CUDA) its pixels agree to float32 rounding, not bit for bit: the resampling,
  rotation and jitter kernels round differently (fused multiply-adds, summation order). `tests/gpu` bounds the
  difference after normalisation (values in about [-2, 2]) by 1e-4, about 400 float32 ulps at 2.
Every op has its own id, so switching one op on or off never changes another op's numbers. All work is integer/float torch ops on the batch's device (no numpy, no `.item()`, no host sync).

The ops, their order and their options' meaning match `Preprocess.train_transform` (torchvision v2; e.g.
crop_padding crops from the padded frame and is not used with random_resized_crop), with these
differences: images stay float32 in [0, 1] between ops (torchvision rounds to uint8 after every op); resizes
are torch's antialiased kernels, not PIL's; colour jitter applies brightness, contrast, saturation in this
fixed order (torchvision permutes them per image); the random numbers are ours. Reductions are written as
fixed-order sums, because torch's own (e.g. `mean`) sum in an order that depends on the batch size once an
image has more than ~32k values. The auto-augment policies (RandAugment, TrivialAugmentWide, AutoAugment
ImageNet) come after the flip, before colour jitter; their ops and differences are in `autoaugment`. Random
erasing comes last, on the normalized batch, as torchvision's RandomErasing(p, value=0): its box is drawn as
torchvision draws it (10 tries of scale (0.02, 0.33), log-ratio (0.3, 3.3); none fits -> not erased).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from imgcls.data.autoaugment import apply_ops, blend, geometric_mode, per_sample_mean, policy_plan, policy_uniforms
from imgcls.data.resample import gather_cols, gather_rows, resized_crop
from imgcls.recipe import AugmentConfig
from imgcls.data.transforms import Preprocess

# Op ids are part of the reproducibility contract: changing one changes that op's numbers in every run.
OP_RESIZED_CROP, OP_PAD_CROP, OP_ROTATION, OP_HFLIP, OP_COLOR_JITTER = 1, 2, 3, 4, 5
OP_POLICY = {"randaugment": 6, "trivialaugment": 7, "autoaugment": 8}
OP_RANDOM_ERASING = 9
RRC_TRIES = 10  # torchvision's RandomResizedCrop tries 10 boxes, then falls back to a centre crop
RRC_RATIO = (3 / 4, 4 / 3)  # torchvision's default aspect-ratio range (the recipe has no key for it)
ERASE_SCALE, ERASE_RATIO = (0.02, 0.33), (0.3, 3.3)  # torchvision RandomErasing's defaults
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")

_M32, _GOLDEN, _INIT = 0xFFFF_FFFF, 0x9E37_79B9, 0x243F_6A88


def _mul32(x, c: int):
    """(x * c) mod 2**32 for x in [0, 2**32), split in 16-bit halves so int64 never overflows."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _triple32(x):
    """Chris Wellons' `triple32` 32-bit integer hash (a bijection); works on Python ints and int64 tensors."""
    x = x ^ (x >> 17)
    x = _mul32(x, 0xED5A_D4BB)
    x = x ^ (x >> 11)
    x = _mul32(x, 0xAC4C_1B51)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x3184_8BAB)
    return x ^ (x >> 14)


def _absorb(h, word):
    return _triple32(((h ^ word) + _GOLDEN) & _M32)


def counter_uniform(seed: int, epoch: int, index: torch.Tensor, op: int, k: int) -> torch.Tensor:
    """k uniform numbers in [0, 1) per sample: float32 [B, k] on `index`'s device.

    Number j of sample i is a hash of the 32-bit words (seed mod 2**64 as two words, epoch, op, index as two
    words, j), each absorbed as h = triple32((h ^ word) + 0x9E3779B9) from h = 0x243F6A88; its top 24 bits
    over 2**24. Integer ops only until that exact conversion, so CPU and CUDA give the same bits.
    """
    if not (isinstance(index, torch.Tensor) and index.dtype == torch.int64 and index.ndim == 1):
        got = f"{index.dtype} {tuple(index.shape)}" if isinstance(index, torch.Tensor) else type(index).__name__
        raise TypeError(f"counter_uniform: index must be an int64 tensor [B] of sample indices; got {got}")
    for name, value in (("epoch", epoch), ("op", op)):
        if not (isinstance(value, int) and 0 <= value <= _M32):
            raise ValueError(f"counter_uniform: {name} must be an int in [0, 2**32); got {value!r}")
    if not (isinstance(seed, int) and isinstance(k, int) and k >= 1):
        raise ValueError(f"counter_uniform: seed must be an int and k an int >= 1; got seed={seed!r}, k={k!r}")
    h = _INIT
    for word in (seed & _M32, (seed >> 32) & _M32, epoch, op):  # the same for every sample: Python ints
        h = _absorb(h, word)
    h = _absorb(_absorb(h, index & _M32), (index >> 32) & _M32)
    h = _absorb(h[:, None], torch.arange(k, device=index.device))
    return (h >> 8).to(torch.float32) * 2.0 ** -24


@dataclass(frozen=True)
class AugmentParams:
    """The per-sample parameters of one batch; None where an op is off."""

    box: torch.Tensor | None = None  # int64 [B, 4]: top, left, height, width of the resized-crop window
    offset: torch.Tensor | None = None  # int64 [B, 2]: top, left of the crop in the zero-padded frame
    angle: torch.Tensor | None = None  # float64 [B]: degrees, counter-clockwise
    flip: torch.Tensor | None = None  # bool [B]
    jitter: torch.Tensor | None = None  # float64 [B, 3]: brightness, contrast, saturation factors
    policy_ops: torch.Tensor | None = None  # int64 [B, S]: the auto-augment op (autoaugment.OPS) per sample and step
    policy_magnitude: torch.Tensor | None = None  # float64 [B, S]: its signed magnitude
    erase: torch.Tensor | None = None  # int64 [B, 4]: top, left, height, width of the erased box (0 x 0: none)


def rrc_boxes(u: torch.Tensor, in_size: tuple[int, int], scale: tuple[float, float]) -> torch.Tensor:
    """torchvision's RandomResizedCrop box logic, vectorised: the first of 10 tries that fits, else the
    ratio-clamped centre crop. u: [B, 22] uniforms (10 areas, 10 log-ratios, top, left) -> int64 [B, 4]."""
    height, width = in_size
    u = u.double()
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, :RRC_TRIES])
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, RRC_TRIES:2 * RRC_TRIES])
    w = torch.round(torch.sqrt(area * ratio))
    h = torch.round(torch.sqrt(area / ratio))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    found = fits.any(dim=1)
    in_ratio = width / height
    if in_ratio < min(RRC_RATIO):
        fw, fh = width, int(round(width / min(RRC_RATIO)))
    elif in_ratio > max(RRC_RATIO):
        fw, fh = int(round(height * max(RRC_RATIO))), height
    else:
        fw, fh = width, height
    h = torch.where(found, h.gather(1, first)[:, 0], float(fh))
    w = torch.where(found, w.gather(1, first)[:, 0], float(fw))
    top = torch.where(found, torch.floor(u[:, -2] * (height - h + 1)), float((height - fh) // 2))
    left = torch.where(found, torch.floor(u[:, -1] * (width - w + 1)), float((width - fw) // 2))
    return torch.stack([top, left, h, w], dim=1).long()


def frame(x: torch.Tensor, frame_size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Resize a float batch to the frame (image_size / crop_pct), as `Preprocess.train_transform` resizes the
    image before its centre or random (crop_padding) crop; torch's antialiased resize, not PIL's."""
    x = TF.resize(x, list(frame_size), interpolation=TF.InterpolationMode(interpolation), antialias=True)
    return x.clamp(0.0, 1.0) if interpolation == "bicubic" else x


def pad_crop(x: torch.Tensor, offset: torch.Tensor, padding: int, size: tuple[int, int]) -> torch.Tensor:
    """Per-sample `crop(pad(x[b], padding), *offset[b], *size)` with zero fill: exact integer shifts."""
    padded = F.pad(x, (padding,) * 4)
    rows = offset[:, 0, None] + torch.arange(size[0], device=x.device)
    cols = offset[:, 1, None] + torch.arange(size[1], device=x.device)
    return gather_cols(gather_rows(padded, rows), cols)


def rotate(x: torch.Tensor, angle: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Per-sample `v2.functional.rotate(x[b], angle[b], interpolation, fill=0)` (counter-clockwise degrees
    about the centre). Like torchvision, a sampled ones-channel scales the edge so borders fade to 0."""
    b, c, height, width = x.shape
    theta = torch.deg2rad(angle.double())
    cos, sin = torch.cos(theta).float()[:, None, None], torch.sin(theta).float()[:, None, None]
    xs = (torch.arange(width, device=x.device, dtype=torch.float32) + (1 - width) * 0.5)[None, None, :]
    ys = (torch.arange(height, device=x.device, dtype=torch.float32) + (1 - height) * 0.5)[None, :, None]
    grid = torch.stack([(cos * xs - sin * ys) / (0.5 * width), (sin * xs + cos * ys) / (0.5 * height)], dim=-1)
    if interpolation == "nearest":  # zero padding already gives torchvision's fill
        return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    ones = torch.ones((b, 1, height, width), dtype=x.dtype, device=x.device)
    out = F.grid_sample(torch.cat([x, ones], dim=1), grid, mode=interpolation, padding_mode="zeros",
                        align_corners=False)
    out = out[:, :c] * out[:, c:]
    return out.clamp(0.0, 1.0) if interpolation == "bicubic" else out


def hflip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the samples where flip [B] is True."""
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def color_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Per-sample adjust_brightness, adjust_contrast, adjust_saturation (3 channels only) as torchvision's
    functionals do on float images; factors [B, 3] (1 = unchanged)."""
    f = factors.view(-1, 3, 1, 1, 1).unbind(1)
    x = (x * f[0].float()).clamp(0.0, 1.0)
    rgb = x.shape[1] == 3
    x = blend(x, per_sample_mean(TF.rgb_to_grayscale(x) if rgb else x), f[1])
    return blend(x, TF.rgb_to_grayscale(x), f[2]) if rgb else x


def erase_boxes(u: torch.Tensor, size: tuple[int, int], p: float) -> torch.Tensor:
    """torchvision's RandomErasing box logic, vectorised: erased when u[:, 0] < p, the first of 10 tries
    with h < H and w < W. u: [B, 23] uniforms (apply, 10 areas, 10 log-ratios, top, left) -> int64 [B, 4]."""
    height, width = size
    u = u.double()
    area = height * width * (ERASE_SCALE[0] + (ERASE_SCALE[1] - ERASE_SCALE[0]) * u[:, 1:11])
    log_lo, log_hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 11:21])
    h = torch.round(torch.sqrt(area * ratio))  # torchvision: h from area * ratio (RandomResizedCrop: w)
    w = torch.round(torch.sqrt(area / ratio))
    fits = (h < height) & (w < width)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    erased = fits.any(dim=1) & (u[:, 0] < p)
    h = torch.where(erased, h.gather(1, first)[:, 0], 0.0)
    w = torch.where(erased, w.gather(1, first)[:, 0], 0.0)
    top = torch.where(erased, torch.floor(u[:, 21] * (height - h + 1)), 0.0)
    left = torch.where(erased, torch.floor(u[:, 22] * (width - w + 1)), 0.0)
    return torch.stack([top, left, h, w], dim=1).long()


def erase(x: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Per-sample `v2.functional.erase(x[b], *box[b], v=0)`: zero inside the box (all channels)."""
    rows = torch.arange(x.shape[-2], device=x.device)[None, :] - box[:, :1]
    cols = torch.arange(x.shape[-1], device=x.device)[None, :] - box[:, 1:2]
    inside = ((rows >= 0) & (rows < box[:, 2:3]))[:, :, None] & ((cols >= 0) & (cols < box[:, 3:4]))[:, None, :]
    return x.masked_fill(inside[:, None], 0.0)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Evaluation input: uint8 [B, C, H, W] -> float32, exactly `v2.ToDtype(float32, scale=True)` then
    `v2.Normalize(mean, std)`."""
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8):
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"normalize expects a uint8 image batch (values 0-255); got {got}")
    return TF.normalize(TF.to_dtype(images, torch.float32, scale=True), list(mean), list(std))


class BatchAugment:
    """`Preprocess.train_transform` for whole uint8 batches, ops in its order: either a random resized crop of
    the input, or the framing (resize to image_size / crop_pct unless the input already has that size,
    then a random crop of the zero-padded frame with crop_padding, else the centre crop); then rotation,
    horizontal flip, the auto-augment policy, colour jitter, normalize, random erasing.

    Ops that are off do no work and draw nothing. Store images at the frame size so that framing is no work;
    the resized crop cuts its window from the input as given (so from the stored image, not the file)."""

    def __init__(self, aug: AugmentConfig, image_size: tuple[int, int], channels: int, mean, std,
                 interpolation: str, crop_pct: float = 1.0):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"BatchAugment: interpolation must be one of {INTERPOLATIONS}; got {interpolation!r}")
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"BatchAugment: mean and std need {channels} values (one per channel); "
                             f"got mean={list(mean)}, std={list(std)}")
        self.aug, self.size, self.channels = aug, (int(image_size[0]), int(image_size[1])), channels
        self.mean, self.std = list(mean), list(std)
        self.interpolation, self.crop_pct = interpolation, crop_pct
        self.frame_size = tuple(math.floor(s / crop_pct) for s in self.size) if crop_pct < 1.0 else self.size

    @classmethod
    def from_preprocess(cls, aug: AugmentConfig, pre: Preprocess) -> "BatchAugment":
        return cls(aug, pre.image_size, pre.channels, pre.mean, pre.std, pre.interpolation, pre.crop_pct)

    def params(self, index: torch.Tensor, epoch: int, seed: int, in_size: tuple[int, int]) -> AugmentParams:
        """The parameters each sample gets; in_size is the (H, W) of the stored images."""
        aug, out = self.aug, {}

        def draw(op: int, k: int) -> torch.Tensor:
            return counter_uniform(seed, epoch, index, op, k).double()

        if aug.random_resized_crop:
            out["box"] = rrc_boxes(draw(OP_RESIZED_CROP, 2 * RRC_TRIES + 2), in_size, aug.scale)
        elif aug.crop_padding:  # as train_transform: with a resized crop, its box is the crop (no padding)
            u = draw(OP_PAD_CROP, 2)
            rooms = [f + 2 * aug.crop_padding - s + 1 for f, s in zip(self.frame_size, self.size)]
            out["offset"] = torch.stack([torch.floor(u[:, k] * room) for k, room in enumerate(rooms)], 1).long()
        if aug.rotation:
            out["angle"] = aug.rotation * (2.0 * draw(OP_ROTATION, 1)[:, 0] - 1.0)
        if aug.hflip:
            out["flip"] = draw(OP_HFLIP, 1)[:, 0] < aug.hflip
        if aug.color_jitter:
            low, high = max(0.0, 1.0 - aug.color_jitter), 1.0 + aug.color_jitter
            out["jitter"] = low + (high - low) * draw(OP_COLOR_JITTER, 3)
        policy = aug.auto_augment
        if policy and not (policy == "randaugment" and aug.randaugment_ops == 0):
            u = draw(OP_POLICY[policy], policy_uniforms(policy, aug.randaugment_ops))
            out["policy_ops"], out["policy_magnitude"] = policy_plan(policy, u, self.size, aug.randaugment_ops,
                                                                     aug.randaugment_magnitude)
        if aug.random_erasing:
            out["erase"] = erase_boxes(draw(OP_RANDOM_ERASING, 23), self.size, aug.random_erasing)
        return AugmentParams(**out)

    def augment(self, images: torch.Tensor, index: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
        """uint8 [B, C, H, W] -> float32 [B, C, h, w] in [0, 1], augmented, not yet normalized (nor erased)."""
        self._check(images, index)
        return self._augment(images, self.params(index, epoch, seed, tuple(images.shape[-2:])))

    def __call__(self, images: torch.Tensor, index: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
        """uint8 [B, C, H, W] -> float32 [B, C, h, w]: augmented, normalized and erased, ready for the model."""
        self._check(images, index)
        p = self.params(index, epoch, seed, tuple(images.shape[-2:]))
        x = TF.normalize(self._augment(images, p), self.mean, self.std)
        return x if p.erase is None else erase(x, p.erase)

    def _augment(self, images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        x = TF.to_dtype(images, torch.float32, scale=True)
        if p.box is not None:
            x = resized_crop(x, p.box, self.size, self.interpolation)
        else:
            if tuple(x.shape[-2:]) != self.frame_size:
                x = frame(x, self.frame_size, self.interpolation)
            if p.offset is not None:
                x = pad_crop(x, p.offset, self.aug.crop_padding, self.size)
            elif self.frame_size != self.size:
                x = TF.center_crop(x, list(self.size))
        if p.angle is not None:
            x = rotate(x, p.angle, self.interpolation)
        if p.flip is not None:
            x = hflip(x, p.flip)
        if p.policy_ops is not None:
            x = apply_ops(x, p.policy_ops, p.policy_magnitude, geometric_mode(self.interpolation))
        if p.jitter is not None:
            x = color_jitter(x, p.jitter)
        return x

    def _check(self, images: torch.Tensor, index: torch.Tensor) -> None:
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4):
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise TypeError(f"BatchAugment expects a uint8 batch [B, C, H, W]; got {got}")
        if images.shape[1] != self.channels:
            raise ValueError(f"BatchAugment: the batch has {images.shape[1]} channels, the model's preprocessing "
                             f"has {self.channels} (data.channels); store images with the model's channels")
        if not (isinstance(index, torch.Tensor) and index.dtype == torch.int64 and index.shape == images.shape[:1]
                and index.device == images.device):
            got = f"{index.dtype} {tuple(index.shape)} on {index.device}" if isinstance(index, torch.Tensor) \
                else type(index).__name__
            raise ValueError(f"BatchAugment: index must be an int64 tensor [{images.shape[0]}] of sample indices "
                             f"on {images.device}, one per image; got {got}")
