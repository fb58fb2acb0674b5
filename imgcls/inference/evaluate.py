"""Evaluate a model artifact on a labelled split: accuracy, per-class scores, calibration, reject thresholds.

    imgcls-eval ARTIFACT [--data RECIPE_OR_FOLDER] [--split test|val|train] [--out DIR] [--batch-size N]

    imgcls-eval runs/mnist/<run>/model/best --data recipes/mnist.toml
    imgcls-eval runs/mnist/<run>/model/best --data /data/new_scans --split test

--data is a recipe TOML (its [data], splits formed exactly as in training) or an image folder of class
folders (with train/val/test subfolders, or one flat set of classes, which is evaluated whole); default: the
artifact's own recipe.toml. Class names must be the artifact's (a folder may hold a subset). Images are
preprocessed by the artifact's preprocessing exactly as imgcls-predict does, and probabilities use the
artifact's temperature, so a threshold read off the coverage table means the same for `--reject-below`.

Writes to --out (default `<artifact>/eval/`): `eval_<tag>.json` (accuracy, top-5, per-class precision /
recall / F1, confusion matrix, ECE before/after temperature, reliability bins, coverage vs accuracy),
`confusion_<tag>.png`, `reliability_<tag>.png`; prints a readable summary. The tag names what was evaluated:
`<split>` for the artifact's own recipe, `<recipe file stem>_<split>` for --data RECIPE, `<folder>_<split>` or
`<folder>` for a folder with or without split subfolders. Evaluating the same data again replaces its report;
a report of other data under that name is never overwritten: the new one gets `_2`, `_3`, ...
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from imgcls.inference.calibration import N_BINS, confidence_correct, ece, nll, reliability, softmax
from imgcls.atomic import write_json
from imgcls.data.loaders import ImageDataset, build_splits
from imgcls.tracking.plots import confusion_figure, new_figure, render, save_png
from imgcls.inference.predictor import decide, load_checked_artifact
from imgcls.inference.preprocess import prepare
from imgcls.recipe import DataConfig, load_recipe
from imgcls.errors import DataError, ModelError, RecipeError
from imgcls.data.sources import LOADERS, Split
from imgcls.data.transforms import Preprocess
from imgcls.inference.scores import macro_scores, per_class_scores

log = logging.getLogger(__name__)

THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
OUTPUTS = (("eval", "json"), ("confusion", "png"), ("reliability", "png"))


# ---------------------------------------------------------------- data
def folder_config(root: str, pre: dict) -> DataConfig:
    return DataConfig(source="folder", root=root, image_size=tuple(pre["image_size"]), channels=pre["channels"],
                      mean=list(pre["mean"]), std=list(pre["std"]), interpolation=pre["interpolation"],
                      crop_pct=pre.get("crop_pct", 1.0))


class EvalData(NamedTuple):
    split: Split
    names: list[str]
    where: str  # what was evaluated, by resolved path: the report's `data`, compared before reusing a name
    tag: str  # what the outputs are named after: eval_<tag>.json, confusion_<tag>.png, ...


def load_split(data: str | None, folder: Path, pre: dict, split: str) -> EvalData:
    """The split to evaluate, its class names, where it came from, and the tag of its outputs."""
    if data and Path(data).is_dir():
        root = Path(data).resolve()
        splits, names = LOADERS["folder"](folder_config(data, pre))
        if "train" not in {p.name.lower() for p in root.iterdir() if p.is_dir()}:  # flat: all of it
            (only,) = splits.values()
            log.info("%s has no train/val/test subfolders: evaluating all %d images", data, len(only))
            return EvalData(only, names, f"folder {root}", root.name or "root")
        found, where, tag = splits, f"folder {root} [{split}]", f"{root.name or 'root'}_{split}"
    else:
        recipe_path = Path(data or folder / "recipe.toml")
        cfg = load_recipe(recipe_path).data
        if Preprocess.from_data(cfg) != Preprocess.from_dict(pre):
            log.warning("%s: its preprocessing differs from the artifact's; the artifact's is used", recipe_path)
        splits = build_splits(cfg)
        names, found = splits.class_names, {"train": splits.train, "val": splits.val, "test": splits.test}
        where = f"{'recipe' if data else 'artifact recipe'} {recipe_path.resolve()} [{split}]"
        tag = f"{recipe_path.stem}_{split}" if data else split
    if found.get(split) is None:
        raise DataError(f"no {split!r} split in {data or 'the artifact recipe'}; available: "
                        f"{sorted(k for k, v in found.items() if v is not None)}")
    return EvalData(found[split], names, where, tag)


def _report_data(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("data")
    except (OSError, ValueError, AttributeError):  # unreadable or not a report: not ours to overwrite
        return None


def free_tag(out: Path, tag: str, where: str) -> str:
    """`tag`, else tag_2, tag_3, ...: the first whose outputs in `out` are absent or a report of the same data."""
    n = 1
    while True:
        candidate = tag if n == 1 else f"{tag}_{n}"
        files = [out / f"{kind}_{candidate}.{ext}" for kind, ext in OUTPUTS]
        if not any(f.exists() for f in files) or _report_data(files[0]) == where:
            return candidate
        n += 1


def label_map(data_names: list[str], model_names: list[str]) -> np.ndarray:
    """Data label index -> model class index, by name."""
    unknown = [n for n in data_names if n not in model_names]
    if unknown:
        raise DataError(f"classes {unknown} of the data are not classes of the model ({model_names})")
    return np.array([model_names.index(n) for n in data_names])


@torch.no_grad()
def collect_logits(model: torch.nn.Module, split: Split, pre: dict, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    preprocess = Preprocess.from_dict(pre)
    dataset = ImageDataset(split, preprocess, lambda image: torch.from_numpy(prepare(image, pre)))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    logits, labels = [], []
    for images, target in tqdm(loader, desc="eval", unit="batch", disable=None, dynamic_ncols=True):
        logits.append(model(images).float().numpy())
        labels.append(target.numpy())
    return np.concatenate(logits), np.concatenate(labels)


# ---------------------------------------------------------------- metrics
def coverage_table(probs: np.ndarray, labels: np.ndarray, thresholds=THRESHOLDS) -> list[dict]:
    """For each reject threshold P (predict's `--reject-below P`): share of images answered, accuracy on those."""
    rows = []
    for t in thresholds:
        top, uncertain = decide(probs, t)
        kept = ~uncertain
        rows.append({"threshold": t, "coverage": float(kept.mean()), "answered": int(kept.sum()),
                     "accuracy": float((top[kept] == labels[kept]).mean()) if kept.any() else None})
    return rows


def build_report(logits: np.ndarray, labels: np.ndarray, names: list[str], temperature: float) -> dict:
    probs, raw = softmax(logits, temperature), softmax(logits)
    c = len(names)
    pred = probs.argmax(axis=1)
    confusion = np.bincount(labels * c + pred, minlength=c * c).reshape(c, c)
    scores = per_class_scores(confusion, names)
    report = {"n": int(len(labels)), "accuracy": float((pred == labels).mean()),
              "nll": nll(logits, labels, temperature), "temperature": temperature}
    if c > 5:
        top5 = np.argsort(-probs, axis=1)[:, :5]
        report["top5"] = float((top5 == labels[:, None]).any(axis=1).mean())
    report["macro"] = macro_scores(confusion)  # over the classes that occur (imgcls.inference.scores)
    report["per_class"] = scores
    report["confusion"] = confusion.tolist()
    report["ece"] = ece(*confidence_correct(probs, labels))
    report["ece_uncalibrated"] = ece(*confidence_correct(raw, labels))
    report["ece_bins"] = N_BINS
    report["reliability"] = reliability(*confidence_correct(probs, labels))
    report["reliability_uncalibrated"] = reliability(*confidence_correct(raw, labels))
    report["coverage"] = coverage_table(probs, labels)
    return report


# ---------------------------------------------------------------- plots and text
def plot_confusion(confusion: list[list[int]], names: list[str], title: str, path: Path) -> None:
    save_png(render(confusion_figure(confusion, names, title)), path)


def plot_reliability(report: dict, path: Path) -> None:
    fig = new_figure(6, 6.5)
    ax, hist = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    bins = report["reliability"]
    width = bins["upper"][0] - bins["lower"][0]
    centers = np.asarray(bins["lower"]) + width / 2
    acc = [a if n else 0 for a, n in zip(bins["accuracy"], bins["count"])]
    ax.bar(centers, acc, width=width * 0.9, color="tab:blue", label=f"T = {report['temperature']:.3g}: "
           f"ECE {report['ece']:.4f}")
    if report["temperature"] != 1.0:
        raw = report["reliability_uncalibrated"]
        raw_acc = [a if n else np.nan for a, n in zip(raw["accuracy"], raw["count"])]
        ax.step(centers, raw_acc, where="mid", color="tab:red", label=f"T = 1: ECE {report['ece_uncalibrated']:.4f}")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"reliability ({report['ece_bins']} bins)")
    ax.legend(loc="upper left")
    hist.bar(centers, bins["count"], width=width * 0.9, color="tab:gray")
    hist.set(xlabel="confidence (top-1 probability)", ylabel="images")
    save_png(render(fig), path)


