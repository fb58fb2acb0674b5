"""Export a model artifact to ONNX, TorchScript and torch.export, each proven to match the PyTorch model.

    imgcls-export ARTIFACT [--format onnx torchscript torch-export] [--fp16] [--opset N] [--out DIR]
                  [--data RECIPE_OR_FOLDER] [--parity-images N] [--atol X] [--check-only]

    imgcls-export runs/mnist/<run>/model/best --format onnx torchscript
    imgcls-export runs/mnist/<run> --format onnx --fp16 --data /data/mnist_pngs   # recipe data not reachable

ARTIFACT is `model/best`, `model/last` or a run folder. Files go to `<artifact>/export/` (or --out):
`model.onnx` (dynamic batch axis, the recipe's `export.opset`), `model.fp16.onnx` (--fp16; float32 in and
out), `model.torchscript.pt`, `model.pt2` (torch.export.save), `preprocess.json`, `export_report.json`. Every
exported file carries class names, preprocessing and temperature (ONNX metadata key `imgcls`, an `imgcls.json`
extra file in the others), so it runs without the artifact.

The parity check feeds real images (the recipe's validation split, `export.parity_images` of them) through
each exported file *with the preprocessing stored in that file*, and the PyTorch model with the artifact's
own, and compares logits at batch 1 and batch k. Above `export.parity_atol` (--atol) the command exits 1 and
says by how much; fp16 is held to max(atol, 1% of the largest logit). Defaults come from the artifact's
recipe.toml `[export]`. --check-only re-checks ONNX files already in the output folder; it refuses TorchScript
and torch.export files, whose loading can run code stored in them: those are checked only from the bytes this
process has just written (see SECURITY.md).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from imgcls.atomic import write_json
from imgcls.data.images import BAD_IMAGE_ERRORS, open_image
from imgcls.data.loaders import build_splits
from imgcls.errors import ClassNameError, DataError, ModelError, RecipeError
from imgcls.inference.artifact import artifact_path, read_artifact_config
from imgcls.inference.exporters import FILES, check_only_refusal, export_one, load_exported
from imgcls.inference.predictor import (Predictor, check_outputs, deploy_metadata, expand_inputs, load_checked_artifact,
                                        torch_predictor)
from imgcls.inference.preprocess import prepare
from imgcls.recipe import Recipe, load_recipe

log = logging.getLogger(__name__)

FP16_RTOL = 1e-2


# ---------------------------------------------------------------- parity images
def _spread(n_total: int, n: int) -> list[int]:
    """n indices spread evenly over range(n_total), so every class of a sorted split shows up."""
    return sorted({int(round(i)) for i in np.linspace(0, n_total - 1, min(n, n_total))})


def parity_images(recipe: Recipe, data: str | None, n: int) -> tuple[list, str]:
    """Real images for the check: the validation split of the recipe's (or --data recipe's) data, or
    images from a --data folder. Returns (PIL images, where they came from)."""
    if data and Path(data).is_dir():
        files = expand_inputs([data])
        images = []
        for path in [files[i] for i in _spread(len(files), 4 * n)] if files else []:
            try:
                images.append(open_image(path))  # upright by its EXIF orientation, as in training
            except BAD_IMAGE_ERRORS as e:  # a stray non-image file in the folder is not a reason to stop
                log.warning("parity images: skipped %s (%s)", path, e)
        return [images[i] for i in _spread(len(images), n)] if images else [], f"folder {data}"
    cfg = load_recipe(data).data if data else recipe.data
    val = build_splits(cfg).val
    picks = _spread(len(val), n)
    where = f"{data or 'the artifact recipe'} [data] val split ({len(val)} images)"
    return [val.open(val.indices[k]) for k in picks], where


# ---------------------------------------------------------------- the check
def _compare(ref: np.ndarray, got: np.ndarray) -> dict:
    return {"max_abs_diff": float(np.abs(ref - got).max()),
            "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()), "n": int(len(ref))}


def batch_1_and_k(predictor: Predictor, images: list) -> tuple[np.ndarray, np.ndarray]:
    """Logits of each image run alone and of all of them in one batch, with the predictor's own preprocessing."""
    x = np.stack([prepare(im, predictor.preprocess) for im in images])
    return np.concatenate([predictor.run(v[None]) for v in x]), predictor.run(x)


def parity(reference: tuple[np.ndarray, np.ndarray], class_names: list[str], candidate: Predictor, images: list,
           atol: float, fp16: bool = False) -> dict:
    """`candidate` (preprocessing from its own metadata) against the eager model's `batch_1_and_k` logits."""
    got_1, got_k = batch_1_and_k(candidate, images)
    result = {"batch_1": _compare(reference[0], got_1), "batch_k": _compare(reference[1], got_k)}
    worst = max(r["max_abs_diff"] for r in result.values())
    tol = max(atol, FP16_RTOL * float(np.abs(reference[1]).max())) if fp16 else atol
    same_names = candidate.class_names == class_names
    result.update(max_abs_diff=worst, atol=tol, class_names_match=same_names, passed=worst <= tol and same_names)
    return result


def failure_message(fmt: str, r: dict) -> str:
    if "error" in r:
        return f"{fmt}: export failed: {r['error']}"
    if not r["class_names_match"]:
        return f"{fmt}: the class names stored in the exported file differ from the artifact's"
    k = r["batch_k"]
    return (f"{fmt}: max |Δlogit| {r['max_abs_diff']:.6g} exceeds the tolerance {r['atol']:.6g} by "
            f"{r['max_abs_diff'] - r['atol']:.6g} (batch 1: {r['batch_1']['max_abs_diff']:.6g}, batch {k['n']}: "
            f"{k['max_abs_diff']:.6g}; top-1 agreement {round(k['top1_agreement'] * k['n'])}/{k['n']})")


