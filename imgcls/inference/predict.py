"""Predict the class of image files with a trained artifact (PyTorch) or an exported ONNX model (onnxruntime).

    imgcls-predict MODEL INPUTS... [--output FILE] [--format csv|jsonl] [--top-k K] [--reject-below P]
                   [--tta] [--tta-crop FRACTION] [--sort-into DIR] [--batch-size N]

    imgcls-predict runs/mnist/<run>/model/best images/ --reject-below 0.6
    imgcls-predict model/best/export/model.onnx 'scans/**/*.png' --format jsonl --output predictions.jsonl

MODEL is an artifact folder (`model/best`, `model/last`, or a run folder) or an exported `.onnx` file. The
ONNX path reads class names, preprocessing and temperature from the model's own metadata and imports neither
torch nor the training code. INPUTS are files, folders (searched recursively) or glob patterns. One row per
input: path, the answer (a class, or `uncertain` when the calibrated top probability is below
`--reject-below`), then the top-k labels with probabilities. An unreadable file gets a row with an `error`
and a warning; the run goes on and the last log line says how many failed. Exit status: 0 when at least one
image was predicted, 1 when none could be read, 2 for a bad MODEL or arguments (or a --sort-into target
outside DIR). --sort-into never overwrites a file: a name already taken gets a numeric suffix.

Both backends preprocess through `prepare` below (PIL resize, then numpy), which is exactly torchvision's
v2 Resize / CenterCrop / ToImage / ToDtype / Normalize applied to PIL images, as the trainer's eval transform
does, so the trainer, the artifact and the ONNX file all see the same pixels.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from imgcls.inference.calibration import softmax
from imgcls.data.classnames import check_class_names, name_problem
from imgcls.data.framing import center_box, cover_size
from imgcls.atomic import atomic_path
from imgcls.data.images import BAD_IMAGE_ERRORS, open_image, to_channels
from imgcls.errors import ModelError, SortError
from imgcls.inference.sortinto import sort_into

log = logging.getLogger(__name__)

META_KEY = "imgcls"  # ONNX metadata_props key / extra-file stem holding `deploy_metadata` as JSON
DEPLOY_FORMAT = "imgcls-deploy/1"
UNCERTAIN = "uncertain"
PIL_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC}


# ---------------------------------------------------------------- preprocessing (torch-free)
def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode to the model's channels: `imgcls.data.images.to_channels`, as training converts."""
    return to_channels(image, channels)


def _resize(image: Image.Image, size: tuple[int, int], interpolation: str) -> Image.Image:
    h, w = size
    return image if image.size == (w, h) else image.resize((w, h), PIL_FILTERS[interpolation])


