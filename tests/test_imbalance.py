"""Class imbalance: macro-F1 / balanced accuracy from the confusion matrix, balanced class weights in the loss,
the balanced sampler (a pure function of (seed, epoch), exact on resume), and model selection by the new metrics."""
from __future__ import annotations

import json
import logging
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import pattern_image, write_recipe
from helpers import assert_same_run, kill_mid_epoch_then_resume, metrics_rows, only_run, train_inprocess
from imgcls.data.loaders import build_splits, make_datasets, make_loader, train_sampler
from imgcls.data.imbalance import BalancedSampler, class_weights, describe_weights, split_labels
from imgcls.training.metrics import balanced_accuracy, macro_f1, scalars
from imgcls.recipe import DataConfig, load_recipe
from imgcls.errors import DataError, RecipeError
from imgcls.data.split import Split

SKEW = {"a": 72, "b": 72, "c": 8, "d": 8}  # 160 train images: 10 steps of 16 per epoch


def write_skewed_folders(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """root/<class>/*.png with `counts[class]` learnable images of class index k (the dict's order)."""
    rng = np.random.default_rng(seed)
    for k, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pattern_image(k, 16, rng).save(root / name / f"{i:04d}.png")
    return root


@pytest.fixture
def skewed_folder(tmp_path) -> Path:
    root = tmp_path / "skewed"
    write_skewed_folders(root / "train", SKEW, seed=0)
    write_skewed_folders(root / "val", dict.fromkeys(SKEW, 10), seed=1)
    write_skewed_folders(root / "test", dict.fromkeys(SKEW, 10), seed=2)
    return root


# ---------------------------------------------------------------- metrics from the confusion matrix
def test_macro_f1_and_balanced_accuracy_by_hand_with_a_class_never_predicted():
    # rows: true class, columns: predicted. Class 2 is never predicted; class 3 never occurs at all.
    confusion = torch.tensor([[3, 1, 0, 0],
                              [1, 2, 0, 0],
                              [2, 1, 0, 0],
                              [0, 0, 0, 0]])
    # recall: 3/4, 2/3, 0 (class 3 has no support: left out, as sklearn's balanced_accuracy_score does)
    assert balanced_accuracy(confusion) == pytest.approx(float((Fraction(3, 4) + Fraction(2, 3) + 0) / 3), abs=1e-15)
    # F1 = 2 tp / (support + predicted): 6/10, 4/7, 0/3; class 3 is neither true nor predicted: left out
    assert macro_f1(confusion) == pytest.approx(float((Fraction(6, 10) + Fraction(4, 7) + 0) / 3), abs=1e-15)
    assert balanced_accuracy(torch.zeros(3, 3, dtype=torch.long)) == 0.0
    assert macro_f1(torch.zeros(3, 3, dtype=torch.long)) == 0.0


def test_a_perfect_and_a_constant_classifier():
    assert macro_f1(torch.diag(torch.tensor([5, 1, 2]))) == 1.0
    assert balanced_accuracy(torch.diag(torch.tensor([5, 1, 2]))) == 1.0
    always_0 = torch.tensor([[9, 0], [1, 0]])  # top1 0.9 on a 9:1 split, but half the classes are never right
    assert balanced_accuracy(always_0) == 0.5
    assert macro_f1(always_0) == pytest.approx((18 / 19 + 0) / 2, abs=1e-15)


def test_scalars_carry_the_new_metrics_and_not_the_matrix():
    metrics = {"loss": 1.0, "top1": 0.5, "n": 4, "confusion": torch.eye(2), "macro_f1": 0.4,
               "balanced_accuracy": 0.45}
    assert scalars(metrics) == {"loss": 1.0, "top1": 0.5, "n": 4, "macro_f1": 0.4, "balanced_accuracy": 0.45}


def test_repeated_draws_of_one_image_get_their_own_augmentation(skewed_folder):
    """#19.3: the balanced sampler draws each of the 8 images of class c about 5 times an epoch. Keyed on
    (seed, epoch, position), every draw of an image got the same crop and flip (a minority image drawn 39 times
    gave 1 distinct view); keyed on the draw, they differ as the draws of different images do."""
    from accelerate import Accelerator
    from imgcls.recipe import AugmentConfig

    cfg = DataConfig(source="folder", root=str(skewed_folder), image_size=(16, 16), channels=1, mean=[0.5],
                     std=[0.25], sampler="balanced", augment=AugmentConfig(crop_padding=4, hflip=0.5))
    splits = build_splits(cfg)
    sampler = train_sampler(splits.train, cfg, 5, 1, 16, 10)
    dataset = make_datasets(splits, cfg, 5)["train"]
    loader = Accelerator(cpu=True).prepare(make_loader(dataset, 16, cfg, True, 5, sampler))
    loader.set_epoch(0)
    dataset.set_augment_epoch(0)
    labels = split_labels(splits.train)
    inputs = torch.cat([dataset.model_input(images, keys) for images, _, keys in loader])
    views: dict[int, list[bytes]] = {}
    for image, position in zip(inputs, sampler.sequence(0).tolist()):  # the loader follows the sequence (below)
        views.setdefault(position, []).append(image.numpy().tobytes())
    minority = [p for p in views if labels[p] >= 2]
    draws = sum(len(views[p]) for p in minority)
    distinct = sum(len(set(views[p])) for p in minority)
    assert draws >= 60  # about half of 160: 16 images drawn about 5 times each
    assert distinct / draws > 0.8, (distinct, draws)  # 16 / draws (about 0.25) when keyed on the position


# ---------------------------------------------------------------- class weights
def test_balanced_class_weights_follow_the_formula_on_a_skewed_split():
    labels = [0] * 60 + [1] * 30 + [2] * 10
    w = class_weights(labels, ["x", "y", "z"])
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx([100 / (3 * 60), 100 / (3 * 30), 100 / (3 * 10)], rel=1e-7)
    assert describe_weights(w, ["x", "y", "z"]) == "x 0.5556, y 1.111, z 3.333"


def test_a_class_without_train_images_has_no_balanced_weight():
    with pytest.raises(DataError) as e:
        class_weights([0, 0, 2], ["x", "y", "z"])
    assert str(e.value) == ("train.class_weights = \"balanced\": class(es) ['y'] have no image in the train split, "
                            "so their weight n / (classes x count) is undefined; add train images of them or set "
                            "train.class_weights = \"none\"")


def test_split_labels_follow_the_positions_of_a_subset():
    split = Split("train", [0, 1, 1, 2, 2, 2], reader=None, indices=[5, 0, 3])
    assert split_labels(split).tolist() == [2, 0, 2]


# ---------------------------------------------------------------- balanced sampler
def test_balanced_sampler_draws_each_class_about_equally_on_a_9_to_1_split():
    labels = np.array([0] * 9000 + [1] * 1000)
    sampler = BalancedSampler(labels, seed=7)
    assert len(sampler) == 10000
    for epoch in range(3):
        drawn = sampler.sequence(epoch)
        assert len(drawn) == 10000 and drawn.min() >= 0 and drawn.max() < 10000
        share = np.bincount(labels[drawn], minlength=2) / len(drawn)
        assert abs(share[1] - 0.5) < 0.02, share  # binomial sd 0.005: 4 sd
        # with replacement: the 1,000 minority images fill about half the epoch, so most repeat
        assert len(np.unique(drawn[labels[drawn] == 1])) < 1000


def test_balanced_sampler_order_is_a_function_of_seed_and_epoch():
    """Not of the global RNGs, nor of the process: the same order after other draws and in a fresh interpreter;
    another epoch or seed gives another. The keys count each position's earlier draws, by hand."""
    import subprocess
    import sys

    labels = [0] * 90 + [1] * 10
    a = BalancedSampler(labels, seed=3)
    a.set_epoch(4)
    first = list(a)
    np.random.seed(123), torch.manual_seed(9), np.random.rand(5), torch.rand(5)  # disturb every global RNG
    b = BalancedSampler(labels, seed=3)
    b.set_epoch(4)
    code = ("from imgcls.data.imbalance import BalancedSampler; s = BalancedSampler([0] * 90 + [1] * 10, seed=3); "
            "s.set_epoch(4); print(list(s))")
    elsewhere = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert first == list(b) == json.loads(elsewhere)
    seen: dict[int, int] = {}
    for key in first:
        position = key % 100
        assert key // 100 == seen.get(position, 0)  # the n-th repeat of a position has key position + 100 n
        seen[position] = seen.get(position, 0) + 1
    assert [k % 100 for k in first] == a.sequence(4).tolist() and max(seen.values()) > 1
    assert not np.array_equal(a.sequence(4), a.sequence(5))
    assert not np.array_equal(a.sequence(4), BalancedSampler(labels, seed=4).sequence(4))


def test_the_prepared_train_loader_follows_the_sampler_each_epoch(skewed_folder):
    from accelerate import Accelerator

    cfg = DataConfig(source="folder", root=str(skewed_folder), image_size=(16, 16), channels=1, mean=[0.5],
                     std=[0.25], sampler="balanced")
    splits = build_splits(cfg)
    sampler = train_sampler(splits.train, cfg, 5, 1, 16, 10)
    assert isinstance(sampler, BalancedSampler)
    loader = Accelerator(cpu=True).prepare(make_loader(make_datasets(splits, cfg, 5)["train"], 16, cfg, True, 5,
                                                       sampler))
    labels = split_labels(splits.train)
    for epoch in (0, 2):
        loader.set_epoch(epoch)
        batches = list(loader)
        keys = torch.cat([p for _, _, p in batches])
        assert keys.tolist() == sampler.keys(epoch).tolist()  # 160 = 10 whole batches
        positions = (keys % 160).tolist()  # a repeated draw's key is position + 160 x repeat
        assert positions == sampler.sequence(epoch).tolist()
        assert torch.cat([y for _, y, _ in batches]).tolist() == labels[positions].tolist()
    shares = np.bincount(labels[sampler.sequence(0)], minlength=4) / 160
    assert shares.min() > 0.15 and shares.max() < 0.35  # 45% / 45% / 5% / 5% without it


def test_balanced_sampler_is_refused_with_shards_and_without_shuffle(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "r"\n[data]\nsource = "shards"\nroot = "s"\nsampler = "balanced"\nshuffle = false\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe)
    assert str(e.value) == (
        f"{recipe}: 1 problem in the recipe:\n  - data: sampler = 'balanced' does not apply to source = 'shards': "
        "shards are read in their own order (each process reads its own run of shards); use sampler = 'shuffle', "
        "or train from the folder, list file or hub source to balance classes; sampler = 'balanced' draws a random "
        "sample every epoch: it needs shuffle = true")


# ---------------------------------------------------------------- in the trainer
def _recipe(tmp_path: Path, folder: Path, runs: str, data: str = "", train: str = "", checkpoint: str = "",
            augment: str = "crop_padding = 2\nhflip = 0.5") -> Path:
    recipe = write_recipe(tmp_path / f"{runs}.toml", f'source = "folder"\nroot = "{folder}"\n{data}', checkpoint,
                          output_dir=tmp_path / runs, augment=augment)
    recipe.write_text(recipe.read_text().replace("[train]", f"[train]\n{train}"))
    return recipe


@pytest.mark.slow
def test_balanced_class_weights_with_smoothing_and_mixup_are_logged_and_the_model_learns(tmp_path, skewed_folder,
                                                                                        caplog):
    recipe = _recipe(tmp_path, skewed_folder, "w", train='class_weights = "balanced"\nlabel_smoothing = 0.1',
                     checkpoint='select_metric = "balanced_accuracy"', augment="mixup_alpha = 0.2")
    with caplog.at_level(logging.INFO, logger="imgcls.train"):
        assert train_inprocess(recipe) == 0
    said = [r.getMessage() for r in caplog.records if "train.class_weights" in r.getMessage()]
    # once; 160 / (4 x 72) and 160 / (4 x 8); the logger adds "[RANK 0] " in front
    assert len(said) == 1 and said[0].endswith('train.class_weights = "balanced": a 0.5556, b 0.5556, c 5, d 5')
    run = only_run(tmp_path / "w")
    rows = metrics_rows(run)
    losses = [r["loss"] for r in rows if r["event"] == "train"]
    assert losses[-1] < 0.7 * losses[0]
    val = [r for r in rows if r["event"] == "val"]
    for row in val:  # val has every class: balanced accuracy is the mean of the per-class recalls
        assert row["balanced_accuracy"] == pytest.approx(np.mean(list(row["per_class_top1"].values())), abs=1e-12)
        assert 0.0 <= row["macro_f1"] <= 1.0
    results = json.loads((run / "results.json").read_text())
    scores = [r["balanced_accuracy"] for r in val]
    assert results["select_metric"] == "balanced_accuracy"
    assert results["best_epoch"] == scores.index(max(scores))  # the first of the highest
    best = json.loads((run / "model" / "best" / "config.json").read_text())
    assert best["val"]["balanced_accuracy"] == max(scores)
    assert results["test"]["balanced_accuracy"] > 0.5  # 4 classes: chance is 0.25


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_with_the_balanced_sampler_is_bit_identical(tmp_path, skewed_folder):
    def recipe(runs: str) -> Path:
        r = _recipe(tmp_path, skewed_folder, runs, data='sampler = "balanced"',
                    checkpoint="every_steps = 3\nkeep_last = 3")
        r.write_text(r.read_text().replace("dropout = 0.0", "dropout = 0.2"))
        return r

    straight = recipe("a")
    assert train_inprocess(straight) == 0
    run_a = only_run(tmp_path / "a")

    assert_same_run(run_a, kill_mid_epoch_then_resume(recipe("b"), tmp_path / "b"))