def summary_table(report: dict) -> str:
    lines = ["| format | file | max abs Δlogit (b1 / bk) | top-1 agree (bk) | atol | result |",
             "|---|---|---|---|---|---|"]
    for fmt, r in report["formats"].items():
        if "error" in r:
            lines.append(f"| {fmt} | {r.get('file', '')} | - | - | - | ERROR |")
            continue
        lines.append(f"| {fmt} | {r['file']} | {r['batch_1']['max_abs_diff']:.3g} / "
                     f"{r['batch_k']['max_abs_diff']:.3g} | {r['batch_k']['top1_agreement']:.3f} | "
                     f"{r['atol']:.3g} | {'pass' if r['passed'] else 'FAIL'} |")
    return "\n".join(lines)


def run_export(folder: Path, formats: list[str], out: Path, opset: int, images: list, atol: float,
               check_only: bool = False) -> dict:
    """Export (unless check_only) and check each format; the report of `export_report.json`."""
    model, config, _ = load_checked_artifact(folder)
    meta = deploy_metadata(config)
    reference = batch_1_and_k(torch_predictor(model, meta, str(folder)), images)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "preprocess.json", meta)
    example = torch.from_numpy(np.stack([prepare(im, meta["preprocess"]) for im in images[:2]]))
    if len(example) < 2:  # torch.export specialises a batch of 1; trace with two
        example = torch.cat([example, example])
    report, onnx_cache = {}, {}
    for fmt in formats:
        try:
            info, written = ({"file": FILES[fmt]}, None) if check_only else \
                export_one(fmt, model, example, opset, meta, out, onnx_cache)
            log.info("%s: %s; checking parity on %d images", fmt, out / FILES[fmt], len(images))
            candidate = load_exported(fmt, out / FILES[fmt], written)
            report[fmt] = {**info, **parity(reference, meta["class_names"], candidate, images, atol,
                                            fp16=fmt == "onnx_fp16")}
        except Exception as e:  # one format failing to export must not hide the others' results
            log.exception("%s: export failed", fmt)
            report[fmt] = {"file": FILES[fmt], "error": f"{type(e).__name__}: {e}", "passed": False}
    return report


# ---------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="imgcls-export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:3]))
    p.add_argument("artifact", help="model/best, model/last, or a run folder")
    p.add_argument("--format", nargs="+", dest="formats", metavar="FORMAT",
                   choices=("onnx", "torchscript", "torch-export", "torch_export"),
                   help="onnx torchscript torch-export (default: the recipe's export.formats, else onnx)")
    p.add_argument("--fp16", action="store_true", default=None, help="also write model.fp16.onnx")
    p.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default: the recipe's export.opset)")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: <artifact>/export)")
    p.add_argument("--data", metavar="RECIPE_OR_FOLDER",
                   help="a recipe TOML or an image folder for the parity images, when the artifact recipe's data "
                        "is not reachable")
    p.add_argument("--parity-images", type=int, metavar="N",
                   help="images in the check (default: export.parity_images)")
    p.add_argument("--atol", type=float, metavar="X", help="max |Δlogit| allowed (default: export.parity_atol)")
    p.add_argument("--check-only", action="store_true",
                   help="re-check the ONNX files already in --out (TorchScript and torch.export files are refused: "
                        "loading them can run code)")
    return p.parse_args(argv)


def resolve_formats(args: argparse.Namespace, recipe: Recipe) -> list[str]:
    formats = [f.replace("-", "_") for f in (args.formats or recipe.export.formats or ["onnx"])]
    if args.fp16 or (args.fp16 is None and recipe.export.onnx_fp16):
        formats.append("onnx_fp16")
    return list(dict.fromkeys(formats))


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        folder = artifact_path(args.artifact)
        check_outputs(read_artifact_config(folder), folder)
        recipe = load_recipe(folder / "recipe.toml")
        images, where = parity_images(recipe, args.data, args.parity_images or recipe.export.parity_images)
    except (FileNotFoundError, RecipeError, ModelError, ClassNameError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"error: {e}\nThe parity check needs real images: point --data at a recipe whose data is "
              f"reachable, or at a folder of images.", file=sys.stderr)
        return 2
    if not images:
        print(f"error: no readable images for the parity check in {where}", file=sys.stderr)
        return 2
    out = args.out or folder / "export"
    opset = args.opset or recipe.export.opset
    atol = args.atol if args.atol is not None else recipe.export.parity_atol
    asked = resolve_formats(args, recipe)
    refusal = check_only_refusal(asked, out) if args.check_only else None
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    try:
        formats = run_export(folder, asked, out, opset, images, atol, args.check_only)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = {"artifact": str(folder), "images": {"source": where, "n": len(images)}, "opset": opset,
              "versions": {"torch": torch.__version__, **_runtime_versions()}, "formats": formats,
              "passed": all(r["passed"] for r in formats.values())}
    write_json(out / "export_report.json", report)
    print(summary_table(report))
    for fmt, r in formats.items():
        if not r["passed"]:
            log.error("parity check failed: %s", failure_message(fmt, r))
    log.info("%s -> %s", "all formats match" if report["passed"] else "FAILED", out / "export_report.json")
    return 0 if report["passed"] else 1


def _runtime_versions() -> dict:
    """onnx's and onnxruntime's versions where they are installed (a TorchScript-only export needs neither)."""
    found = {}
    for name in ("onnx", "onnxruntime"):
        try:
            found[name] = importlib.import_module(name).__version__
        except ImportError:
            continue
    return found


if __name__ == "__main__":
    sys.exit(main())