def prepare(image: Image.Image, pre: dict) -> np.ndarray:
    """A PIL image (any mode) -> normalised float32 (C, H, W), from an artifact's `preprocess` dict."""
    image = to_mode(image, int(pre["channels"]))
    h, w = pre["image_size"]
    crop_pct = float(pre.get("crop_pct", 1.0))
    frame = (math.floor(h / crop_pct), math.floor(w / crop_pct)) if crop_pct < 1.0 else (h, w)
    rh, rw = cover_size(image.height, image.width, *frame)  # the aspect ratio kept, as in training
    image = _resize(image, (rh, rw), pre["interpolation"])
    for ch, cw in (frame, (h, w)):  # the frame's centre, then image_size's centre of it: training's two cuts
        top, left = center_box(image.height, image.width, ch, cw)
        if (image.height, image.width) != (ch, cw):
            image = image.crop((left, top, left + cw, top + ch))
    a = np.asarray(image, dtype=np.float32).reshape(h, w, -1).transpose(2, 0, 1)
    a = a * np.float32(1.0 / 255)
    mean = np.asarray(pre["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(pre["std"], dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((a - mean) / std)


def center_crop(image: Image.Image, fraction: float) -> Image.Image:
    w, h = image.size
    cw, ch = max(1, round(w * fraction)), max(1, round(h * fraction))
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def read_views(path: str, pre: dict, tta: bool = False, tta_crop: float = 0.0) -> np.ndarray:
    """The image and its test-time views (horizontal flip, center crop), preprocessed: (views, C, H, W)."""
    image = to_mode(open_image(path), int(pre["channels"]))  # upright by its EXIF orientation, as in training
    views = [image]
    if tta:
        views.append(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    if tta_crop:
        views.append(center_crop(image, tta_crop))
    return np.stack([prepare(v, pre) for v in views])


# ---------------------------------------------------------------- models
@dataclass
class Predictor:
    """A batch runner (float32 NCHW -> logits) plus what the model owns: classes, preprocessing, temperature."""

    run: Callable[[np.ndarray], np.ndarray]
    class_names: list[str]
    preprocess: dict
    temperature: float
    source: str


def deploy_metadata(config: dict) -> dict:
    """What an exported model carries about itself (ONNX metadata, extra files, preprocess.json)."""
    return {"format": DEPLOY_FORMAT, "class_names": list(config["class_names"]),
            "preprocess": config["preprocess"], "temperature": float(config.get("temperature", 1.0)),
            "model": config.get("model", {})}


def from_metadata(run: Callable, meta: dict, source: str) -> Predictor:
    return Predictor(run, list(meta["class_names"]), meta["preprocess"], float(meta.get("temperature", 1.0)),
                     source)


def load_onnx(path: str | Path) -> Predictor:
    import onnxruntime as ort

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
        raise ModelError(f"{path}: onnxruntime cannot load it: {e}") from None
    meta = session.get_modelmeta().custom_metadata_map
    if META_KEY not in meta:
        raise ModelError(f"{path}: this ONNX model has no {META_KEY!r} metadata (class names, preprocessing); "
                         f"export it with imgcls-export")
    name = session.get_inputs()[0].name
    metadata = json.loads(meta[META_KEY])
    names = check_class_names(metadata.get("class_names"), f"{path} (metadata {META_KEY!r})")
    outputs = session.get_outputs()[0].shape[-1]
    if isinstance(outputs, int) and outputs != len(names):
        raise ModelError(f"{path}: the model has {outputs} outputs but its metadata {META_KEY!r} lists {len(names)} "
                         f"class names; an exported model needs one class name per output")
    return from_metadata(lambda x: session.run(None, {name: x})[0], metadata, str(path))


def torch_predictor(module, meta: dict, source: str) -> Predictor:
    """Any torch callable (eager, TorchScript, torch.export) with the metadata it belongs to."""
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).float().numpy()
    return from_metadata(run, meta, source)


def check_outputs(config: dict, folder: str | Path) -> dict:
    """An artifact's config.json, refused unless it names one class per model output (`model.num_classes`, which
    the model is built with and its weights must fit)."""
    outputs, names = int(config["model"]["num_classes"]), config["class_names"]
    if outputs != len(names):
        raise ModelError(f"{folder}: the model has {outputs} outputs but config.json lists {len(names)} class "
                         f"names; an artifact needs one class name per output")
    return config


def load_checked_artifact(path: str | Path):
    """`load_artifact` for a folder that may come from anyone: (model, config, folder), or ModelError when its
    class names do not fit the model, or its weights are no safetensors file or do not fit the model."""
    from safetensors import SafetensorError

    from imgcls.inference.artifact import artifact_path, load_artifact, read_artifact_config

    folder = artifact_path(path)
    check_outputs(read_artifact_config(folder), folder)  # before the weights are read
    try:
        model, config = load_artifact(folder)
    except (SafetensorError, RuntimeError) as e:  # not safetensors / tensors that do not fit the model
        raise ModelError(f"{folder / 'model.safetensors'}: not the weights of the model its config.json "
                         f"describes ({' '.join(str(e).split())[:400]})") from None
    return model, config, folder


def load_torch(path: str | Path) -> Predictor:
    model, config, folder = load_checked_artifact(path)
    return torch_predictor(model, deploy_metadata(config), str(folder))


def load_predictor(model: str | Path) -> Predictor:
    return load_onnx(model) if str(model).lower().endswith(".onnx") else load_torch(model)


# ---------------------------------------------------------------- inputs and prediction
def _walk(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    return found


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Files as given, folders recursively (hidden entries left out), glob patterns expanded; in order, once.
    A path that does not exist is kept, so it is reported like any other unreadable input."""
    import glob

    found: list[str] = []
    for item in inputs:
        if Path(item).is_dir():
            found += _walk(Path(item))
        elif not Path(item).exists() and glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                log.warning("%s: matches no file", item)
            for m in matches:
                found += _walk(Path(m)) if Path(m).is_dir() else [m]
        else:
            found.append(item)
    return list(dict.fromkeys(found))


def decide(probs: np.ndarray, reject_below: float) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 index and whether to answer `uncertain`. The test is `1 - p_top > 1 - P` on the summed other
    probabilities, which stay representable where p_top itself rounds to 1.0: P = 1 rejects everything."""
    top = probs.argmax(axis=1)
    rest = np.where(np.arange(probs.shape[1]) == top[:, None], 0.0, probs).sum(axis=1)
    return top, rest > 1.0 - reject_below


def _rows(paths: list[str], probs: np.ndarray, names: list[str], top_k: int, reject_below: float,
          uncertain_label: str) -> list[dict]:
    top, uncertain = decide(probs, reject_below)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    return [{"path": p, "prediction": uncertain_label if u else names[t], "probability": float(probs[i, t]),
             "top_k": [(names[j], float(probs[i, j])) for j in order[i]]}
            for i, (p, t, u) in enumerate(zip(paths, top, uncertain))]


def predict(model: Predictor, paths: list[str], batch_size: int = 32, top_k: int = 3, reject_below: float = 0.0,
            tta: bool = False, tta_crop: float = 0.0, uncertain_label: str = UNCERTAIN) -> Iterator[dict]:
    """One row per path, in order: prediction, probability, top-k; or `error` for an unreadable file."""
    bar = tqdm(total=len(paths), unit="img", desc="predict", disable=None, dynamic_ncols=True)
    for start in range(0, len(paths), batch_size):
        chunk, good, arrays, rows = paths[start:start + batch_size], [], [], {}
        for path in chunk:
            try:
                arrays.append(read_views(path, model.preprocess, tta, tta_crop))
                good.append(path)
            except BAD_IMAGE_ERRORS as e:  # PIL's errors only: anything else is a bug and propagates
                log.warning("skipped %s: %s: %s", path, type(e).__name__, e)
                rows[path] = {"path": path, "error": f"{type(e).__name__}: {e}"}
        if arrays:
            views = arrays[0].shape[0]
            logits = model.run(np.concatenate(arrays)).reshape(len(good), views, -1)
            probs = softmax(logits, model.temperature).mean(axis=1)
            rows.update((r["path"], r) for r in _rows(good, probs, model.class_names, top_k, reject_below,
                                                                 uncertain_label))
        yield from (rows[p] for p in chunk)
        bar.update(len(chunk))
    bar.close()


# ---------------------------------------------------------------- output
def csv_writer(stream, top_k: int) -> Callable[[dict], None]:
    writer = csv.writer(stream)
    writer.writerow(["path", "prediction", "probability",
                     *[f"{x}_{i}" for i in range(1, top_k + 1) for x in ("label", "prob")], "error"])

    def write(row: dict) -> None:
        if "error" in row:
            writer.writerow([row["path"], "", "", *[""] * (2 * top_k), row["error"]])
            return
        pairs = [v for label, p in row["top_k"] for v in (label, f"{p:.6f}")]
        pairs += [""] * (2 * top_k - len(pairs))
        writer.writerow([row["path"], row["prediction"], f"{row['probability']:.6f}", *pairs, ""])
    return write


def jsonl_writer(stream, top_k: int) -> Callable[[dict], None]:
    def write(row: dict) -> None:
        if "top_k" in row:
            row = {**row, "top_k": [{"label": label, "probability": p} for label, p in row["top_k"]]}
        stream.write(json.dumps(row) + "\n")
    return write


@contextlib.contextmanager
def output_stream(output: str | None) -> Iterator:
    """Where rows go: stdout, or --output written whole or not at all (a temp file beside it, renamed at the end).
    File names are written as their bytes (surrogateescape): a name that is not UTF-8 is kept as it is on disk."""
    if not output:
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(errors="surrogateescape")
        yield sys.stdout
        return
    with atomic_path(output) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        yield f


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="imgcls-predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:3]))
    p.add_argument("model", help="artifact folder (model/best, model/last, a run folder) or an exported .onnx")
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--output", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--format", choices=("csv", "jsonl"), help="default: from --output's suffix, else csv")
    p.add_argument("--top-k", type=int, default=3, metavar="K", help="labels and probabilities per row (default 3)")
    p.add_argument("--reject-below", type=float, default=0.0, metavar="P",
                   help="answer 'uncertain' when the calibrated top probability is below P (0..1)")
    p.add_argument("--tta", action="store_true", help="average softmax over the image and its horizontal flip")
    p.add_argument("--tta-crop", type=float, default=0.0, metavar="FRACTION",
                   help="also average in a center crop of this fraction of each side, e.g. 0.875")
    p.add_argument("--uncertain-label", default=UNCERTAIN, metavar="NAME",
                   help="the answer below --reject-below (default 'uncertain'); must not be a class name")
    p.add_argument("--sort-into", type=Path, metavar="DIR", help="copy images into DIR/<label>/, DIR/uncertain/")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per forward pass (default 32)")
    args = p.parse_args(argv)
    if not 0.0 <= args.reject_below <= 1.0:
        p.error(f"--reject-below {args.reject_below}: must be between 0 and 1")
    if not 0.0 <= args.tta_crop < 1.0:
        p.error(f"--tta-crop {args.tta_crop}: must be a fraction in (0, 1)")
    if args.top_k < 1 or args.batch_size < 1:
        p.error("--top-k and --batch-size must be >= 1")
    problem = name_problem(args.uncertain_label)
    if problem:
        p.error(f"--uncertain-label {args.uncertain_label!r} {problem}")
    args.format = args.format or ("jsonl" if str(args.output or "").endswith((".jsonl", ".json")) else "csv")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        model = load_predictor(args.model)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.reject_below > 0 and args.uncertain_label in model.class_names:
        print(f"error: {args.model} has a class named {args.uncertain_label!r}, so that answer would be ambiguous "
              f"with --reject-below; pass --uncertain-label with another name, e.g. --uncertain-label UNSURE",
              file=sys.stderr)
        return 2
    paths = expand_inputs(args.inputs)
    if not paths:
        print(f"error: no input files in {args.inputs}", file=sys.stderr)
        return 2
    top_k = min(args.top_k, len(model.class_names))
    with output_stream(args.output) as stream:
        write = (jsonl_writer if args.format == "jsonl" else csv_writer)(stream, top_k)
        done, failed = [], 0
        for row in predict(model, paths, args.batch_size, top_k, args.reject_below, args.tta, args.tta_crop,
                           args.uncertain_label):
            write(row)
            if "error" in row:
                failed += 1
            else:
                done.append(row)
    if args.sort_into:
        try:
            log.info("copied %d images into %s", sort_into(done, args.sort_into), args.sort_into)
        except SortError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    uncertain = sum(r["prediction"] == args.uncertain_label for r in done)
    log.info("%d inputs: %d predicted (%d uncertain), %d failed%s", len(paths), len(done), uncertain, failed,
             f"; wrote {args.output}" if args.output else "")
    if not done:
        print(f"error: none of the {len(paths)} inputs could be read as an image (see the warnings above); "
              f"nothing was predicted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
