"""Calibration (temperature scaling, ECE), the trainer storing T in the artifact, and imgcls-eval's report."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from conftest import write_class_folders
from imgcls.training.calibration import calibrate, fit_temperature
from imgcls.inference.calibration import ece, softmax
from imgcls.inference.evaluate import main as eval_main, per_class_scores


@pytest.fixture(scope="module")
def run(tiny_run):
    """The session's tiny model (conftest.tiny_run): one epoch, good, not perfect, so the temperature has
    something to fit."""
    return tiny_run


# ---------------------------------------------------------------- calibration
def overconfident(n: int = 4000, classes: int = 5, sharpen: float = 3.0, seed: int = 0):
    """Labels drawn from softmax(logits): calibrated by construction; then the logits are multiplied by 3."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, classes))
    probs = softmax(logits)
    labels = np.array([rng.choice(classes, p=p) for p in probs])
    return logits * sharpen, labels


def test_temperature_fit_undoes_overconfidence():
    logits, labels = overconfident()
    result = calibrate(logits, labels)
    assert 2.6 < result["temperature"] < 3.4  # the true factor is 3
    assert result["ece_after"] < 0.03 < 0.15 < result["ece_before"]
    assert result["nll_after"] < result["nll_before"]
    assert fit_temperature(logits / 3, labels) == pytest.approx(1.0, abs=0.15)


def ece_worsened_by_fit():
    """2 classes, 100 images: 90 right at confidence 0.9 (calibrated), 10 wrong at confidence sigmoid(6). The NLL
    wants a larger T (it softens the 10 confident mistakes), which drags the 90 below their 90 % accuracy."""
    logits = np.zeros((100, 2))
    logits[:90, 0] = np.log(9.0)  # softmax -> 0.9
    logits[90:, 0] = 6.0
    labels = np.r_[np.zeros(90, int), np.ones(10, int)]
    return logits, labels


def test_a_temperature_that_makes_ece_worse_is_not_kept(caplog):
    logits, labels = ece_worsened_by_fit()
    fitted = fit_temperature(logits, labels)
    sig6 = 1 / (1 + np.exp(-6.0))
    by_hand = 0.9 * abs(1.0 - 0.9) + 0.1 * abs(0.0 - sig6)  # two occupied bins at T = 1
    fitted_conf = softmax(logits / fitted)[:, 0]
    by_hand_fitted = 0.9 * abs(1.0 - fitted_conf[0]) + 0.1 * fitted_conf[-1]
    with caplog.at_level(logging.INFO):
        result = calibrate(logits, labels)
    assert 1.5 < fitted < 5 and result["fitted_temperature"] == fitted
    assert result["temperature"] == 1.0 and result["kept_at_1"] is True
    assert result["ece_before"] == pytest.approx(by_hand) and result["ece_after"] == result["ece_before"]
    assert result["ece_fitted"] == pytest.approx(by_hand_fitted) and result["ece_fitted"] > result["ece_before"]
    assert result["nll_after"] == result["nll_before"]
    assert [r.getMessage() for r in caplog.records] == [
        f"calibration: the fitted temperature {fitted:.4f} would raise the validation ECE from {by_hand:.4f} to "
        f"{by_hand_fitted:.4f}, so the temperature is kept at 1 (the model's own probabilities)"]


def test_a_temperature_that_improves_ece_is_kept(caplog):
    logits, labels = overconfident()
    with caplog.at_level(logging.INFO):
        result = calibrate(logits, labels)
    assert result["temperature"] == result["fitted_temperature"] and result["kept_at_1"] is False
    assert result["ece_after"] == result["ece_fitted"] < result["ece_before"]
    assert not caplog.records


