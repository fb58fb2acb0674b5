"""The serving core, shared by imgcls-predict, imgcls-eval and imgcls-export: a `Predictor` (an artifact run by
torch, or an exported ONNX file run by onnxruntime, with the class names, preprocessing and temperature it
carries), the inputs (files, folders, globs), prediction in batches, and `decide` (the answer, or "uncertain"
below --reject-below). The ONNX path imports neither torch nor the training code.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from imgcls.data.classnames import check_class_names
from imgcls.data.images import BAD_IMAGE_ERRORS
from imgcls.errors import ModelError
from imgcls.inference.calibration import softmax
from imgcls.inference.preprocess import read_views

log = logging.getLogger("imgcls.inference.predict")

META_KEY = "imgcls"  # ONNX metadata_props key / extra-file stem holding `deploy_metadata` as JSON


DEPLOY_FORMAT = "imgcls-deploy/1"


UNCERTAIN = "uncertain"


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

