"""Auto-augment policies and random erasing in the batched path (imgcls/data/autoaugment.py,
imgcls/data/augment.py): each op against torchvision's on uint8, the per-sample guarantee, the policies' choices,
erasing, the recipe keys.

    .venv/bin/python -m pytest -q tests/test_autoaugment.py
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from imgcls.data import autoaugment as AA
from imgcls.data.augment import OP_POLICY, OP_RANDOM_ERASING, BatchAugment, counter_uniform
from imgcls.recipe import AugmentConfig, load_recipe
from imgcls.errors import RecipeError
from imgcls.data.transforms import Preprocess

TV_POLICY = {"randaugment": v2.RandAugment(), "trivialaugment": v2.TrivialAugmentWide(),
             "autoaugment": v2.AutoAugment()}
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
COLOUR = ("Brightness", "Color", "Contrast", "Sharpness")


def images(n: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Smooth shapes plus noise, on uint8 levels: edges for the geometric ops, a spread histogram for the rest."""
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(n, c, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear")
    noise = torch.randint(-20, 21, (n, c, h, w), generator=g)
    return (smooth * 255 + noise).round().clamp(0, 255).to(torch.uint8)


def as_float(x: torch.Tensor) -> torch.Tensor:
    return TF.to_dtype(x, torch.float32, scale=True)


def batch_aug(aug: AugmentConfig, size=(32, 32), channels=3, interpolation="bilinear") -> BatchAugment:
    return BatchAugment(aug, size, channels, [0.5] * channels, [0.25] * channels, interpolation)


def torchvision_op(img: torch.Tensor, name: str, magnitude: float, interpolation: str) -> torch.Tensor:
    """torchvision's own dispatch of one auto-augment op (the code its policies run), default fill."""
    t = v2.AutoAugment(interpolation=v2.InterpolationMode(interpolation))
    return t._apply_image_or_video_transform(img, name, magnitude, interpolation=t.interpolation, fill=t._fill)


def test_magnitudes_signs_and_the_imagenet_policy_are_torchvisions():
    for policy, t in TV_POLICY.items():
        for size in ((32, 32), (24, 40)):
            table = AA.magnitude_table(policy, size)
            for k, name in enumerate(AA.OPS):
                if name not in t._AUGMENTATION_SPACE:  # RandAugment and TrivialAugmentWide never invert
                    assert (name == "Invert") == (policy != "autoaugment") and not table[k].any(), (policy, name)
                    continue
                values, signed = t._AUGMENTATION_SPACE[name]
                want = values(AA.NUM_BINS[policy], *size)
                assert torch.equal(table[k], torch.zeros(AA.NUM_BINS[policy], dtype=torch.float64)
                                   if want is None else want.double()), (policy, name)
                assert bool(AA.SIGNED[k]) == signed, name
    assert [tuple(sub) for sub in TV_POLICY["autoaugment"]._policies] == list(AA.IMAGENET_POLICY)
    assert len(AA.IMAGENET_POLICY) == 25


# ---- each op against torchvision on uint8 ----

# (mean abs, max abs) in levels of 1/255, against torchvision on uint8 images: torchvision rounds the
# geometric ops and truncates the colour ops (and the grayscale of Color/Contrast) to uint8; posterize,
# solarize, equalize and invert see the same levels and give the same pixels.
TOLERANCE = {"Identity": (0, 0), **{name: (0.5, 0.5) for name in GEOMETRIC}, **{name: (1, 2) for name in COLOUR},
             "Posterize": (0, 0), "Solarize": (0, 0), "AutoContrast": (1, 1), "Equalize": (0, 0), "Invert": (0, 0)}


def magnitudes_of(k: int, size=(32, 32)) -> torch.Tensor:
    """16 magnitudes of op k: TrivialAugmentWide's bins 0, 4, ..., 28 and RandAugment's 2, 6, ..., 30,
    every other one negated for signed ops."""
    m = torch.cat([AA.magnitude_table("trivialaugment", size)[k, 0::4],
                   AA.magnitude_table("randaugment", size)[k, 2::4]])
    return m * torch.where(AA.SIGNED[k] & (torch.arange(16) % 2 == 1), -1.0, 1.0).double()


def changes(name: str, m: float, img: torch.Tensor) -> bool:
    """Whether torchvision's op changes this uint8 image at this magnitude."""
    spans = bool((img.amin(dim=(1, 2)) == 0).all() and (img.amax(dim=(1, 2)) == 255).all())
    return {"Identity": False, "Posterize": int(m) < 8, "Solarize": bool((img >= 255 * m).any()),
            "TranslateX": int(m) != 0, "TranslateY": int(m) != 0, "Color": img.shape[0] == 3 and m != 0,
            "AutoContrast": not spans, "Equalize": True, "Invert": True}.get(name, m != 0)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", AA.OPS)
def test_each_op_matches_torchvision_per_sample(name, channels):
    imgs = images(16, channels, 32, 32, 0)
    k = AA.OPS.index(name)
    mags = magnitudes_of(k)
    for mode in ("nearest", "bilinear") if name in GEOMETRIC else ("bilinear",):
        out = AA.apply_op(as_float(imgs), torch.full((16,), k), mags, mode)
        assert out.shape == imgs.shape and out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1
        ref = as_float(torch.stack([torchvision_op(imgs[b], name, float(mags[b]), mode) for b in range(16)]))
        diff = (out - ref).abs() * 255
        mean_tol, max_tol = TOLERANCE[name]
        if name in GEOMETRIC and mode == "nearest":  # a grid point within float rounding of a pixel edge
            assert (diff > 1e-3).float().mean() <= 0.002, (name, mode)
        else:
            assert diff.max() <= max_tol + 1e-3, (name, mode, diff.max())
        assert diff.mean() <= mean_tol + 1e-3, (name, mode, diff.mean())
        changed = (out != as_float(imgs)).flatten(1).any(dim=1)
        assert changed.tolist() == [changes(name, float(m), img) for m, img in zip(mags, imgs)], (name, mode)


def test_geometric_ops_fill_with_zero_and_keep_the_centre():
    x = as_float(torch.full((4, 3, 20, 20), 200, dtype=torch.uint8))
    grey = x[0, 0, 0, 0]
    ops = torch.tensor([AA.OPS.index(n) for n in ("Rotate", "TranslateX", "TranslateY", "ShearX")])
    out = AA.apply_op(x, ops, torch.tensor([45.0, 5.0, -5.0, 0.3], dtype=torch.float64), "nearest")
    assert (out[0, :, 0, 0] == 0).all() and (out[0, :, 10, 10] == grey).all()  # corners rotate out
    assert (out[1, :, :, :5] == 0).all() and (out[1, :, :, 5:] == grey).all()  # right by 5
    assert (out[2, :, -5:] == 0).all() and (out[2, :, :-5] == grey).all()  # up by 5
    assert (out[3, :, 0] == grey).all() and (out[3, :, -1, -5:] == 0).all()  # about the top row: bottom moves left
    assert (out[3, :, -1, :-6] == grey).all()


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_grouped_and_whole_batch_paths_give_the_same_pixels(interpolation, channels):
    g = torch.Generator().manual_seed(1)
    ops = torch.randint(0, len(AA.OPS), (96,), generator=g)
    mags = torch.stack([magnitudes_of(int(k))[i % 16] for i, k in enumerate(ops)])
    x = as_float(images(96, channels, 24, 28, 1))
    grouped = AA.apply_op(x, ops, mags, interpolation, grouped=True)
    assert torch.equal(grouped, AA.apply_op(x, ops, mags, interpolation, grouped=False))
    assert torch.equal(grouped, AA.apply_op(x, ops, mags, interpolation))  # CPU default: grouped
    for k in range(len(AA.OPS)):  # and each sample got its own op
        alone = AA.apply_op(x[ops == k], ops[ops == k], mags[ops == k], interpolation)
        assert torch.equal(grouped[ops == k], alone)


# ---- the policies in BatchAugment ----

POLICY_CASES = {
    "randaugment": (AugmentConfig(auto_augment="randaugment", hflip=0.5, random_erasing=0.5), 3, "bilinear"),
    "randaugment_3ops_m20_gray": (AugmentConfig(auto_augment="randaugment", randaugment_ops=3,
                                                randaugment_magnitude=20, crop_padding=2), 1, "nearest"),
    "trivialaugment": (AugmentConfig(auto_augment="trivialaugment", random_erasing=0.5), 3, "bicubic"),
    "autoaugment": (AugmentConfig(auto_augment="autoaugment", hflip=0.5, color_jitter=0.2, random_erasing=0.5),
                    3, "bilinear"),
}


@pytest.mark.parametrize("case", POLICY_CASES)
def test_a_samples_pixels_do_not_depend_on_its_batch(case):
    aug, channels, interpolation = POLICY_CASES[case]
    ba = batch_aug(aug, (32, 32), channels, interpolation)
    imgs, idx = images(64, channels, 32, 32, 2), torch.randperm(10**6, generator=torch.Generator().manual_seed(2))[:64]
    full = ba(imgs, idx, 3, 11)
    others, other_idx = images(6, channels, 32, 32, 3), torch.arange(6) + 2_000_000
    for pos in (0, 31, 63):
        assert torch.equal(ba(imgs[pos:pos + 1], idx[pos:pos + 1], 3, 11)[0], full[pos])
        for at in (0, 3, 6):  # in a batch of 7 among different images
            batch = torch.cat([others[:at], imgs[pos:pos + 1], others[at:]])
            batch_idx = torch.cat([other_idx[:at], idx[pos:pos + 1], other_idx[at:]])
            assert torch.equal(ba(batch, batch_idx, 3, 11)[at], full[pos]), (pos, at)
    next_epoch = ba(imgs, idx, 4, 11)
    assert (next_epoch != full).flatten(1).any(dim=1).float().mean() > 0.9
    assert (ba.params(idx, 4, 11, (32, 32)).policy_ops != ba.params(idx, 3, 11, (32, 32)).policy_ops).any()


def chi_square(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_ops_signs_and_bins_are_uniform(policy):
    size, n = (32, 32), 14_000
    p = batch_aug(AugmentConfig(auto_augment=policy)).params(torch.arange(n), 0, 7, size)
    ops, mags = p.policy_ops, p.policy_magnitude
    assert ops.shape == (n, 2 if policy == "randaugment" else 1)
    assert chi_square(torch.bincount(ops.flatten(), minlength=14).double()) < 34.5  # 13 dof, p = 0.001
    assert ops.max() == 13  # never Invert
    signed = AA.SIGNED[ops]
    negative = (mags < 0)[signed].double().mean()
    assert abs(negative - 0.5) < 4 * 0.5 / math.sqrt(int(signed.sum())), negative
    tv = TV_POLICY[policy]._AUGMENTATION_SPACE
    for k, name in enumerate(AA.OPS[:14]):
        values = tv[name][0](31, *size)
        got = mags[ops == k].abs()
        if values is None:
            assert (got == 0).all()
        elif policy == "randaugment":  # every sample at bin 9
            assert (got == abs(float(values[9]))).all(), name
        else:  # TrivialAugmentWide: a uniform bin of 31 (Rotate's 31 values are distinct)
            assert set(got.tolist()) <= set(values.double().abs().tolist()), name
    bins = torch.round(mags[ops == AA.ROTATE].abs() / 4.5).long()
    if policy == "trivialaugment":
        assert chi_square(torch.bincount(bins, minlength=31).double()) < 59.7  # 30 dof, p = 0.001


def test_autoaugment_applies_one_of_its_25_sub_policies_per_sample():
    n, size = 20_000, (32, 32)
    idx = torch.arange(n) + 12_345
    p = batch_aug(AugmentConfig(auto_augment="autoaugment")).params(idx, 2, 5, size)
    u = counter_uniform(5, 2, idx, OP_POLICY["autoaugment"], 5).double()
    sub = torch.floor(u[:, 0] * 25).long()
    assert chi_square(torch.bincount(sub, minlength=25).double()) < 52.6  # 24 dof, p = 0.001
    table = AA.magnitude_table("autoaugment", size)
    for s, steps in enumerate(AA.IMAGENET_POLICY):
        mine = sub == s
        for j, (name, prob, level) in enumerate(steps):
            applied = u[mine, 1 + j] < prob
            k = AA.OPS.index(name)
            assert (p.policy_ops[mine, j] == torch.where(applied, k, AA.IDENTITY)).all(), (s, j)
            want = table[k, level or 0] * torch.where(AA.SIGNED[k] & (u[mine, 3 + j] < 0.5), -1.0, 1.0).double()
            assert torch.equal(p.policy_magnitude[mine, j][applied], want[applied]), (s, j)
            assert abs(applied.double().mean() - prob) < 0.12, (s, j)  # ~800 samples each


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment", "autoaugment"])
def test_batched_policy_equals_train_transforms_policy_with_the_same_choices(policy):
    """The per-image definition: the very transform `Preprocess.train_transform` builds, run with each
    sample's ops and magnitudes through torchvision's own op dispatch on uint8."""
    pre = Preprocess((32, 32), 3, (0.5,) * 3, (0.25,) * 3, "bicubic")
    aug = AugmentConfig(auto_augment=policy, randaugment_magnitude=15)
    t = next(op for op in pre.train_transform(aug).transforms if isinstance(op, type(TV_POLICY[policy])))
    assert t.interpolation == v2.InterpolationMode.BILINEAR and t._fill == {"others": None}
    imgs, idx = images(64, 3, 32, 32, 4), torch.arange(64)
    ba = BatchAugment.from_preprocess(aug, pre)
    p, out = ba.params(idx, 1, 2, (32, 32)), ba.augment(imgs, idx, 1, 2)
    diffs = []
    for b in range(64):
        ref = imgs[b]
        for k, m in zip(p.policy_ops[b].tolist(), p.policy_magnitude[b].tolist()):
            ref = t._apply_image_or_video_transform(ref, AA.OPS[k], m, interpolation=t.interpolation, fill=t._fill)
        diffs.append((out[b] - as_float(ref)).abs() * 255)
        # torchvision truncates colour ops to uint8: up to a level of bias per op
        assert diffs[-1].mean() <= 1.0 * p.policy_ops.shape[1], (b, [AA.OPS[k] for k in p.policy_ops[b]])
    diffs = torch.stack(diffs)
    # ... which moves a few pixels across a posterize/solarize/equalize boundary
    assert diffs.mean() <= 0.5 and (diffs > 2.5).float().mean() <= 0.005


def test_policies_are_off_without_ops_and_after_the_flip_before_jitter():
    assert batch_aug(AugmentConfig(auto_augment="randaugment", randaugment_ops=0)).params(
        torch.arange(4), 0, 0, (32, 32)).policy_ops is None
    imgs, idx = images(16, 3, 32, 32, 5), torch.arange(16)
    flipped = batch_aug(AugmentConfig(hflip=1.0)).augment(imgs, idx, 0, 0)
    ba = batch_aug(AugmentConfig(hflip=1.0, auto_augment="trivialaugment"))
    p = ba.params(idx, 0, 0, (32, 32))
    assert torch.equal(ba.augment(imgs, idx, 0, 0), AA.apply_op(flipped, p.policy_ops[:, 0], p.policy_magnitude[:, 0],
                                                                "bilinear"))
    pre = Preprocess((32, 32), 3, (0.5,) * 3, (0.25,) * 3, "nearest")
    names = [type(op).__name__ for op in pre.train_transform(
        AugmentConfig(hflip=0.5, auto_augment="autoaugment", color_jitter=0.1, random_erasing=0.25)).transforms]
    assert names == ["ResizeCover", "CenterCrop", "ToImage", "RandomHorizontalFlip", "AutoAugment", "ColorJitter", "ToDtype",
                     "Normalize", "RandomErasing"]


# ---- random erasing ----

def torchvision_erase_box(u: list[float], height: int, width: int, p: float) -> list[int]:
    """RandomErasing (p, scale (0.02, 0.33), ratio (0.3, 3.3)) line by line, fed with our uniforms; [0, 0, 0, 0]
    where it leaves the image alone."""
    if not u[0] < p:
        return [0, 0, 0, 0]
    log_ratio = (math.log(0.3), math.log(3.3))
    for t in range(10):
        erase_area = height * width * (0.02 + (0.33 - 0.02) * u[1 + t])
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[11 + t])
        h = int(round(math.sqrt(erase_area * aspect_ratio)))
        w = int(round(math.sqrt(erase_area / aspect_ratio)))
        if h < height and w < width:
            return [int(u[21] * (height - h + 1)), int(u[22] * (width - w + 1)), h, w]
    return [0, 0, 0, 0]


@pytest.mark.parametrize("size,p", [((32, 32), 0.3), ((12, 40), 0.8)])
def test_erasing_boxes_follow_torchvision(size, p):
    n = 4000
    idx = torch.arange(n) * 7
    box = batch_aug(AugmentConfig(random_erasing=p), size).params(idx, 1, 3, size).erase
    u = counter_uniform(3, 1, idx, OP_RANDOM_ERASING, 23).double().tolist()
    assert box.tolist() == [torchvision_erase_box(row, *size, p) for row in u]
    erased = box[:, 2] > 0
    assert abs(erased.double().mean() - p) < 4 * math.sqrt(p * (1 - p) / n)
    h, w = box[erased, 2].double(), box[erased, 3].double()
    area = size[0] * size[1]
    assert ((h - 0.5) * (w - 0.5) <= 0.33 * area).all() and ((h + 0.5) * (w + 0.5) >= 0.02 * area).all()
    assert ((h - 0.5) / (w + 0.5) <= 3.3).all() and ((h + 0.5) / (w - 0.5) >= 0.3).all()
    assert (box[erased, 0] + h.long() <= size[0]).all() and (box[erased, 1] + w.long() <= size[1]).all()


def test_erasing_zeroes_the_box_of_the_normalized_image_as_torchvision_erase():
    imgs, idx = images(64, 3, 32, 32, 6), torch.arange(64) + 99
    aug = dict(crop_padding=2, hflip=0.5, auto_augment="randaugment")
    plain = batch_aug(AugmentConfig(**aug))(imgs, idx, 2, 0)
    ba = batch_aug(AugmentConfig(**aug, random_erasing=0.5))
    out, box = ba(imgs, idx, 2, 0), ba.params(idx, 2, 0, (32, 32)).erase
    assert 16 < (box[:, 2] > 0).sum() < 48
    for b in range(64):
        top, left, h, w = box[b].tolist()
        assert torch.equal(out[b], TF.erase(plain[b], top, left, h, w, torch.tensor(0.0)) if h else plain[b]), b
        assert (out[b, :, top:top + h, left:left + w] == 0).all()
    assert torch.equal(batch_aug(AugmentConfig(random_erasing=0.5)).augment(imgs, idx, 2, 0), as_float(imgs))


# ---- devices and the recipe ----

def test_no_host_round_trip_runs_on_the_meta_device():
    for policy in AA.POLICIES:
        ba = batch_aug(AugmentConfig(auto_augment=policy, random_erasing=0.5, hflip=0.5))
        imgs = torch.empty(8, 3, 32, 32, dtype=torch.uint8, device="meta")
        out = ba(imgs, torch.empty(8, dtype=torch.int64, device="meta"), 1, 2)
        assert out.device.type == "meta" and out.shape == (8, 3, 32, 32) and out.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_pixels():
    imgs, idx = images(256, 3, 32, 32, 7), torch.arange(256)
    for policy in AA.POLICIES:
        ba = batch_aug(AugmentConfig(auto_augment=policy, random_erasing=0.5))
        cpu, gpu = ba(imgs, idx, 1, 3), ba(imgs.cuda(), idx.cuda(), 1, 3).cpu()
        assert ((cpu - gpu).abs() > 1e-4).float().mean() < 0.01, policy


def test_recipe_keys_are_checked(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('name = "x"\n[data]\ndataset = "someone/tiny"\n[data.augment]\nauto_augment = "randaugmnet"\n'
                    'randaugment_ops = -1\nrandaugment_magnitude = 31\nrandom_erasing = 1.5\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value).split("\n")[1:] == [
        "  - data.augment.auto_augment: Input should be '', 'randaugment', 'trivialaugment' or 'autoaugment' "
        "(got 'randaugmnet')",
        "  - data.augment.randaugment_ops: Input should be greater than or equal to 0 (got -1)",
        "  - data.augment.randaugment_magnitude: Input should be less than or equal to 30 (got 31)",
        "  - data.augment.random_erasing: Input should be less than or equal to 1 (got 1.5)"]
    aug = AugmentConfig()
    assert (aug.auto_augment, aug.randaugment_ops, aug.randaugment_magnitude, aug.random_erasing) == ("", 2, 9, 0.0)