def test_calibrate_artifact_writes_t_1_and_both_eces_when_the_fit_would_hurt(tmp_path):
    from imgcls.training.calibration import calibrate_artifact

    (tmp_path / "config.json").write_text(json.dumps({"class_names": ["a", "b"], "temperature": 1.0}))
    logits, labels = ece_worsened_by_fit()
    result = calibrate_artifact(logits, labels, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["temperature"] == 1.0 and config["calibration"] == result
    assert config["calibration"]["kept_at_1"] is True
    assert config["calibration"]["ece_fitted"] > config["calibration"]["ece_before"]


def test_ece_is_zero_on_perfectly_calibrated_bins_and_large_when_not():
    confidence = np.repeat([0.35, 0.6, 0.75, 0.9, 1.0], 20)
    correct = np.concatenate([np.arange(20) < k for k in (7, 12, 15, 18, 20)])  # accuracy == confidence per bin
    assert ece(confidence, correct) == pytest.approx(0.0, abs=1e-12)
    assert ece(np.full(100, 0.95), np.arange(100) < 50) == pytest.approx(0.45)


def test_all_correct_validation_leaves_temperature_at_one():
    logits = np.eye(3)[np.arange(30) % 3] * 4
    assert calibrate(logits, np.arange(30) % 3)["temperature"] == 1.0


def test_training_stores_temperature_in_best_artifact_and_results(run):
    results = json.loads((run / "results.json").read_text())
    cal = results["calibration"]
    assert set(cal) >= {"temperature", "ece_before", "ece_after"} and cal["n"] == 40 and cal["bins"] == 15
    config = json.loads((run / "model" / "best" / "config.json").read_text())
    assert config["temperature"] == cal["temperature"] != 1.0
    assert config["calibration"] == cal and cal["nll_after"] <= cal["nll_before"]
    assert cal["kept_at_1"] is False and cal["fitted_temperature"] == cal["temperature"]
    assert cal["ece_after"] == cal["ece_fitted"] <= cal["ece_before"]
    assert not list((run / "model" / "best").glob(".*"))  # no temp file left behind
    assert f"ECE (15 bins) {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}" in (run / "train.log").read_text()


# ---------------------------------------------------------------- per-class scores
def test_per_class_scores_match_a_hand_computation():
    confusion = [[5, 1, 0],   # true a: 5 right, 1 called b
                 [2, 3, 1],   # true b
                 [0, 0, 4]]   # true c
    s = per_class_scores(np.array(confusion), ["a", "b", "c"])
    assert s["a"]["precision"] == pytest.approx(5 / 7) and s["a"]["recall"] == pytest.approx(5 / 6)
    assert s["b"]["precision"] == pytest.approx(3 / 4) and s["b"]["recall"] == pytest.approx(3 / 6)
    assert s["c"]["precision"] == pytest.approx(4 / 5) and s["c"]["recall"] == pytest.approx(1.0)
    assert s["b"]["f1"] == pytest.approx(2 * 0.75 * 0.5 / 1.25)
    assert [s[c]["support"] for c in "abc"] == [6, 6, 4]
    assert per_class_scores(np.array([[0, 0], [3, 0]]), ["x", "y"])["y"] == {"precision": 0.0, "recall": 0.0,
                                                                            "f1": 0.0, "support": 3}


# ---------------------------------------------------------------- imgcls-eval
def test_eval_report_json_pngs_and_summary(run, capsys):
    best = run / "model" / "best"
    assert eval_main([str(best)]) == 0
    report = json.loads((best / "eval" / "eval_test.json").read_text())
    results = json.loads((run / "results.json").read_text())
    assert report["n"] == 40 and report["accuracy"] == pytest.approx(results["test"]["top1"])
    assert report["temperature"] == results["calibration"]["temperature"] and "top5" not in report  # 4 classes
    confusion = np.array(report["confusion"])
    assert confusion.sum() == 40 and confusion.sum(axis=1).tolist() == [10] * 4
    for i, name in enumerate("abcd"):  # per-class numbers from the JSON's own confusion matrix, by hand
        tp, called, actual = confusion[i, i], confusion[:, i].sum(), confusion[i].sum()
        precision, recall = (tp / called if called else 0.0), tp / actual
        f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
        assert report["per_class"][name] == pytest.approx({"precision": precision, "recall": recall, "f1": f1,
                                                           "support": actual})
    coverage = report["coverage"]
    assert coverage[0] == {"threshold": 0.0, "coverage": 1.0, "answered": 40, "accuracy": report["accuracy"]}
    assert all(a["coverage"] >= b["coverage"] for a, b in zip(coverage, coverage[1:]))
    assert sum(report["reliability"]["count"]) == 40 and len(report["reliability"]["count"]) == 15
    for png in ("confusion_test.png", "reliability_test.png"):
        with Image.open(best / "eval" / png) as im:
            assert im.format == "PNG" and min(im.size) > 300
            assert len(np.unique(np.asarray(im.convert("L")))) > 20  # drawn, not a blank canvas
    out = capsys.readouterr().out
    assert "precision" in out and "reject below" in out and f"top-1 {report['accuracy']:.4f}" in out


def test_eval_on_val_reproduces_the_calibration_numbers(run, tmp_path):
    assert eval_main([str(run / "model" / "best"), "--split", "val", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "eval_val.json").read_text())
    cal = json.loads((run / "results.json").read_text())["calibration"]
    assert report["ece"] == pytest.approx(cal["ece_after"], abs=1e-5)
    assert report["ece_uncalibrated"] == pytest.approx(cal["ece_before"], abs=1e-5)


def test_eval_on_an_image_folder_with_some_of_the_classes(run, tmp_path, capsys):
    write_class_folders(tmp_path / "flat", ["b", "d"], 5, seed=7)
    write_class_folders(tmp_path / "flat", ["a"], 0)  # an empty class folder is an error of the data
    assert eval_main([str(run / "model" / "best"), "--data", str(tmp_path / "flat"), "--out", str(tmp_path)]) == 2
    assert "class folder has no images" in capsys.readouterr().err
    (tmp_path / "flat" / "a").rmdir()
    assert eval_main([str(run / "model" / "best"), "--data", str(tmp_path / "flat"), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "eval_flat.json").read_text())
    assert report["n"] == 10 and [report["per_class"][c]["support"] for c in "abcd"] == [0, 5, 0, 5]
    write_class_folders(tmp_path / "other", ["zebra"], 2)
    assert eval_main([str(run / "model" / "best"), "--data", str(tmp_path / "other"), "--out", str(tmp_path)]) == 2
    assert "['zebra']" in capsys.readouterr().err


def test_eval_names_its_outputs_after_what_was_evaluated_and_never_overwrites_another_report(run, tiny_images,
                                                                                              tmp_path):
    best, out = run / "model" / "best", tmp_path / "out"
    images = tiny_images  # the training data: train/val/test class folders

    def report(name):
        return json.loads((out / name).read_text())
    assert eval_main([str(best), "--out", str(out)]) == 0  # the artifact's own recipe, test split
    own = (out / "eval_test.json").read_bytes()
    assert eval_main([str(best), "--data", str(images), "--split", "val", "--out", str(out)]) == 0
    assert eval_main([str(best), "--data", str(best / "recipe.toml"), "--out", str(out)]) == 0
    write_class_folders(tmp_path / "new_scans", ["a", "c"], 3, seed=5)  # flat: evaluated whole
    write_class_folders(tmp_path / "site2" / "new_scans", ["b"], 4, seed=6)  # another folder, the same name
    write_class_folders(tmp_path / "test", ["d"], 2, seed=7)  # a flat folder named like the test split
    for folder in ("new_scans", "site2/new_scans", "new_scans", "test"):  # new_scans twice: the second replaces
        assert eval_main([str(best), "--data", str(tmp_path / folder), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{kind}_{tag}.{ext}" for tag in ("test", "imgs_val", "recipe_test", "new_scans", "new_scans_2", "test_2")
        for kind, ext in (("eval", "json"), ("confusion", "png"), ("reliability", "png")))
    assert (out / "eval_test.json").read_bytes() == own
    assert report("eval_imgs_val.json")["n"] == 40 and report("eval_imgs_val.json")["split"] == "val"
    assert report("eval_recipe_test.json")["n"] == 40
    assert report("eval_new_scans.json")["data"] == f"folder {tmp_path / 'new_scans'}"
    assert report("eval_new_scans.json")["n"] == 6 and report("eval_new_scans_2.json")["n"] == 4
    assert report("eval_test_2.json")["data"] == f"folder {tmp_path / 'test'}" and report("eval_test_2.json")["n"] == 2


def test_macro_f1_has_one_definition_in_training_and_in_eval():
    """#19.11: the trainer's macro-F1 averaged over the classes present, imgcls-eval's over all classes (0.8496
    vs 0.5664 on one matrix). One definition (sklearn's macro average over the labels that occur as truth or
    prediction), in both. Class 2 occurs nowhere here; class 1 is never predicted right."""
    from imgcls.inference.evaluate import build_report
    import torch

    from imgcls.training.metrics import macro_f1

    labels = np.array([0, 0, 0, 1, 1, 3, 3, 3])
    predicted = np.array([0, 0, 3, 0, 3, 3, 3, 3])
    logits = np.eye(4)[predicted] * 5.0
    report = build_report(logits, labels, ["a", "b", "c", "d"], 1.0)
    f1 = {"a": 2 * 2 / (3 + 3), "b": 0.0, "d": 2 * 3 / (3 + 5)}  # 2 tp / (true + predicted), present classes only
    expected = sum(f1.values()) / 3
    assert report["macro"]["f1"] == pytest.approx(expected, abs=1e-15)
    assert macro_f1(torch.tensor(report["confusion"])) == pytest.approx(expected, abs=1e-15)
    assert report["macro"]["recall"] == pytest.approx((2 / 3 + 0 + 1) / 3, abs=1e-15)
