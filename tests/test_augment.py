"""Batched augmentation (imgcls/data/augment.py): the counter-based RNG, the per-sample guarantee, each op against
torchvision, and evaluation normalize.

    .venv/bin/python -m pytest -q tests/test_augment.py
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from imgcls.data import augment as A
from imgcls.data.augment import BatchAugment, counter_uniform, normalize
from imgcls.recipe import AugmentConfig
from imgcls.data.transforms import Preprocess

ALL_ON = AugmentConfig(random_resized_crop=True, scale=(0.3, 1.0), crop_padding=3, hflip=0.5, rotation=20.0,
                       color_jitter=0.4)  # as train_transform, crop_padding is not used with a resized crop
PADDED = AugmentConfig(crop_padding=3, hflip=0.5, rotation=20.0, color_jitter=0.4)


def images(n: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def indices(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(1_000_000, generator=torch.Generator().manual_seed(seed))[:n]


def batch_aug(aug: AugmentConfig, size=(32, 32), channels=3, interpolation="bilinear", crop_pct=1.0):
    return BatchAugment(aug, size, channels, [0.5] * channels, [0.25] * channels, interpolation, crop_pct)


def as_float(x: torch.Tensor) -> torch.Tensor:
    return TF.to_dtype(x, torch.float32, scale=True)


# ---- the counter-based RNG ----

def reference_uniform(seed: int, epoch: int, index: int, op: int, j: int) -> float:
    """The documented hash, written with plain Python integers (no 16-bit split)."""
    m = 0xFFFF_FFFF

    def triple32(x):
        x ^= x >> 17
        x = (x * 0xED5AD4BB) & m
        x ^= x >> 11
        x = (x * 0xAC4C1B51) & m
        x ^= x >> 15
        x = (x * 0x31848BAB) & m
        return x ^ (x >> 14)

    seed, index = seed % 2 ** 64, index % 2 ** 64
    h = 0x243F6A88
    for word in (seed & m, seed >> 32, epoch, op, index & m, index >> 32, j):
        h = triple32(((h ^ word) + 0x9E3779B9) & m)
    return (h >> 8) / 2 ** 24


def test_counter_uniform_is_the_documented_hash_without_overflow():
    idx = torch.tensor([0, 1, 2 ** 31, 2 ** 32 + 1, 2 ** 62 + 12345, -1])
    for seed, epoch, op in [(0, 0, 0), (1, 1, 5), (2 ** 40 + 5, 2 ** 32 - 1, 3), (-3, 7, 2 ** 32 - 1),
                            (2 ** 64 + 7, 0, 1)]:
        got = counter_uniform(seed, epoch, idx, op, 3)
        want = torch.tensor([[reference_uniform(seed, epoch, i, op, j) for j in range(3)] for i in idx.tolist()])
        assert torch.equal(got, want), (seed, epoch, op)
    # pinned: changing the hash changes every run's augmentation, so it must be a visible decision
    pinned = counter_uniform(0, 0, torch.tensor([0, 1, 2 ** 40]), 1, 2) * 2 ** 24
    assert pinned.long().tolist() == [[10505501, 13033954], [11172772, 8872568], [13274399, 12565115]]


def test_counter_uniform_rows_depend_only_on_their_sample():
    idx = indices(50, 0)
    full = counter_uniform(9, 2, idx, 4, 5)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(counter_uniform(9, 2, idx[order], 4, 5), full[order])
    assert torch.equal(counter_uniform(9, 2, idx[17:18], 4, 5), full[17:18])
    assert torch.equal(counter_uniform(9, 2, idx, 4, 2), full[:, :2])  # k only adds columns
    assert full.dtype == torch.float32 and full.shape == (50, 5) and 0 <= full.min() and full.max() < 1


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def test_counter_uniform_statistics():
    n = 200_000
    idx = torch.arange(n + 1)
    u = counter_uniform(0, 0, idx, 1, 4)
    assert abs(u.mean().item() - 0.5) < 0.003
    assert abs(u.var().item() - 1 / 12) < 0.002
    counts = torch.histc(u[:, 0], bins=20, min=0, max=1)
    assert (counts - n / 20).abs().max() < 0.04 * n / 20
    pairs = {
        "columns j, j+1": (u[:, 0], u[:, 1]),
        "indices i, i+1": (u[:-1, 0], u[1:, 0]),
        "ops 1, 2": (u[:, 0], counter_uniform(0, 0, idx, 2, 1)[:, 0]),
        "epochs 0, 1": (u[:, 0], counter_uniform(0, 1, idx, 1, 1)[:, 0]),
        "seeds 0, 1": (u[:, 0], counter_uniform(1, 0, idx, 1, 1)[:, 0]),
    }
    for name, (a, b) in pairs.items():
        assert abs(correlation(a, b)) < 0.01, name


def test_counter_uniform_bad_input():
    with pytest.raises(TypeError, match=r"^counter_uniform: index must be an int64 tensor \[B\] of sample "
                                        r"indices; got torch.int32 \(3,\)$"):
        counter_uniform(0, 0, torch.arange(3, dtype=torch.int32), 1, 1)
    with pytest.raises(ValueError, match=r"^counter_uniform: epoch must be an int in \[0, 2\*\*32\); got -1$"):
        counter_uniform(0, -1, torch.arange(3), 1, 1)


# ---- the per-sample guarantee ----

GUARANTEE_CASES = {
    "rgb32_all_ops_bicubic": (ALL_ON, (3, 32, 32), (32, 32), "bicubic", 1.0),
    "rgb32_padded_bilinear": (PADDED, (3, 32, 32), (32, 32), "bilinear", 1.0),
    "gray_framing_pad_rotate_nearest": (AugmentConfig(crop_padding=2, rotation=30.0, hflip=0.5), (1, 40, 36),
                                        (28, 28), "nearest", 0.875),
    # > 32k values per image: torch.mean would sum in a batch-size-dependent order here
    "gray192_jitter": (AugmentConfig(color_jitter=0.5), (1, 192, 192), (192, 192), "bilinear", 1.0),
}


@pytest.mark.parametrize("case", GUARANTEE_CASES)
def test_a_samples_pixels_do_not_depend_on_its_batch(case):
    aug, (c, h, w), size, interpolation, crop_pct = GUARANTEE_CASES[case]
    ba = batch_aug(aug, size, c, interpolation, crop_pct)
    imgs, idx = images(128, c, h, w, 0), indices(128, 0)
    full = ba(imgs, idx, 3, 11)
    assert torch.equal(ba(imgs, idx, 3, 11), full)
    others, other_idx = images(6, c, h, w, 1), indices(6, 1) + 2_000_000
    for pos in (0, 63, 127):
        alone = ba(imgs[pos:pos + 1], idx[pos:pos + 1], 3, 11)
        assert torch.equal(alone[0], full[pos])
        for at in (0, 4, 6):  # in a batch of 7 among different images
            batch = torch.cat([others[:at], imgs[pos:pos + 1], others[at:]])
            batch_idx = torch.cat([other_idx[:at], idx[pos:pos + 1], other_idx[at:]])
            assert torch.equal(ba(batch, batch_idx, 3, 11)[at], full[pos]), (pos, at)


def test_parameters_differ_across_epochs_seeds_and_indices():
    idx = torch.arange(64)
    for ba in (batch_aug(ALL_ON), batch_aug(PADDED)):
        base = ba.params(idx, 0, 0, (32, 32))
        for other in (ba.params(idx, 1, 0, (32, 32)), ba.params(idx, 0, 1, (32, 32)),
                      ba.params(idx + 64, 0, 0, (32, 32))):
            assert (other.angle != base.angle).all()
            assert (other.jitter != base.jitter).all()
            assert 10 < (other.flip != base.flip).sum() < 54
            if ba.aug.random_resized_crop:
                assert (other.box != base.box).any(dim=1).float().mean() > 0.9
            else:
                assert (other.offset != base.offset).any(dim=1).float().mean() > 0.7
        imgs = images(64, 3, 32, 32, 0)
        assert not torch.equal(ba(imgs, idx, 0, 0), ba(imgs, idx, 1, 0))


def test_switching_one_op_on_does_not_change_the_others_numbers():
    idx = indices(64, 2)
    everything = batch_aug(ALL_ON).params(idx, 5, 3, (32, 32))
    padded = batch_aug(PADDED).params(idx, 5, 3, (32, 32))
    assert everything.offset is None  # the resized crop's box is the crop, as in train_transform
    for field, single in [("box", AugmentConfig(random_resized_crop=True, scale=(0.3, 1.0))),
                          ("offset", AugmentConfig(crop_padding=3)), ("angle", AugmentConfig(rotation=20.0)),
                          ("flip", AugmentConfig(hflip=0.5)), ("jitter", AugmentConfig(color_jitter=0.4))]:
        alone = batch_aug(single).params(idx, 5, 3, (32, 32))
        assert torch.equal(getattr(alone, field), getattr(padded if field == "offset" else everything, field))
        assert [f for f in vars(alone) if getattr(alone, f) is not None] == [field]
    # in pixels: an always-on flip after pad+crop leaves the crop offsets alone
    imgs = images(64, 3, 32, 32, 3)
    cropped = batch_aug(AugmentConfig(crop_padding=3)).augment(imgs, idx, 5, 3)
    flipped = batch_aug(AugmentConfig(crop_padding=3, hflip=1.0)).augment(imgs, idx, 5, 3)
    assert torch.equal(flipped, cropped.flip(-1))


# ---- each op ----

@pytest.mark.parametrize("aug", [AugmentConfig(random_resized_crop=True), AugmentConfig(crop_padding=2),
                                 AugmentConfig(rotation=10.0), AugmentConfig(hflip=0.5),
                                 AugmentConfig(color_jitter=0.2)], ids=lambda a: str(a.model_fields_set))
def test_each_op_changes_images(aug):
    imgs, idx = images(16, 3, 32, 32, 4), torch.arange(16)
    out = batch_aug(aug).augment(imgs, idx, 0, 0)
    changed = (out != as_float(imgs)).flatten(1).any(dim=1)
    assert changed.sum() >= (5 if aug.hflip else 14)


def test_each_op_is_the_identity_at_zero_magnitude():
    x = as_float(images(8, 3, 24, 32, 5))
    full_box = torch.tensor([[0, 0, 24, 32]] * 8)
    for mode in A.INTERPOLATIONS:
        assert (A.resized_crop(x, full_box, (24, 32), mode) - x).abs().max() < 1e-6, mode
    assert torch.equal(A.pad_crop(x, torch.full((8, 2), 4), 4, (24, 32)), x)
    assert (A.rotate(x, torch.zeros(8, dtype=torch.float64), "bilinear") - x).abs().max() < 1e-5
    assert torch.equal(A.rotate(x, torch.zeros(8, dtype=torch.float64), "nearest"), x)
    assert torch.equal(A.hflip(x, torch.zeros(8, dtype=torch.bool)), x)
    assert (A.color_jitter(x, torch.ones(8, 3, dtype=torch.float64)) - x).abs().max() < 1e-6


def test_everything_off_is_evaluation_normalize():
    imgs = images(8, 3, 32, 32, 6)
    out = batch_aug(AugmentConfig())(imgs, torch.arange(8), 0, 0)
    assert torch.equal(out, normalize(imgs, [0.5] * 3, [0.25] * 3))


@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
def test_inputs_not_at_the_output_size_get_the_train_framing(crop_pct):
    """Stored train frames of another size (of the frame's aspect ratio, as a larger working_size stores them)
    are resized to image_size / crop_pct and centre-cropped, as `train_transform` frames such an image."""
    imgs = images(6, 3, *{1.0: (48, 56), 0.875: (54, 64)}[crop_pct], 16)
    pre = Preprocess((24, 28), 3, (0.5,) * 3, (0.25,) * 3, "bilinear", crop_pct)
    out = BatchAugment.from_preprocess(AugmentConfig(), pre)(imgs, torch.arange(6), 0, 0)
    want = torch.stack([pre.train_transform(AugmentConfig())(img) for img in imgs])
    # the transform resizes uint8 with torch's fixed-point kernel (within one level); we stay in float
    assert (out - want).abs().max() <= 1 / 255 / 0.25 + 1e-6


@pytest.mark.parametrize("aug", [AugmentConfig(random_resized_crop=True, scale=(0.1, 0.5)),
                                 AugmentConfig(rotation=45.0)], ids=["crop", "rotation"])
@pytest.mark.parametrize("interpolation", A.INTERPOLATIONS)
def test_output_shape_dtype_and_range(interpolation, aug):
    board = (torch.arange(24)[:, None] // 2 + torch.arange(28)[None, :] // 2) % 2 * 255  # hard edges: cubic rings
    imgs = board.to(torch.uint8).expand(32, 3, 24, 28).contiguous()
    ba = batch_aug(aug, (24, 28), 3, interpolation)
    out = ba.augment(imgs, torch.arange(32), 0, 0)
    assert out.shape == (32, 3, 24, 28) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert ba(imgs, torch.arange(32), 0, 0).dtype == torch.float32
    if interpolation == "bicubic":  # the range check above is not vacuous: the raw kernel leaves [0, 1]
        raw = TF.resize(as_float(imgs[:1]), [48, 48], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        assert raw.min() < 0 and raw.max() > 1


@pytest.mark.parametrize("size,crop_pct,frame", [(32, 1.0, 32), (16, 0.5, 32)])  # images stored at the frame size
def test_pad_crop_equals_torchvision_crop_at_the_drawn_offsets(size, crop_pct, frame):
    p, imgs, idx = 4, images(64, 3, frame, frame, 7), indices(64, 7)
    out = batch_aug(AugmentConfig(crop_padding=p), (size, size), crop_pct=crop_pct).augment(imgs, idx, 2, 5)
    u = counter_uniform(5, 2, idx, A.OP_PAD_CROP, 2).double()
    offsets = torch.floor(u * (frame + 2 * p - size + 1)).long()  # RandomCrop's range on the padded frame
    assert offsets.min() == 0 and offsets.max() == frame + 2 * p - size
    for b in range(64):
        top, left = offsets[b].tolist()
        want = TF.crop(TF.pad(imgs[b], [p], fill=0), top, left, size, size)
        assert torch.equal(out[b], as_float(want)), b


def test_hflip_flips_exactly_the_drawn_samples():
    imgs, idx = images(64, 3, 16, 20, 8), indices(64, 8)
    out = batch_aug(AugmentConfig(hflip=0.3), (16, 20)).augment(imgs, idx, 1, 1)
    chosen = counter_uniform(1, 1, idx, A.OP_HFLIP, 1)[:, 0] < 0.3
    assert 5 < chosen.sum() < 40
    x = as_float(imgs)
    assert torch.equal(out[chosen], torch.flip(x[chosen], dims=[-1]))
    assert torch.equal(out[~chosen], x[~chosen])


@pytest.mark.parametrize("interpolation", A.INTERPOLATIONS)
@pytest.mark.parametrize("side", [20, 48])  # up- and down-scaling to 32
def test_rrc_of_the_whole_image_is_a_plain_resize(interpolation, side):
    imgs = images(16, 3, side, side, 9)
    ba = batch_aug(AugmentConfig(random_resized_crop=True, scale=(1.0, 1.0)), (32, 32), 3, interpolation)
    assert (ba.params(torch.arange(16), 0, 0, (side, side)).box == torch.tensor([0, 0, side, side])).all()
    out = ba.augment(imgs, torch.arange(16), 0, 0)
    want = F.interpolate(as_float(imgs), size=(32, 32), mode=interpolation,
                         antialias=interpolation != "nearest")
    assert (out - want.clamp(0, 1)).abs().max() < 1e-5


def torchvision_rrc_box(u: list[float], height: int, width: int, scale) -> list[int]:
    """RandomResizedCrop.make_params, line by line, fed with our uniforms instead of torch's generator."""
    area = height * width
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for t in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[t])
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[10 + t])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return [int(u[20] * (height - h + 1)), int(u[21] * (width - w + 1)), h, w]
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif in_ratio > 4 / 3:
        h, w = height, int(round(height * (4 / 3)))
    else:
        w, h = width, height
    return [(height - h) // 2, (width - w) // 2, h, w]


@pytest.mark.parametrize("hw,scale", [((40, 30), (0.08, 1.0)), ((16, 40), (0.9, 1.0)), ((40, 16), (0.9, 1.0))])
def test_rrc_boxes_and_pixels_follow_torchvision(hw, scale):
    imgs, idx = images(48, 3, *hw, 10), indices(48, 10)
    ba = batch_aug(AugmentConfig(random_resized_crop=True, scale=scale), (24, 24), 3, "bicubic")
    u = counter_uniform(4, 6, idx, A.OP_RESIZED_CROP, 22).double().tolist()
    want = [torchvision_rrc_box(row, *hw, scale) for row in u]
    assert ba.params(idx, 6, 4, hw).box.tolist() == want
    out = ba.augment(imgs, idx, 6, 4)
    for b in range(0, 48, 5):
        ref = TF.resized_crop(as_float(imgs[b]), *want[b], [24, 24], interpolation=v2.InterpolationMode.BICUBIC,
                              antialias=True)
        assert (out[b] - ref.clamp(0, 1)).abs().max() < 1e-5


def test_rotation_matches_torchvision_rotate():
    imgs, idx = images(16, 3, 24, 32, 11), indices(16, 11)
    out = batch_aug(AugmentConfig(rotation=40.0), (24, 32)).augment(imgs, idx, 0, 2)
    angles = 40.0 * (2 * counter_uniform(2, 0, idx, A.OP_ROTATION, 1)[:, 0].double() - 1)
    for b in range(16):
        ref = TF.rotate(as_float(imgs[b]), float(angles[b]), interpolation=v2.InterpolationMode.BILINEAR, fill=0)
        assert (out[b] - ref).abs().max() < 1e-5, b


@pytest.mark.parametrize("channels", [1, 3])
def test_color_jitter_matches_torchvision_functionals(channels):
    imgs, idx = images(16, channels, 20, 20, 12), indices(16, 12)
    out = batch_aug(AugmentConfig(color_jitter=0.6), (20, 20), channels).augment(imgs, idx, 3, 0)
    factors = 0.4 + 1.2 * counter_uniform(0, 3, idx, A.OP_COLOR_JITTER, 3).double()
    for b in range(16):
        brightness, contrast, saturation = factors[b].tolist()
        ref = TF.adjust_contrast(TF.adjust_brightness(as_float(imgs[b]), brightness), contrast)
        if channels == 3:
            ref = TF.adjust_saturation(ref, saturation)
        assert (out[b] - ref).abs().max() < 1e-6, b


# ---- evaluation, devices, bad input ----

def test_normalize_equals_torchvision_todtype_normalize():
    imgs, mean, std = images(8, 3, 17, 23, 13), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    ref = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    got = normalize(imgs, mean, std)
    assert got.dtype == torch.float32 and torch.equal(got, ref(imgs))
    assert all(torch.equal(got[b], ref(imgs[b])) for b in range(8))
    with pytest.raises(TypeError, match=r"^normalize expects a uint8 image batch \(values 0-255\); "
                                        r"got torch.float32$"):
        normalize(imgs.float(), mean, std)


def test_no_host_round_trip_runs_on_the_meta_device():
    for aug, hw in [(ALL_ON, (32, 32)), (AugmentConfig(crop_padding=2, color_jitter=0.3), (40, 40))]:
        imgs = torch.empty(8, 3, *hw, dtype=torch.uint8, device="meta")
        out = batch_aug(aug, (32, 32), 3, "bilinear", 0.875)(imgs, torch.empty(8, dtype=torch.int64, device="meta"),
                                                             1, 2)
        assert out.device.type == "meta" and out.shape == (8, 3, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_numbers():
    idx = indices(256, 14)
    assert torch.equal(counter_uniform(3, 1, idx.cuda(), 2, 7).cpu(), counter_uniform(3, 1, idx, 2, 7))
    imgs = images(256, 3, 32, 32, 14)
    for ba, field in ((batch_aug(ALL_ON), "box"), (batch_aug(PADDED), "offset")):
        cpu, gpu = ba.params(idx, 1, 3, (32, 32)), ba.params(idx.cuda(), 1, 3, (32, 32))
        assert torch.equal(getattr(gpu, field).cpu(), getattr(cpu, field)), field
        assert torch.equal(gpu.flip.cpu(), cpu.flip)
        assert (ba(imgs.cuda(), idx.cuda(), 1, 3).cpu() - ba(imgs, idx, 1, 3)).abs().max() < 1e-4


def test_bad_batches_are_named():
    ba, idx = batch_aug(ALL_ON), torch.arange(4)
    with pytest.raises(TypeError, match=r"^BatchAugment expects a uint8 batch \[B, C, H, W\]; "
                                        r"got torch.float32 \(4, 3, 32, 32\)$"):
        ba(images(4, 3, 32, 32, 0).float(), idx, 0, 0)
    with pytest.raises(ValueError, match=r"^BatchAugment: the batch has 1 channels, the model's preprocessing has "
                                         r"3 \(data.channels\); store images with the model's channels$"):
        ba(images(4, 1, 32, 32, 0), idx, 0, 0)
    with pytest.raises(ValueError, match=r"^BatchAugment: index must be an int64 tensor \[4\] of sample indices "
                                         r"on cpu, one per image; got torch.int64 \(3,\) on cpu$"):
        ba(images(4, 3, 32, 32, 0), torch.arange(3), 0, 0)
    with pytest.raises(ValueError, match=r"^BatchAugment: interpolation must be one of \('nearest', 'bilinear', "
                                         r"'bicubic'\); got 'lanczos'$"):
        batch_aug(ALL_ON, interpolation="lanczos")


def test_from_preprocess_takes_the_models_values():
    pre = Preprocess((24, 20), 1, (0.1307,), (0.3081,), "bicubic", 0.875)
    ba = BatchAugment.from_preprocess(AugmentConfig(hflip=0.5), pre)
    assert (ba.size, ba.channels, ba.mean, ba.std, ba.interpolation, ba.crop_pct) == \
        ((24, 20), 1, [0.1307], [0.3081], "bicubic", 0.875)
    imgs = images(4, 1, 30, 30, 15)
    assert ba(imgs, torch.arange(4), 0, 0).shape == (4, 1, 24, 20)
