"""Plots of runs, read from their `metrics.jsonl`: PNGs in `<run>/plots/`, and `imgcls-plot` to compare runs.

    imgcls-plot runs/mnist/20250101-120000 runs/mnist/20250102-090000 --out compare.png
    imgcls-plot runs/mnist                                   # every run of the recipe

Per run (main process, redrawn after every validation, off with `tracking.plots = false`): `curves.png`
(train and val loss, val top-1/top-5 and the final test top-1, learning rate, all by optimizer step) and
`confusion_val.png` (latest validation); at the end `confusion_test.png` and `misclassified.png`.

Drawn with matplotlib's object API on an Agg canvas: no pyplot, no display, no global backend switch, so it is
safe inside a training process. Class names the default font cannot draw (CJK, ...) are drawn with an
installed font that has them (`fonts.family_for`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from imgcls.tracking.fonts import family_for

PLOTS_DIR = "plots"
DPI = 100
ANNOTATE_UP_TO = 20  # classes: counts written in the confusion cells
TICKS_UP_TO = 50  # classes: names on the confusion axes


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl here (expected an imgcls run directory)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written when a run was killed
            continue
    return rows


def series(rows: list[dict], event: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if r.get("event") == event and isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def render(fig) -> np.ndarray:
    """The figure as an RGB uint8 array [H, W, 3] (what gets saved, and sent to W&B and TensorBoard)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_png(image: np.ndarray, path: Path) -> Path:
    """Written under a temporary name and renamed, so a reader never sees half a PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _plot(ax, steps, values, **style) -> None:
    if steps:
        ax.plot(steps, values, **{"markersize": 4, **style})


def curves_figure(runs: dict[str, list[dict]]):
    """Loss | accuracy | learning rate. One run: a colour per split. Several: a colour per run, a line style
    per split (train solid, val dashed, test a star)."""
    fig = new_figure(13, 3.8)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    single = len(runs) == 1
    for k, (label, rows) in enumerate(runs.items()):
        run_color = None if single else f"C{k % 10}"
        prefix = "" if single else f"{label} "
        _plot(ax_loss, *series(rows, "train", "loss"), color=run_color or "C0", label=f"{prefix}train")
        _plot(ax_loss, *series(rows, "val", "loss"), color=run_color or "C1", ls="--", marker="o",
              label=f"{prefix}val")
        _plot(ax_acc, *series(rows, "val", "top1"), color=run_color or "C1", ls="--", marker="o",
              label=f"{prefix}val top-1")
        _plot(ax_acc, *series(rows, "val", "top5"), color=run_color or "C2", ls=":", marker=".",
              label=f"{prefix}val top-5")
        _plot(ax_acc, *series(rows, "test", "top1"), color=run_color or "C3", ls="none", marker="*",
              markersize=12, label=f"{prefix}test top-1")
        _plot(ax_lr, *series(rows, "train", "lr"), color=run_color or "C4", label=f"{prefix}lr")
    for ax, title, ylabel in ((ax_loss, "loss", "cross-entropy"), (ax_acc, "accuracy", "accuracy"),
                              (ax_lr, "learning rate", "lr")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if single:
        fig.suptitle(next(iter(runs)), fontsize=10)
    return fig


def confusion_figure(confusion, names: list[str], title: str):
    """Rows = true class, columns = predicted; colour = fraction of the true class, text = counts."""
    counts = np.asarray(confusion, dtype=np.int64)
    n = len(names)
    font = {"fontfamily": family_for([*names, title])}
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(3.0 + 0.3 * n, 12.0)
    fig = new_figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    if n <= TICKS_UP_TO:
        ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8, **font)
        ax.set_yticks(range(n), names, fontsize=8, **font)
    if n <= ANNOTATE_UP_TO:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    total = int(counts.sum())
    accuracy = np.trace(counts) / max(total, 1)
    ax.set_title(f"{title}: top-1 {accuracy:.3f} on {total} images", fontsize=10, **font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return fig


def gallery_figure(items: list[dict], names: list[str], title: str = "misclassified validation images"):
    """`items`: {"image": float array [H, W] or [H, W, 3] in 0..1, "true", "pred", "confidence"}."""
    cols = min(len(items), 8)
    rows = math.ceil(len(items) / cols)
    fig = new_figure(1.7 * cols, 2.0 * rows + 0.4)
    font = {"fontfamily": family_for([*names, title])}
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, item in zip(axes, items):
        image = item["image"]
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"true {names[item['true']]}\npred {names[item['pred']]} ({item['confidence']:.2f})",
                     fontsize=8, color="C3", **font)
    fig.suptitle(title, fontsize=10, **font)
    return fig


def write_run_plots(run_dir: Path, confusion=None, names: list[str] | None = None) -> list[Path]:
    """`plots/curves.png` from metrics.jsonl and, given the latest val confusion, `plots/confusion_val.png`."""
    out = Path(run_dir) / PLOTS_DIR
    label = f"{Path(run_dir).parent.name}/{Path(run_dir).name}"
    written = [save_png(render(curves_figure({label: read_metrics(run_dir)})), out / "curves.png")]
    if confusion is not None and names:
        written.append(save_png(render(confusion_figure(confusion, names, "val")), out / "confusion_val.png"))
    return written


def expand_runs(paths: list[Path]) -> list[Path]:
    """A run dir stands for itself; a recipe's folder (runs/<name>) for each run inside it."""
    found = []
    for path in paths:
        if (path / "metrics.jsonl").is_file():
            found.append(path)
            continue
        inside = sorted(p for p in path.iterdir() if (p / "metrics.jsonl").is_file()) if path.is_dir() else []
        if not inside:
            raise FileNotFoundError(f"{path}: no metrics.jsonl here or in its subfolders (expected a run "
                                    f"directory such as runs/<recipe>/<run>)")
        found.extend(inside)
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="imgcls-plot", description="Draw the loss, accuracy and learning-rate "
                                "curves of one or more runs side by side, from their metrics.jsonl.")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directory (or runs/<recipe>)")
    p.add_argument("--out", type=Path, default=Path("compare.png"), help="PNG to write (default: compare.png)")
    args = p.parse_args(argv)
    try:
        run_dirs = expand_runs(args.runs)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = {f"{d.parent.name}/{d.name}": read_metrics(d) for d in run_dirs}
    save_png(render(curves_figure(runs)), args.out)
    print(f"{args.out}: {len(runs)} run(s): {', '.join(runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
