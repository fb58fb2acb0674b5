"""Check imgcls on a GPU machine in one command: tests/gpu, imgcls-doctor on three data sets, two whole recipes.

    PYTHONPATH=. python benchmarks/gpu_suite.py [--wheels DIR] [--shared ../shared] [--out DIR]
    PYTHONPATH=. python benchmarks/gpu_suite.py --smoke          # the same steps, tiny, on a CPU (CI)

Needs only torch, torchvision, accelerate and timm installed and this project on PYTHONPATH; the other packages
come from --wheels DIR (`pip install --no-index --find-links DIR`, see docs/gpu.md for the list). Each step runs
as a subprocess with a time budget: a step over budget is killed (its whole process group), recorded, and the
suite goes on. Steps:

  env        the packages imgcls needs import (installed from --wheels where missing)
  tests      pytest -m cuda tests/gpu
  doctor     imgcls-doctor on recipes/mnist.toml, recipes/cifar10.toml and a 224-px photo folder (10,000
             CIFAR-10 images upscaled to 448-px JPEGs), the folder decoded on the CPU with workers, then with
             data.decode = "gpu"
  train      recipes/mnist.toml and recipes/cifar10.toml whole, capped by train.max_time

Writes <out>/gpu_suite.json (every step: command, status, seconds, numbers, log file) and prints a one-screen
summary. Exit status 0 when no step failed or ran over budget (a step skipped with its reason is not a failure).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gpu_suite_data import smoke_data

REPO = Path(__file__).resolve().parents[1]

# import name -> distribution, for what imgcls and tests/gpu import beyond torch, torchvision, accelerate, timm
NEEDED = {"pydantic": "pydantic", "tomli_w": "tomli-w", "datasets": "datasets", "pyarrow": "pyarrow",
          "matplotlib": "matplotlib", "aiohttp": "aiohttp", "safetensors": "safetensors", "PIL": "pillow",
          "yaml": "pyyaml", "psutil": "psutil", "tqdm": "tqdm", "numpy": "numpy", "pytest": "pytest"}
OPTIONAL = {"pytest_timeout": "pytest-timeout", "torchcodec": "torchcodec", "onnx": "onnx",
            "onnxruntime": "onnxruntime", "onnxscript": "onnxscript"}
# seconds per step on one H100-class GPU with 16 cores (8 minutes in all), and in --smoke on 2 CPU cores (about
# 50 s in all on idle cores; the budgets leave room for a CI machine shared with other work)
# --smoke: the shipped recipes on a hundred generated images, with models a CPU trains in seconds
SMOKE = {"mnist": ["data.val_size=20", "train.global_batch_size=16"],
         "cifar10": ["data.val_size=20", "train.global_batch_size=16", "model.args={ widths = [8, 16, 16] }",
                     'train.mixed_precision="no"', "train.test_tta=false"]}
BUDGETS = {"env": (120, 60), "tests": (270, 90), "doctor": (60, 60), "photos": (40, 30), "train": (75, 60)}


def missing(names: dict) -> list[str]:
    return [dist for mod, dist in names.items() if importlib.util.find_spec(mod) is None]


def run(name: str, cmd: list[str], budget: float, out: Path, env: dict) -> dict:
    """One step as a subprocess in its own process group; killed whole when over budget."""
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=budget)
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, status = proc.wait(), "over budget"
    return {"name": name, "cmd": cmd, "status": status, "returncode": rc, "budget_s": budget,
            "seconds": round(time.perf_counter() - start, 1), "log": str(log)}


def skipped(name: str, why: str) -> dict:
    return {"name": name, "status": "skipped", "why": why}


class Suite:
    def __init__(self, args: argparse.Namespace):
        self.args, self.smoke, self.out = args, args.smoke, args.out.resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
                    "HF_DATASETS_CACHE": str(self.out / "hf_datasets"), "IMGCLS_CACHE": str(self.out / "imgcls_cache"),
                    "PYTHONUNBUFFERED": "1"}
        self.steps: list[dict] = []

    def budget(self, kind: str) -> float:
        return BUDGETS[kind][1 if self.smoke else 0]

    def step(self, name: str, cmd: list[str], kind: str) -> dict:
        result = run(name, cmd, self.budget(kind), self.out, self.env)
        self.steps.append(result)
        print(f"  {name}: {result['status']} in {result['seconds']:.0f} s", flush=True)
        return result

    def environment(self) -> bool:
        lacking = missing(NEEDED)
        if lacking and self.args.wheels:
            wanted = lacking + [d for d in missing(OPTIONAL)]
            self.step("env", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links",
                              str(self.args.wheels), *wanted], "env")
            importlib.invalidate_caches()
            lacking = missing(NEEDED)
        self.steps.append({"name": "packages", "status": "failed" if lacking else "passed", "missing": lacking,
                           "optional_missing": missing(OPTIONAL)})
        return not lacking

    def doctor(self, name: str, recipe: str, *overrides: str) -> dict:
        report = self.out / f"doctor_{name}.json"
        steps = ["--steps", "3", "--seconds", "0.5"] if self.smoke else ["--steps", "100", "--seconds", "5"]
        result = self.step(f"doctor {name}", [sys.executable, "-m", "imgcls.doctor", recipe, *overrides, *steps,
                                              "--report", str(report)], "doctor")
        if result["status"] == "passed":
            r = json.loads(report.read_text())
            result.update(images_per_s=r["images_per_s"], ratio=r["ratio_trainer_bare"], limit=r["limit"],
                          data_wait_fraction=r["data_wait_fraction"], advice=[a["setting"] for a in r["advice"]])
        return result

    def train(self, name: str, recipe: str, *overrides: str) -> dict:
        cap = ["train.max_steps=4"] if self.smoke else ["train.max_time=30"]
        runs = self.out / "runs"
        result = self.step(f"train {name}", [sys.executable, "-m", "imgcls.train", recipe, *overrides, *cap,
                                             f"checkpoint.output_dir={str(runs)!r}", "tracking.plots=false"], "train")
        found = sorted((runs / name).glob("*/results.json"))
        if result["status"] == "passed" and found:
            r = json.loads(found[-1].read_text())
            result.update(test_top1=r.get("test", {}).get("top1"), steps=r["steps"], stopped_by=r["stopped_by"])
        return result

    def data(self) -> dict[str, Path] | None:
        """Where MNIST, CIFAR-10 and the photo folder are: ../shared/data (--shared), or tiny stand-ins."""
        if self.smoke:
            return smoke_data(self.out / "smoke_data")
        shared = self.args.shared / "data"
        if not (shared / "mnist").is_dir() or not (shared / "cifar10").is_dir():
            return None
        photos = self.out / "photos448"
        made = self.step("photos", [sys.executable, str(Path(__file__).with_name("gpu_suite_data.py")), str(photos),
                                    "--n", "10000", "--size", "448", "--shared", str(self.args.shared)], "photos")
        if made["status"] == "passed":  # the folder's marker: "<n> images at <size> px"
            words = (photos / ".complete").read_text().split()
            made.update(images=int(words[0]), size=int(words[3]))
        return {"mnist": shared / "mnist", "cifar10": shared / "cifar10",
                "photos": photos if made["status"] == "passed" else None}

    def photos(self, folder: Path) -> None:
        cores = len(os.sched_getaffinity(0))
        recipe = "recipes/imagefolder_resnet18.toml"
        common = [f"data.root={str(folder)!r}"]
        if self.smoke:  # a model the CPU runs in seconds; the few val images per class are allowed
            common += ["data.image_size=[32, 32]", 'model.name="small_cnn"', "model.args={ width = 8 }",
                       "data.allow_rare_classes=true", "train.global_batch_size=16"]
        self.doctor("photos_cpu_decode", recipe, *common, f"data.workers={max(cores - 1, 1)}")
        gpu = self.doctor("photos_gpu_decode", recipe, *common, 'data.decode="gpu"', "data.workers=4")
        log = Path(gpu["log"]).read_text() if gpu["status"] == "failed" else ""
        if "error: data.decode = \"gpu\"" in log:  # refused before anything ran: no CUDA, or no torchcodec
            gpu.update(status="skipped", why=log.split("error: ", 1)[1].strip())

    def main(self) -> int:
        import torch

        started = time.perf_counter()
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device (CPU only)"
        print(f"imgcls GPU suite{' (smoke)' if self.smoke else ''} on {device}; logs in {self.out / 'logs'}",
              flush=True)
        if self.environment():
            self.step("tests/gpu", [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", "tests/gpu",
                                    f"--junitxml={self.out / 'tests_gpu.xml'}", "-p", "no:cacheprovider",
                                    *(["--timeout=150"] if importlib.util.find_spec("pytest_timeout") else [])],
                      "tests")
            self.steps[-1].update(junit_counts(self.out / "tests_gpu.xml"))
            data = self.data()
            if data is None:
                self.steps.append(skipped("doctor and train", f"no MNIST/CIFAR-10 under {self.args.shared}/data: "
                                                              f"pass --shared DIR"))
            else:
                mnist = [f"data.dataset={str(data['mnist'])!r}", *(SMOKE["mnist"] if self.smoke else [])]
                cifar = [f"data.dataset={str(data['cifar10'])!r}", *(SMOKE["cifar10"] if self.smoke else [])]
                self.doctor("mnist", "recipes/mnist.toml", *mnist)
                self.doctor("cifar10", "recipes/cifar10.toml", *cifar)
                if data["photos"] is not None:
                    self.photos(data["photos"])
                self.train("mnist", "recipes/mnist.toml", *mnist)
                self.train("cifar10", "recipes/cifar10.toml", *cifar)
        report = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": self.smoke,
                  "cores": len(os.sched_getaffinity(0)), "seconds": round(time.perf_counter() - started, 1),
                  "steps": self.steps}
        (self.out / "gpu_suite.json").write_text(json.dumps(report, indent=2))
        print(summary(report, self.out / "gpu_suite.json"))
        return 1 if any(s["status"] in ("failed", "over budget") for s in self.steps) else 0


def junit_counts(path: Path) -> dict:
    """passed / failed / skipped of pytest's junit XML (empty when the run died before writing it)."""
    if not path.exists():
        return {}
    import xml.etree.ElementTree as ET

    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n, failed, errors, skip = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return {"tests": n, "failed_tests": failed + errors, "skipped_tests": skip, "passed_tests": n - failed - errors - skip}


