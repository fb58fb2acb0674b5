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

Argument parsing, the output (CSV / JSONL, --sort-into) and one call: the serving core is
`imgcls.inference.predictor` (models, inputs, `decide`), the pixels `imgcls.inference.preprocess.prepare`, the
same for the trainer's eval frame, the artifact and the ONNX file.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Iterator

from imgcls.atomic import atomic_path
from imgcls.data.classnames import name_problem
from imgcls.errors import SortError
from imgcls.inference.predictor import UNCERTAIN, expand_inputs, load_predictor, predict
from imgcls.inference.sortinto import sort_into

log = logging.getLogger(__name__)


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
