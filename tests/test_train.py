"""The trainer end to end on CPU: it learns, writes exactly the files it promises, logs what it says."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, SHARED_DATA, write_recipe
from helpers import metrics_rows, only_run, relative_files, train_inprocess


@pytest.fixture
def folder_recipe(tmp_path, image_folder):
    return write_recipe(tmp_path / "tiny.toml", f'source = "folder"\nroot = "{image_folder}"')


def test_tiny_recipe_learns_and_writes_results(folder_recipe, tmp_path):
    assert train_inprocess(folder_recipe) == 0
    run = only_run(tmp_path / "runs")
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 30  # 160 images // 16 global batch x 3 epochs
    assert results["val"]["n"] == 40 and results["test"]["n"] == 40
    assert results["test"]["top1"] >= 0.9  # 4 classes: chance is 0.25
    train_losses = [r["loss"] for r in metrics_rows(run) if r["event"] == "train"]
    assert train_losses[-1] < 0.5 * train_losses[0]


def test_run_directory_holds_exactly_the_promised_files(folder_recipe, tmp_path):
    assert train_inprocess(folder_recipe) == 0
    run = only_run(tmp_path / "runs")
    artifact = {"model.safetensors", "config.json", "recipe.toml"}
    checkpoint = {"COMPLETE", "train_state.json", "model.safetensors", "optimizer.bin", "random_states_0.pkl",
                  "scheduler.json"}
    expected = {"recipe.toml", "env.json", "metrics.jsonl", "train.log", "results.json"}
    expected |= {f"model/{kind}/{f}" for kind in ("best", "last") for f in artifact}
    expected |= {f"checkpoints/step-{s:07d}/{f}" for s in (20, 30) for f in checkpoint}  # keep_last = 2
    expected |= {f"plots/{f}.png" for f in ("curves", "confusion_val", "confusion_test")}  # tracking.plots
    if json.loads((run / "results.json").read_text())["val"]["top1"] < 1.0:  # a gallery needs mistakes
        expected.add("plots/misclassified.png")
    assert relative_files(run) == expected


def test_metrics_jsonl_rows_and_keys(folder_recipe, tmp_path):
    assert train_inprocess(folder_recipe, "train.log_every_steps=5") == 0
    rows = metrics_rows(only_run(tmp_path / "runs"))
    train = [r for r in rows if r["event"] == "train"]
    val = [r for r in rows if r["event"] == "val"]
    test = [r for r in rows if r["event"] == "test"]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert set(train[0]) == {"event", "step", "time", "epoch", "loss", "lr", "images_per_s", "data_wait_fraction"}
    assert [(r["step"], r["epoch"]) for r in val] == [(10, 0), (20, 1), (30, 2)]
    assert set(val[0]) == {"event", "step", "time", "epoch", "loss", "top1", "macro_f1", "balanced_accuracy", "n",
                           "per_class_top1"}
    assert set(val[0]["per_class_top1"]) == {"a", "b", "c", "d"}
    assert len(test) == 1 and test[0]["n"] == 40


def test_artifact_config_describes_model_and_preprocessing(folder_recipe, tmp_path):
    assert train_inprocess(folder_recipe) == 0
    config = json.loads((only_run(tmp_path / "runs") / "model" / "best" / "config.json").read_text())
    assert config["format"] == "imgcls-artifact/1"
    assert config["model"] == {"name": "small_cnn", "args": {"width": 8, "dropout": 0.0}, "num_classes": 4,
                               "in_channels": 1}
    assert config["class_names"] == ["a", "b", "c", "d"]
    assert config["preprocess"] == {"image_size": [16, 16], "channels": 1, "mean": [0.5], "std": [0.25],
                                    "interpolation": "bilinear", "crop_pct": 1.0}


def test_env_json_records_versions_world_size_and_precision(folder_recipe, tmp_path):
    assert train_inprocess(folder_recipe, "train.mixed_precision=\"bf16\"", "train.epochs=1") == 0
    env = json.loads((only_run(tmp_path / "runs") / "env.json").read_text())
    assert env["world_size"] == 1 and env["mixed_precision"] == "bf16"
    assert env["per_device_batch_size"] == 16 and env["grad_accum_steps"] == 1
    assert {"torch", "accelerate", "datasets", "imgcls"} <= set(env["versions"])
    assert env["git_sha"]


def test_dry_run_prints_plan_and_trains_nothing(folder_recipe, tmp_path, capsys):
    assert train_inprocess(folder_recipe, "--dry-run", "train.epochs=2") == 0
    out = capsys.readouterr().out
    assert 'name = "tiny"' in out and "epochs = 2" in out
    assert ("tiny: 4 classes, train 160 / val 40 / test 40, model small_cnn" in out
            and "global batch 16 = 1 process(es) x 16 x 1 accumulation, 10 steps/epoch, 20 steps" in out)
    assert not (tmp_path / "runs").exists()


def test_batch_that_does_not_divide_is_a_clear_error(folder_recipe, tmp_path, capsys):
    code = train_inprocess(folder_recipe, "train.global_batch_size=15", "train.grad_accum_steps=2")
    assert code == 2
    err = capsys.readouterr().err
    assert "train.global_batch_size = 15 does not divide into 1 process(es) x 2 accumulation step(s)" in err
    assert not (tmp_path / "runs").exists()


def test_hub_layout_folder_trains_with_carved_val(tmp_path, hub_folder):
    recipe = write_recipe(tmp_path / "tiny.toml", f'source = "hub"\ndataset = "{hub_folder}"\nval_size = 32\n'
                                                  f'val_pick = "first"')
    assert train_inprocess(recipe, "train.epochs=1") == 0
    results = json.loads((only_run(tmp_path / "runs") / "results.json").read_text())
    assert results["val"]["n"] == 32 and results["test"]["n"] == 40 and results["steps"] == 128 // 16


def test_hub_unreachable_and_not_cached_is_one_clear_paragraph(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "tiny.toml", 'source = "hub"\ndataset = "someone/not-cached-anywhere"')
    assert train_inprocess(recipe) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "could not load it from the Hugging Face hub and it is not in the local cache" in err
    assert 'data.dataset="/data/mnist"' in err and 'data.source="folder"' in err


def test_memory_cache_gives_the_same_training_as_reading_files(tmp_path, image_folder):
    """data.cache = "memory" decodes once; the pixels, and so the trained weights, are the same."""
    from helpers import assert_same_weights, weights

    for cache, runs in (("none", "a"), ("memory", "b")):
        recipe = write_recipe(tmp_path / f"{runs}.toml", f'source = "folder"\nroot = "{image_folder}"\n'
                              f'cache = "{cache}"', output_dir=tmp_path / runs)
        assert train_inprocess(recipe, "train.epochs=1") == 0
    assert_same_weights(weights(only_run(tmp_path / "a") / "model" / "last"),
                        weights(only_run(tmp_path / "b") / "model" / "last"))


def test_evaluate_before_train_logs_val_at_step_zero(folder_recipe, tmp_path):
    assert train_inprocess(folder_recipe, "train.evaluate_before_train=true", "train.epochs=1") == 0
    val = [r for r in metrics_rows(only_run(tmp_path / "runs")) if r["event"] == "val"]
    assert [r["step"] for r in val] == [0, 10]
    assert val[0]["n"] == 40 and val[0]["loss"] > val[1]["loss"]  # the untrained model, then the trained one


@pytest.mark.skipif(not (SHARED_DATA.parent / "tools" / "seed-hf-cache").is_file(),
                    reason="../shared/tools/seed-hf-cache not found (only CI and dev machines have it)")
def test_shipped_mnist_recipe_resolves_the_hub_name_from_the_datasets_cache(tmp_path):
    """`HF_HUB_OFFLINE=1 ... recipes/mnist.toml` as shipped: ylecun/mnist comes from the local datasets cache
    through the hub code path, with the classic 55,000 / 5,000 / 10,000 split."""
    import os
    import subprocess
    import sys

    cache = os.environ["HF_DATASETS_CACHE"]  # a fresh one per test (conftest)
    seeded = subprocess.run([str(SHARED_DATA.parent / "tools" / "seed-hf-cache"), sys.executable],
                            capture_output=True, text=True, env={**os.environ, "HF_DATASETS_CACHE": cache})
    assert seeded.returncode == 0, seeded.stderr
    # a subprocess: `datasets` fixes its cache folder when first imported, and this process imported it earlier
    done = subprocess.run([sys.executable, "-m", "imgcls.train", str(REPO / "recipes" / "mnist.toml"), "--dry-run"],
                          capture_output=True, text=True, env={**os.environ, "HF_DATASETS_CACHE": cache})
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert 'dataset = "ylecun/mnist"' in out
    assert "mnist: 10 classes, train 55000 / val 5000 / test 10000, model small_cnn" in out


def test_a_checkpoint_is_logged_once_by_its_final_path(folder_recipe, tmp_path):
    assert train_inprocess(folder_recipe, "train.epochs=1") == 0
    run = only_run(tmp_path / "runs")
    text = (run / "train.log").read_text()
    assert f"checkpoint at step 10 -> {run / 'checkpoints' / 'step-0000010'}" in text
    assert ".tmp" not in text  # accelerate's per-file lines name the temporary folder
