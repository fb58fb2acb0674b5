"""Probe, then fine-tune ([probe], recipes/probe_folder.toml and finetune_folder.toml): the head fitted on cached
features of the frozen backbone, the feature cache's key, stage 1 and stage 2 as ordinary parts of a run (rows,
best model, export), and exact resume after a SIGKILL in either stage."""
from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import write_recipe
from helpers import (assert_same_run, kill_mid_epoch_then_resume, metrics_rows, only_run, run_train,
                     subprocess_env, train_cmd, train_inprocess, weights)
from imgcls.data.fingerprint import frame_inputs
from imgcls.data.loaders import build_splits
from imgcls.models.registry import build_model
from imgcls.recipe import ModelConfig, load_recipe
from imgcls.errors import RecipeError
from imgcls.training.checkpoint import complete_checkpoints
from imgcls.training.features import FeatureCache, model_identity
from imgcls.training.probe import fit_probe

EPS32 = torch.finfo(torch.float32).eps


def _backbone_file(path, seed=123):
    """A small_cnn's tensors (4 classes, 16 px gray) as a safetensors file: the 'pretrained' weights."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="small_cnn", args={"width": 8, "dropout": 0.0}), 4, 1, (16, 16))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _probe_recipe(tmp_path, image_folder, epochs=0, extra="", file="tiny.toml", probe="", out=None):
    weights_file = _backbone_file(tmp_path / "backbone.safetensors")
    recipe = write_recipe(tmp_path / file, f'source = "folder"\nroot = "{image_folder}"', extra=extra,
                          output_dir=out)
    text = recipe.read_text().replace(
        "[optim]", f'train_mode = "finetune"\nweights = "{weights_file}"\nfreeze_bn = true\n[optim]')
    text = text.replace("epochs = 3", f"epochs = {epochs}")
    text = text.replace("[checkpoint]", f"[probe]\nenabled = true\n{probe}\n[checkpoint]")
    recipe.write_text(text.replace("lr = 0.1", "lr = 0.001"))  # a separable toy: the probe head is large
    return recipe


# ---------------------------------------------------------------- the fit
def test_the_fitted_head_takes_raw_features_and_its_l2_has_the_lowest_val_loss():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 6, generator=g) * 2
    y, vy = torch.arange(60) % 3, torch.arange(30) % 3
    x = centers[y] * torch.tensor([1, 10, 100, 0.1, 1, 1]) + torch.randn(60, 6, generator=g) + 5
    vx = centers[vy] * torch.tensor([1, 10, 100, 0.1, 1, 1]) + torch.randn(30, 6, generator=g) + 5
    fit = fit_probe(x, y, vx, vy, 3, [1e-3, 1e-1, 1.0], 100)
    assert [r["l2"] for r in fit.tried] == [1e-3, 1e-1, 1.0]
    assert fit.l2 == min(fit.tried, key=lambda r: r["val_loss"])["l2"]
    logits = vx @ fit.weight.T + fit.bias  # the standardisation is folded in: raw features in
    assert F.cross_entropy(logits.double(), vy).item() == pytest.approx(fit.val_loss, rel=1e3 * EPS32)
    assert fit.val_top1 == (logits.argmax(1) == vy).double().mean().item()
    again = fit_probe(x, y, vx, vy, 3, [1e-3, 1e-1, 1.0], 100)
    assert torch.equal(again.weight, fit.weight) and torch.equal(again.bias, fit.bias)  # deterministic


def test_recipe_errors_name_the_fix(tmp_path, image_folder):
    recipe = write_recipe(tmp_path / "r.toml", f'source = "folder"\nroot = "{image_folder}"')
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe, ["train.epochs=0"])
    assert ("train.epochs = 0 trains nothing: set train.epochs >= 1, or probe.enabled = true for a probe-only run"
            in str(e.value))
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe, ["probe.enabled=true"])
    assert "probe.enabled = true fits a head on the features of pretrained weights: set model.pretrained" \
           in str(e.value)
    with pytest.raises(RecipeError, match=r"probe\.l2: List should have at least 1 item"):
        load_recipe(recipe, ["probe.l2=[]"])


# ---------------------------------------------------------------- the feature cache
def test_the_feature_key_changes_with_weights_preprocessing_views_and_any_image(tmp_path, image_folder):
    recipe = _probe_recipe(tmp_path, image_folder)
    r = load_recipe(recipe)
    train = build_splits(r.data).train
    model = build_model(r.model, 4, 1, (16, 16))
    ident = model_identity(model, "head", r.model.name, {})
    cache = FeatureCache(tmp_path / "c", ident, "no")
    frame = frame_inputs("eval", (16, 16), 1, "bilinear", 1.0)
    key = cache.key(train, frame, 0, None, None)
    assert cache.key(train, frame, 0, None, None) == key  # the same inputs find the same file

    with torch.no_grad():  # the head does not make the features: not part of the key
        model.head.weight.add_(1)
    assert FeatureCache(tmp_path / "c", model_identity(model, "head", r.model.name, {}), "no").key(
        train, frame, 0, None, None) == key
    with torch.no_grad():
        model.features[0][0].weight.view(-1)[0] += 1e-3  # one backbone number
    changed = {"weights": FeatureCache(tmp_path / "c", model_identity(model, "head", r.model.name, {}), "no").key(
        train, frame, 0, None, None)}
    changed["precision"] = FeatureCache(tmp_path / "c", ident, "bf16").key(train, frame, 0, None, None)
    changed["preprocessing"] = cache.key(train, frame_inputs("eval", (16, 16), 1, "bicubic", 1.0), 0, None, None)
    changed["crop"] = cache.key(train, frame_inputs("eval", (16, 16), 1, "bilinear", 0.875), 0, None, None)
    augment = r.data.augment.model_dump(mode="json")
    changed["view"] = cache.key(train, frame, 1, augment, 0)
    changed["augment"] = cache.key(train, frame, 1, {**augment, "hflip": 0.5}, 0)
    changed["seed"] = cache.key(train, frame, 1, augment, 1)
    image = sorted((image_folder / "train" / "a").iterdir())[3]
    stat = image.stat()
    image.write_bytes(image.read_bytes()[::-1][::-1] + b"\0")  # one more byte
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed["image"] = cache.key(train, frame, 0, None, None)
    assert len(set(changed.values()) | {key}) == len(changed) + 1, changed


def test_a_second_run_reads_the_cached_features_and_a_changed_image_is_computed_anew(tmp_path, image_folder):
    recipe = _probe_recipe(tmp_path, image_folder, probe="views = 2")
    assert train_inprocess(recipe) == 0
    first = next(r for r in metrics_rows(only_run(tmp_path / "runs")) if r["event"] == "probe")
    assert (first["feature_sets"], first["feature_sets_cached"], first["train_features"]) == (3, 0, 320)
    assert len(list((tmp_path / "imgcls_cache" / "features").glob("*.safetensors"))) == 3
    assert train_inprocess(recipe, "checkpoint.output_dir=" + str(tmp_path / "runs2")) == 0
    second = next(r for r in metrics_rows(only_run(tmp_path / "runs2")) if r["event"] == "probe")
    assert second["feature_sets_cached"] == 3 and second["l2"] == first["l2"] and second["tried"] == first["tried"]

    image = sorted((image_folder / "train" / "b").iterdir())[0]
    image.write_bytes(image.read_bytes())  # the same bytes, a new mtime: the key cannot prove it unchanged
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert train_inprocess(recipe, "checkpoint.output_dir=" + str(tmp_path / "runs3")) == 0
    third = next(r for r in metrics_rows(only_run(tmp_path / "runs3")) if r["event"] == "probe")
    assert third["feature_sets_cached"] == 1  # val only: both train views are computed again


# ---------------------------------------------------------------- the run
def test_probe_only_run_tests_the_probed_model_and_its_val_row_is_the_model_s(tmp_path, image_folder):
    recipe = _probe_recipe(tmp_path, image_folder)
    assert train_inprocess(recipe) == 0
    run = only_run(tmp_path / "runs")
    results = json.loads((run / "results.json").read_text())
    assert (results["steps"], results["best_epoch"], results["best_step"]) == (0, 0, 0)
    rows = metrics_rows(run)
    assert [r["event"] for r in rows if r["event"] in ("probe", "val", "test", "train")] == ["probe", "val", "test"]
    val_row = next(r for r in rows if r["event"] == "val")
    # the val row comes from the cached features; results.json's val from the model itself, at the end
    assert val_row["top1"] == results["val"]["top1"]
    assert val_row["loss"] == pytest.approx(results["val"]["loss"], rel=1e-4)
    probed, start = weights(run / "model" / "best"), load_file(str(tmp_path / "backbone.safetensors"))
    assert all(torch.equal(probed[k], start[k]) for k in start if not k.startswith("head."))  # frozen: unchanged
    assert not torch.equal(probed["head.weight"], start["head.weight"])
    assert [c.name for c in complete_checkpoints(run)] == ["step-0000000"]


def test_probe_then_finetune_starts_from_the_probe_and_its_export_keeps_parity(tmp_path, image_folder):
    pytest.importorskip("onnxruntime", reason="in the export extra")
    recipe = _probe_recipe(tmp_path, image_folder, epochs=1)
    recipe.write_text(recipe.read_text() + '[export]\nformats = ["onnx"]\n')
    assert train_inprocess(recipe) == 0
    run = only_run(tmp_path / "runs")
    rows = metrics_rows(run)
    vals = [(r["step"], r["epoch"]) for r in rows if r["event"] == "val"]
    assert vals == [(0, 0), (10, 0)]  # the probe, then stage 2's one epoch of 10 steps
    results = json.loads((run / "results.json").read_text())
    assert results["export"]["passed"] is True
    report = json.loads((run / "model" / "best" / "export" / "export_report.json").read_text())
    assert report["formats"]["onnx"]["max_abs_diff"] <= 1e-3
    probe_val = next(r for r in rows if r["event"] == "val")["top1"]
    assert results["val"]["top1"] >= probe_val  # the probe is a candidate for best: never below it on val


def test_sigkill_in_stage_2_then_resume_auto_is_bit_identical(tmp_path, image_folder):
    recipe = _probe_recipe(tmp_path, image_folder, epochs=2, extra="every_steps = 4", out=tmp_path / "killed")
    straight = _probe_recipe(tmp_path, image_folder, epochs=2, extra="every_steps = 4", file="straight.toml",
                             out=tmp_path / "straight")
    assert run_train(straight).returncode == 0
    resumed = kill_mid_epoch_then_resume(recipe, tmp_path / "killed", step=12)
    assert_same_run(resumed, only_run(tmp_path / "straight"))


def test_sigkill_in_stage_1_then_resume_auto_fits_the_probe_again_and_matches(tmp_path, image_folder):
    recipe = _probe_recipe(tmp_path, image_folder, epochs=1, probe="views = 8", out=tmp_path / "killed")
    straight = _probe_recipe(tmp_path, image_folder, epochs=1, probe="views = 8", file="straight.toml",
                             out=tmp_path / "straight")
    features = tmp_path / "imgcls_cache" / "features"
    env = {**subprocess_env(), "IMGCLS_CACHE": str(tmp_path / "imgcls_cache")}
    proc = subprocess.Popen(train_cmd(recipe), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=recipe.parent)
    while proc.poll() is None and not list(features.glob("*.safetensors")):
        pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = only_run(tmp_path / "killed")
    assert not complete_checkpoints(killed), "the kill must land in stage 1, before the step-0 checkpoint"
    assert 1 <= len(list(features.glob("*.safetensors"))) < 9
    done = subprocess.run(train_cmd(recipe, "--resume", "auto"), capture_output=True, text=True, env=env,
                          cwd=recipe.parent, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed = [p for p in (tmp_path / "killed" / "tiny").iterdir() if p != killed]  # nothing to resume: anew
    assert len(resumed) == 1
    assert subprocess.run(train_cmd(straight), env=env, cwd=recipe.parent, timeout=300).returncode == 0
    assert_same_run(resumed[0], only_run(tmp_path / "straight"))
    probe = next(r for r in metrics_rows(resumed[0]) if r["event"] == "probe")
    assert probe["feature_sets_cached"] >= 1  # what the killed run computed was kept


@pytest.mark.slow
def test_two_processes_fit_the_probe_on_every_feature_once_and_share_its_head(tmp_path, image_folder):
    """Features computed half by each process and gathered (no duplicates: 160 train, 40 val), the head fitted
    once and broadcast: the probe row and the probed model match a one-process run."""
    import socket
    import sys

    one = _probe_recipe(tmp_path, image_folder, out=tmp_path / "one")
    assert train_inprocess(one) == 0
    two = _probe_recipe(tmp_path, image_folder, file="two.toml", out=tmp_path / "two")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**subprocess_env(), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "IMGCLS_CACHE": str(tmp_path / "cache2")}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--main_process_port", str(port), "-m", "imgcls.train", str(two)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run1, run2 = only_run(tmp_path / "one"), only_run(tmp_path / "two")
    p1, p2 = ([r for r in metrics_rows(run) if r["event"] == "probe"] for run in (run1, run2))
    assert len(p2) == 1 and (p2[0]["train_features"], p2[0]["l2"]) == (p1[0]["train_features"], p1[0]["l2"]) == \
        (160, p1[0]["l2"])
    assert p2[0]["val_loss"] == pytest.approx(p1[0]["val_loss"], rel=1e-4)
    w1, w2 = weights(run1 / "model" / "best"), weights(run2 / "model" / "best")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    results = [json.loads((run / "results.json").read_text()) for run in (run1, run2)]
    assert [r["test"]["top1"] for r in results] == [results[0]["test"]["top1"]] * 2