def line(s: dict) -> str:
    head = f"  {s['name']:<26} {s['status'].upper():<11}"
    if s["status"] == "skipped":
        return f"{head} {s['why'][:110]}"
    if "missing" in s:
        return f"{head} missing: {', '.join(s['missing']) or 'none'}; optional missing: " \
               f"{', '.join(s['optional_missing']) or 'none'}"
    time_ = f" {s['seconds']:>5.0f} s" if "seconds" in s else ""
    if "passed_tests" in s:
        return f"{head}{time_}  {s['passed_tests']} passed, {s['failed_tests']} failed, {s['skipped_tests']} skipped"
    if "images_per_s" in s:
        v = s["images_per_s"]
        return (f"{head}{time_}  bare {v['bare']:,.0f} | input {v['input']:,.0f} | trainer {v['trainer']:,.0f} img/s, "
                f"ratio {s['ratio']:.2f}, limit {s['limit']}" + (f"; advice: {s['advice'][0]}" if s["advice"] else ""))
    if "test_top1" in s:
        return f"{head}{time_}  test top1 {s['test_top1']}, {s['steps']} steps, stopped by {s['stopped_by'] or 'plan'}"
    if "images" in s:
        return f"{head}{time_}  {s['images']:,} JPEGs at {s['size']} px"
    return f"{head}{time_}" + (f"  see {s['log']}" if s["status"] != "passed" and "log" in s else "")


def summary(report: dict, path: Path) -> str:
    return "\n".join([f"imgcls GPU suite on {report['device']} (torch {report['torch']}, CUDA {report['cuda']}, "
                      f"{report['cores']} cores): {report['seconds']:.0f} s", *map(line, report["steps"]),
                      f"  report: {path}"])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="the same steps, tiny, on a CPU (CI proves nothing crashes)")
    p.add_argument("--wheels", type=Path, help="a folder of wheels for the packages torch & co. do not bring")
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="the folder holding data/mnist and "
                                                                                "data/cifar10 (default ../shared)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/out/gpu_suite[_smoke])")
    args = p.parse_args(argv)
    args.out = args.out or REPO / "benchmarks" / "out" / ("gpu_suite_smoke" if args.smoke else "gpu_suite")
    return args


if __name__ == "__main__":
    sys.exit(Suite(parse_args()).main())