def summary(report: dict) -> str:
    lines = [f"{report['model']} on {report['data']}: {report['n']} images",
             f"top-1 {report['accuracy']:.4f}" + (f"  top-5 {report['top5']:.4f}" if "top5" in report else "")
             + f"  NLL {report['nll']:.4f}  ECE {report['ece']:.4f} at T = {report['temperature']:.4g} "
             f"(T = 1: {report['ece_uncalibrated']:.4f})",
             "", f"{'class':<20} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    for name, s in report["per_class"].items():
        lines.append(f"{name[:20]:<20} {s['precision']:>9.4f} {s['recall']:>7.4f} {s['f1']:>7.4f} {s['support']:>8}")
    m = report["macro"]
    lines += [f"{'macro avg':<20} {m['precision']:>9.4f} {m['recall']:>7.4f} {m['f1']:>7.4f}", "",
              f"{'reject below':>12} {'coverage':>9} {'accuracy':>9}"]
    for row in report["coverage"]:
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        lines.append(f"{row['threshold']:>12.2f} {row['coverage']:>9.4f} {acc:>9}")
    return "\n".join(lines)


def evaluate_artifact(artifact: str, data: str | None, split: str, out: Path | None, batch_size: int) -> dict:
    model, config, folder = load_checked_artifact(artifact)  # class names that fit the outputs, safetensors
    pre = config["preprocess"]
    evaluated = load_split(data, folder, pre, split)
    mapping = label_map(evaluated.names, config["class_names"])
    logits, labels = collect_logits(model, evaluated.split, pre, batch_size)
    report = {"model": str(folder), "data": evaluated.where, "split": split,
              **build_report(logits, mapping[labels], config["class_names"], float(config.get("temperature", 1.0)))}
    out = out or folder / "eval"
    out.mkdir(parents=True, exist_ok=True)
    tag = free_tag(out, evaluated.tag, evaluated.where)
    if tag != evaluated.tag:
        log.info("%s holds the report of other data, so this one is eval_%s.json", out / f"eval_{evaluated.tag}.json",
                 tag)
    plot_confusion(report["confusion"], config["class_names"], tag, out / f"confusion_{tag}.png")
    plot_reliability(report, out / f"reliability_{tag}.png")
    path = out / f"eval_{tag}.json"
    write_json(path, report, indent=2)
    log.info("wrote %s, confusion_%s.png, reliability_%s.png in %s", path.name, tag, tag, out)
    return report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="imgcls-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:3]))
    p.add_argument("artifact", help="model/best, model/last, or a run folder")
    p.add_argument("--data", metavar="RECIPE_OR_FOLDER",
                   help="recipe TOML or image folder (default: the artifact's recipe.toml)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: <artifact>/eval)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per forward pass (default 64)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = evaluate_artifact(args.artifact, args.data, args.split, args.out, args.batch_size)
    except (FileNotFoundError, RecipeError, DataError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
