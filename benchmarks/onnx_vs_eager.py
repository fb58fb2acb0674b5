"""PyTorch eager vs ONNX Runtime inference speed on CPU, for one model artifact.

    python benchmarks/onnx_vs_eager.py runs/mnist/<run>/model/best
    python benchmarks/onnx_vs_eager.py runs/mnist/<run>/model/best --batch-sizes 1 32 --runs 50 --threads 2 \
        --onnx runs/mnist/<run>/model/best/export/model.onnx --json results/onnx_vs_eager_mnist.json

Without --onnx the artifact is exported to a temporary folder with the recipe's opset. Both backends get the
same input of the model's shape (timings do not depend on pixel values) and the same thread count; each batch
size gets warmup runs, then the median (and p90) of N timed runs. Prints a markdown table (ms per batch,
images/s, ONNX speed-up) and writes the numbers, with versions and CPU, as JSON. The outputs of the two
backends are compared once, so a fast but wrong export does not go unnoticed.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

from imgcls.inference.artifact import artifact_path, load_artifact
from imgcls.inference.exporters import onnx_proto, write_onnx
from imgcls.inference.predictor import deploy_metadata
from imgcls.recipe import load_recipe

log = logging.getLogger("onnx_vs_eager")


def time_runs(fn: Callable[[], object], warmup: int, runs: int) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"median_s": statistics.median(times), "p90_s": times[int(0.9 * (len(times) - 1))],
            "min_s": times[0], "runs": runs}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def onnx_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_to(folder: Path, model: torch.nn.Module, config: dict, opset: int, tmp: Path) -> Path:
    channels = config["model"]["in_channels"]
    h, w = config["preprocess"]["image_size"]
    proto, exporter = onnx_proto(model, torch.zeros(2, channels, h, w), opset)
    path = tmp / "model.onnx"
    write_onnx(proto, deploy_metadata(config), path)
    log.info("exported %s with %s, opset %d", folder, exporter, opset)
    return path


def benchmark(model: torch.nn.Module, session: ort.InferenceSession, shape: tuple, batch_sizes: list[int],
              warmup: int, runs: int) -> list[dict]:
    name = session.get_inputs()[0].name
    rows = []
    for batch in batch_sizes:
        x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            eager_out = model(xt).float().numpy()
            eager = time_runs(lambda: model(xt), warmup, runs)
        onnx_out = session.run(None, {name: x})[0]
        onnx = time_runs(lambda: session.run(None, {name: x}), warmup, runs)
        for backend, t in (("pytorch eager", eager), ("onnxruntime", onnx)):
            rows.append({"backend": backend, "batch": batch, **t, "images_per_s": batch / t["median_s"]})
        rows[-1]["speedup_vs_eager"] = eager["median_s"] / onnx["median_s"]
        rows[-1]["max_abs_diff_vs_eager"] = float(np.abs(eager_out - onnx_out).max())
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| backend | batch | median ms | p90 ms | images/s | speed-up |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        speedup = f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else "1.00x"
        lines.append(f"| {r['backend']} | {r['batch']} | {r['median_s'] * 1e3:.3f} | {r['p90_s'] * 1e3:.3f} | "
                     f"{r['images_per_s']:,.0f} | {speedup} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("artifact", help="model/best, model/last, or a run folder")
    p.add_argument("--onnx", type=Path, help="an existing export of this artifact (default: export one now)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--runs", type=int, default=50, help="timed runs per batch size (the median is reported)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="for both backends")
    p.add_argument("--json", type=Path, default=Path("onnx_vs_eager.json"), help="where to write the numbers")
    args = p.parse_args(argv)
    if args.onnx and not args.onnx.is_file():
        p.error(f"--onnx {args.onnx}: no such file (imgcls-export writes <artifact>/export/model.onnx)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folder = artifact_path(args.artifact)
    model, config = load_artifact(folder)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = args.onnx or export_to(folder, model, config, load_recipe(folder / "recipe.toml").export.opset,
                                           Path(tmp))
        session = onnx_session(onnx_file, args.threads)
        shape = (config["model"]["in_channels"], *config["preprocess"]["image_size"])
        rows = benchmark(model, session, shape, args.batch_sizes, args.warmup, args.runs)
    result = {"artifact": str(folder), "model": config["model"], "input_shape": list(shape),
              "onnx": str(args.onnx) if args.onnx else "exported to a temporary folder", "threads": args.threads,
              "cpu": cpu_name(), "torch": torch.__version__, "onnxruntime": ort.__version__,
              "python": platform.python_version(), "warmup": args.warmup, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"{config['model']['name']} {list(shape)} on {result['cpu']}, {args.threads} thread(s), torch "
          f"{torch.__version__}, onnxruntime {ort.__version__}\n")
    print(markdown(rows))
    log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
