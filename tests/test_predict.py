"""imgcls-predict: PyTorch artifact and ONNX export give the same answers; `uncertain`; unreadable files are
reported and skipped; TTA and --sort-into; the ONNX path needs neither torch nor the training code."""
from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, write_class_folders
from imgcls.inference.export import main as export_main
from imgcls.inference.artifact import load_artifact, save_artifact
from imgcls.inference.predict import main as predict_main, sort_into
from imgcls.inference.preprocess import prepare, read_views
from imgcls.data.transforms import Preprocess


@pytest.fixture(scope="module")
def models(tiny_run, tiny_images):
    """(artifact, its ONNX export, a folder of 40 unseen images in class folders): the session's tiny model
    (conftest.tiny_run), this module's copy."""
    best = tiny_run / "model" / "best"
    assert export_main([str(best), "--format", "onnx", "--parity-images", "8"]) == 0
    return best, best / "export" / "model.onnx", tiny_images / "test"


def run_predict(*args, tmp_path, name="out.jsonl") -> list[dict]:
    out = tmp_path / name
    assert predict_main([*map(str, args), "--output", str(out)]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_artifact_and_onnx_give_the_same_answers(models, tmp_path):
    best, onnx_file, images = models
    eager = run_predict(best, images, tmp_path=tmp_path, name="eager.jsonl")
    exported = run_predict(onnx_file, images, tmp_path=tmp_path, name="onnx.jsonl")
    assert len(eager) == len(exported) == 40
    assert [r["path"] for r in eager] == [r["path"] for r in exported]
    assert [r["prediction"] for r in eager] == [r["prediction"] for r in exported]
    np.testing.assert_allclose([r["probability"] for r in eager], [r["probability"] for r in exported], atol=1e-5)
    accuracy = np.mean([r["prediction"] == r["path"].split("/")[-2] for r in eager])
    assert accuracy > 0.5  # 4 classes: not chance, so the labels are not shuffled


def test_reject_below_one_marks_every_image_uncertain(models, tmp_path):
    best, onnx_file, images = models
    for model in (best, onnx_file):
        rows = run_predict(model, images, "--reject-below", "1.0", tmp_path=tmp_path)
        assert len(rows) == 40 and {r["prediction"] for r in rows} == {"uncertain"}
        assert all(r["top_k"][0]["label"] in "abcd" for r in rows)  # the ranking is still reported


def test_the_uncertain_answer_may_not_be_a_class_name(models, tmp_path, capsys):
    best, onnx_file, images = models
    assert predict_main([str(onnx_file), str(images), "--reject-below", "0.5", "--uncertain-label", "c"]) == 2
    assert (f"error: {onnx_file} has a class named 'c', so that answer would be ambiguous with --reject-below; "
            f"pass --uncertain-label with another name") in capsys.readouterr().err
    rows = run_predict(best, images, "--reject-below", "1.0", "--uncertain-label", "UNSURE", tmp_path=tmp_path)
    assert {r["prediction"] for r in rows} == {"UNSURE"}


def test_unreadable_files_are_reported_and_skipped(models, tmp_path, capsys, caplog):
    best, onnx_file, images = models
    folder = shutil.copytree(images, tmp_path / "mixed")
    (folder / "a" / "notes.txt").write_text("not an image")
    (folder / "b" / "broken.png").write_bytes((images / "b" / "0000.png").read_bytes()[:60])
    with caplog.at_level(logging.INFO):
        assert predict_main([str(onnx_file), str(folder), "--top-k", "2"]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert len(rows) == 42
    bad = {r["path"].split("/")[-1]: r for r in rows if r["error"]}
    assert set(bad) == {"notes.txt", "broken.png"} and all(r["prediction"] == "" for r in bad.values())
    good = [r for r in rows if not r["error"]]
    assert len(good) == 40 and all(r["prediction"] in "abcd" and r["label_2"] for r in good)
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "notes.txt" in warned and "broken.png" in warned
    assert "42 inputs: 40 predicted (0 uncertain), 2 failed" in caplog.records[-1].getMessage()


def test_inputs_by_file_glob_and_missing_path(models, tmp_path):
    best, _, images = models
    rows = run_predict(best, images / "a" / "0000.png", f"{images}/b/000[0-2].png", tmp_path / "nope.png",
                       tmp_path=tmp_path)
    assert [r["path"].split("/")[-1] for r in rows] == ["0000.png", "0000.png", "0001.png", "0002.png", "nope.png"]
    assert "FileNotFoundError" in rows[-1]["error"]


def test_tta_averages_softmax_of_image_and_flip(models, tmp_path):
    """The expectation is built without imgcls.inference.predict: the trainer's torchvision eval transform,
    torch.flip on the width axis, the eager model, softmax at the artifact's temperature, mean of the two."""
    import torch

    best, onnx_file, images = models
    src = tmp_path / "asymmetric.png"
    pixels = np.asarray(Image.open(images / "c" / "0003.png")).copy()
    pixels[:, :6] = 255  # a bright left edge: the flip is a different picture, with different probabilities
    Image.fromarray(pixels).save(src)
    model, config = load_artifact(best)
    pre = Preprocess.from_dict(config["preprocess"])
    x = pre.eval_transform()(pre.convert(Image.open(src)))[None]
    with torch.no_grad():
        logits = torch.cat([model(x), model(torch.flip(x, dims=[3]))]).double()
    probs = torch.softmax(logits / config.get("temperature", 1.0), dim=1).numpy()
    expected = probs.mean(axis=0)
    assert np.abs(probs[0] - expected).max() > 1e-3  # TTA that forgot the flip would fail below
    for model_path in (best, onnx_file):
        (row,) = run_predict(model_path, src, "--tta", "--top-k", "4", tmp_path=tmp_path)
        got = {t["label"]: t["probability"] for t in row["top_k"]}
        np.testing.assert_allclose([got[c] for c in config["class_names"]], expected, atol=1e-6)
    assert read_views(str(src), pre.to_dict(), tta=True, tta_crop=0.875).shape == (3, 1, 16, 16)


def test_sort_into_copies_each_image_into_its_answer_folder(models, tmp_path):
    best, _, images = models
    rows = run_predict(best, images, "--reject-below", "0.5", "--sort-into", tmp_path / "sorted", tmp_path=tmp_path)
    for answer in {r["prediction"] for r in rows}:
        # names repeat across class folders (0000.png in a/, b/, ...): copies get a numeric suffix
        assert len(list((tmp_path / "sorted" / answer).iterdir())) == sum(r["prediction"] == answer for r in rows)


def tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_second_sort_into_the_same_folder_never_overwrites(models, tmp_path):
    best, _, images = models
    other = tmp_path / "other"  # the same file names (a/0000.png ...) with other pictures
    write_class_folders(other, ["a", "b", "c", "d"], 10, seed=9)
    dest = tmp_path / "sorted"
    run_predict(best, images, "--sort-into", dest, tmp_path=tmp_path)
    first = tree(dest)
    assert len(first) == 40
    run_predict(best, other, "--sort-into", dest, tmp_path=tmp_path)
    second = tree(dest)
    assert {k: second[k] for k in first} == first  # every copy of the first run is still there, byte-identical
    assert len(second) == 80
    assert sorted(second[k] for k in set(second) - set(first)) == sorted(p.read_bytes() for p in other.rglob("*.png"))


BAD_NAMES = [("", "is empty"), ("tab\there", "contains the control character U+0009"),
             ("x\x00", "contains the control character U+0000"), (7, "is not a string")]
RULE = "a class name must be a non-empty string without control characters"


@pytest.mark.parametrize("name,reason", BAD_NAMES)
def test_an_artifact_with_a_class_name_that_cannot_be_a_label_is_refused(models, tmp_path, capsys, name, reason):
    best, _, images = models
    bad = shutil.copytree(best, tmp_path / "bad", ignore=shutil.ignore_patterns("export", "eval"))
    config = json.loads((bad / "config.json").read_text())
    config["class_names"][0] = name
    (bad / "config.json").write_text(json.dumps(config))
    dest = tmp_path / "x" / "y" / "sorted"
    assert predict_main([str(bad), str(images), "--sort-into", str(dest)]) == 2
    assert capsys.readouterr().err == f"error: {bad / 'config.json'}: class name {name!r} {reason}; {RULE}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]  # no folder made, inside DIR or above it


def test_save_artifact_refuses_a_class_name_that_cannot_be_a_label(tmp_path):
    import torch

    dest = tmp_path / "model" / "best"
    with pytest.raises(ValueError) as info:
        save_artifact(dest, torch.nn.Linear(2, 2), {"class_names": ["seven", "se\nven"]}, "")
    assert str(info.value) == (f"{dest / 'config.json'}: class name 'se\\nven' contains the control character "
                               f"U+000A; {RULE}")
    assert not (tmp_path / "model").exists()  # nothing written, not even the temporary folder


def test_class_names_that_look_like_paths_are_sorted_into_safe_folders_inside_dir(models, tmp_path):
    """Names are data (Fashion-MNIST has 'T - shirt / top'); as folders they become one safe component each."""
    best, _, images = models
    odd = shutil.copytree(best, tmp_path / "odd", ignore=shutil.ignore_patterns("export", "eval"))
    config = json.loads((odd / "config.json").read_text())
    names = ["../../escaped_a", "T - shirt / top", "..", "C:stuff"]
    config["class_names"] = names
    (odd / "config.json").write_text(json.dumps(config))
    dest = tmp_path / "x" / "sorted"
    assert predict_main([str(odd), str(images), "--sort-into", str(dest)]) == 0
    made = sorted(p.name for p in dest.iterdir())
    assert set(made) <= {".._.._escaped_a", "T - shirt _ top", "_.._", "C_stuff"} and made
    assert sum(1 for _ in dest.rglob("*.png")) == 40
    assert [p for p in tmp_path.rglob("*escaped_a*") if not p.is_relative_to(dest)] == []


def test_two_class_names_that_would_share_a_folder_are_refused(models, tmp_path):
    _, _, images = models
    image = str(images / "a" / "0000.png")
    rows = [{"path": image, "prediction": "a/b"}, {"path": image, "prediction": "a_b"}]
    with pytest.raises(ValueError) as info:
        sort_into(rows, tmp_path / "sorted")
    assert str(info.value) == (f"--sort-into {tmp_path / 'sorted'}: class names 'a/b' and 'a_b' would both be sorted "
                               f"into the folder 'a_b'; rename one of them; nothing was copied")


def test_sort_into_refuses_a_target_outside_its_folder(models, tmp_path):
    _, _, images = models
    dest = tmp_path / "sorted"
    (tmp_path / "elsewhere").mkdir()
    dest.mkdir()
    (dest / "b").symlink_to(tmp_path / "elsewhere")  # a link planted in DIR leads out of it
    image = str(images / "a" / "0000.png")
    rows = [{"path": image, "prediction": "a"}, {"path": image, "prediction": "b"}]
    with pytest.raises(ValueError) as info:
        sort_into(rows, dest)
    assert str(info.value) == (f"--sort-into {dest}: {dest / 'b' / '0000.png'} would be outside {dest}; "
                               f"nothing was copied")
    assert not (dest / "a").exists() and not list((tmp_path / "elsewhere").iterdir())
    assert sort_into([{"path": image, "prediction": "../escaped"}], dest) == 1
    assert (dest / ".._escaped" / "0000.png").is_file() and not (tmp_path / "escaped").exists()


def test_an_uncertain_label_that_cannot_be_a_label_is_refused(models, tmp_path, capsys):
    _, onnx_file, images = models
    with pytest.raises(SystemExit) as info:
        predict_main([str(onnx_file), str(images), "--reject-below", "0.9", "--uncertain-label", "un\tsure",
                      "--sort-into", str(tmp_path / "sorted")])
    assert info.value.code == 2
    assert capsys.readouterr().err.endswith("error: --uncertain-label 'un\\tsure' contains the control character "
                                            "U+0009\n")
    assert not list(tmp_path.iterdir())


def test_predict_fails_when_no_input_could_be_read(models, tmp_path, capsys):
    _, onnx_file, _ = models
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n")
    assert predict_main([str(onnx_file), str(tmp_path / "notes.txt"), str(tmp_path / "broken.png")]) == 1
    assert capsys.readouterr().err.endswith("error: none of the 2 inputs could be read as an image (see the "
                                            "warnings above); nothing was predicted\n")


def test_a_bug_outside_image_decoding_is_not_reported_as_a_bad_image(models, tmp_path, monkeypatch):
    _, onnx_file, images = models

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in our preprocessing")
    monkeypatch.setattr("imgcls.inference.preprocess.prepare", broken)
    with pytest.raises(RuntimeError, match="a bug in our preprocessing"):
        predict_main([str(onnx_file), str(images / "a" / "0000.png"), "--output", str(tmp_path / "p.csv")])


def test_onnx_path_needs_neither_torch_nor_training_code(models, tmp_path):
    _, onnx_file, images = models
    code = (f"import sys; from imgcls.inference.predict import main; "
            f"rc = main([{str(onnx_file)!r}, {str(images)!r}, '--output', {str(tmp_path / 'p.csv')!r}]); "
            f"loaded = [m for m in ('torch', 'torchvision', 'imgcls.models.registry', 'imgcls.train') "
            f"if m in sys.modules]; "
            f"assert rc == 0 and not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 41


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
def test_prepare_is_torchvision_on_pil_images(mode):
    """The PIL+numpy path (predict, export checks, ONNX) gives exactly the pixels of the trainer's eval transform
    (torchvision v2 Resize/CenterCrop on the PIL image, then ToImage/ToDtype/Normalize), resize or not."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), "RGB")
    image = base.convert("I;16") if mode == "I;16" else base.convert(mode)
    for channels, interp, crop_pct, size in ((3, "bilinear", 1.0, (24, 20)), (1, "bicubic", 0.875, (16, 16)),
                                             (3, "nearest", 0.9, (28, 28)), (1, "bilinear", 1.0, (37, 53))):
        pre = Preprocess(size, channels, (0.4,) * channels, (0.2,) * channels, interp, crop_pct)
        ours = prepare(image, pre.to_dict())
        assert np.array_equal(ours, pre.eval_transform()(pre.convert(image)).numpy()), (mode, interp)
