"""Plots: a run writes real PNGs into its run dir (curves, confusion matrices, misclassified gallery), and
`imgcls-plot` draws several runs side by side; `tracking.plots = false` writes none."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_recipe
from helpers import only_run, train_inprocess
from imgcls.tracking.plots import main as plot_main
from imgcls.recipe import load_recipe
from imgcls.tracking.runlog import RunLog

C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two default colours


def _image(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def assert_real_plot(path: Path, min_colours: int = 8) -> np.ndarray:
    """A sensible size, mostly background but with a fair share of drawing in several colours."""
    pixels = _image(path)
    h, w, _ = pixels.shape
    assert 250 <= w <= 3000 and 250 <= h <= 3000, (path.name, w, h)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) >= min_colours, (path.name, len(colours))
    drawn = (pixels < 240).any(axis=2).mean()
    assert 0.01 < drawn < 0.9, (path.name, drawn)
    return pixels


def has_colour(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 8) -> bool:
    return bool((np.abs(pixels.astype(int) - rgb).max(axis=2) <= tol).sum() > 50)


def test_a_run_writes_curves_confusion_matrices_and_a_gallery(tmp_path, image_folder):
    # 3 steps: a half-trained model, so the gallery has mistakes to show
    recipe = write_recipe(tmp_path / "tiny.toml", f'source = "folder"\nroot = "{image_folder}"')
    assert train_inprocess(recipe, "train.max_steps=3", "train.log_every_steps=1") == 0
    run = only_run(tmp_path / "runs")
    plots = run / "plots"
    assert sorted(p.name for p in plots.iterdir()) == ["confusion_test.png", "confusion_val.png", "curves.png",
                                                       "misclassified.png"]
    curves = assert_real_plot(plots / "curves.png")
    assert curves.shape[1] > 2 * curves.shape[0]  # three panels side by side
    assert has_colour(curves, C0) and has_colour(curves, C1)  # train loss and val
    assert_real_plot(plots / "confusion_val.png")
    assert_real_plot(plots / "confusion_test.png")
    assert_real_plot(plots / "misclassified.png", min_colours=4)
    results = json.loads((run / "results.json").read_text())
    assert results["val"]["top1"] < 1.0  # the gallery above is not of an empty set


def _fake_run(root: Path, name: str, scale: float) -> Path:
    run = root / "runs" / "tiny" / name
    run.mkdir(parents=True)
    rows = []
    for step in range(1, 41):
        rows.append({"event": "train", "step": step, "loss": scale * 2.0 / step, "lr": 0.1 * (1 - step / 40)})
        if step % 10 == 0:
            rows.append({"event": "val", "step": step, "loss": scale * 3.0 / step, "top1": 1 - scale / step})
    rows.append({"event": "test", "step": 40, "top1": 0.9})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"event": "tra')
    return run


def test_imgcls_plot_draws_runs_side_by_side(tmp_path, capsys):
    a, b = _fake_run(tmp_path, "a", 1.0), _fake_run(tmp_path, "b", 2.0)
    out = tmp_path / "compare.png"
    assert plot_main([str(a), str(b), "--out", str(out)]) == 0
    assert "2 run(s): tiny/a, tiny/b" in capsys.readouterr().out
    pixels = assert_real_plot(out)
    assert has_colour(pixels, C0) and has_colour(pixels, C1)  # one colour per run

    # the console script, on a recipe folder: every run inside it
    script = Path(sys.executable).with_name("imgcls-plot")
    done = subprocess.run([str(script), str(tmp_path / "runs" / "tiny"), "--out", str(tmp_path / "all.png")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _image(tmp_path / "all.png").shape == pixels.shape


def test_imgcls_plot_refuses_a_folder_without_runs(tmp_path, capsys):
    assert plot_main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl here or in its subfolders" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_plots_false_writes_no_png(tmp_path, image_folder):
    recipe = load_recipe(write_recipe(tmp_path / "tiny.toml", f'source = "folder"\nroot = "{image_folder}"',
                                      "[tracking]\nplots = false"))
    runlog = RunLog(SimpleNamespace(is_main_process=True, trackers=[]), recipe, tmp_path)
    runlog.log("train", 1, {"loss": 1.0, "lr": 0.1})
    runlog.log_confusion("val", torch.eye(4, dtype=torch.long), list("abcd"))
    runlog.draw_plots()
    runlog.final_report(model=None, val_dataset=None, step=1)
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize("classes", [3, 30])
def test_confusion_plot_scales_with_the_number_of_classes(tmp_path, classes):
    from imgcls.tracking.plots import confusion_figure, render, save_png

    rng = np.random.default_rng(0)
    confusion = rng.integers(0, 5, (classes, classes)) + np.eye(classes, dtype=int) * 20
    path = save_png(render(confusion_figure(confusion, [f"class{k}" for k in range(classes)], "val")),
                    tmp_path / "c.png")
    assert_real_plot(path)


# ---------------------------------------------------------------- fonts for class names
@pytest.fixture
def fake_fonts(monkeypatch):
    """The default font has ASCII only; 'Other' has 猫; 'Noto Sans CJK JP' has 猫 and 犬; nobody has ᚠ."""
    from imgcls.tracking import fonts
    charmaps = {"/default.ttf": set(map(ord, "abc: ")), "/other.ttf": {ord("猫")},
                "/noto.ttf": set(map(ord, "猫犬")), "/lastresort.ttf": set(range(0x110000))}
    monkeypatch.setattr(fonts, "_default_font", lambda: "/default.ttf")
    monkeypatch.setattr(fonts, "_installed", lambda: [("Last Resort High-Efficiency", "/lastresort.ttf"),
                                                      ("Other", "/other.ttf"), ("Noto Sans CJK JP", "/noto.ttf")])
    monkeypatch.setattr(fonts, "_charmap", lambda path: frozenset(charmaps[path]))
    monkeypatch.setattr(fonts, "_warned", False)
    fonts.fallback_fonts.cache_clear()
    yield fonts
    fonts.fallback_fonts.cache_clear()


def test_font_selection_prefers_a_cjk_font_that_has_every_glyph(fake_fonts, caplog):
    with caplog.at_level("WARNING"):
        assert fake_fonts.family_for(["abc"]) is None  # the default font draws it
        assert fake_fonts.family_for(["a", "猫"]) == ["sans-serif", "Noto Sans CJK JP"]
        assert fake_fonts.family_for(["猫 犬"]) == ["sans-serif", "Noto Sans CJK JP"]
    assert not caplog.records


def test_missing_glyphs_are_warned_about_once(fake_fonts, caplog, monkeypatch):
    import matplotlib

    monkeypatch.setattr(matplotlib, "get_cachedir", lambda: "/home/u/.cache/matplotlib")
    with caplog.at_level("WARNING"):
        assert fake_fonts.family_for(["猫", "ᚠᚢ"]) == ["sans-serif", "Noto Sans CJK JP"]  # 猫 at least
        assert fake_fonts.family_for(["ᚦ"]) is None
        assert fake_fonts.family_for(["ᚠ"]) is None
    assert [r.getMessage() for r in caplog.records] == [
        "plots: no installed font has the glyphs ᚠ (U+16A0), ᚢ (U+16A2) of these labels, so matplotlib draws "
        "them as empty boxes; install a font that has them (for Chinese, Japanese or Korean names a CJK font, "
        "e.g. `apt-get install fonts-noto-cjk`), then delete matplotlib's font cache (/home/u/.cache/matplotlib/"
        "fontlist-*.json) so that it finds the new font"]


def test_class_names_outside_the_default_font_are_drawn_with_a_font_that_has_them(tmp_path):
    """Ⓐ and Ⓑ are not in DejaVu Sans (matplotlib's default) but are in STIXGeneral (shipped with matplotlib):
    drawn as glyphs the two confusion plots differ; drawn as empty boxes they would be identical."""
    from imgcls.tracking.plots import confusion_figure, gallery_figure, render

    a, b = (render(confusion_figure([[3, 1], [0, 4]], [name, "x"], "val")) for name in ("Ⓐ", "Ⓑ"))
    assert a.shape == b.shape and (a != b).any()
    fig = gallery_figure([{"image": np.zeros((4, 4)), "true": 0, "pred": 1, "confidence": 0.9}], ["Ⓐ", "x"])
    assert len(fig.axes[0].title.get_fontfamily()) > 1  # the fallback font is on the gallery titles too
