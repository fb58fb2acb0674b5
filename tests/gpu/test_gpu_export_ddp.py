"""A CUDA-trained model exported and parity-checked on the CPU; DDP with NCCL at world size 1 (the process
group, an all-reduce, a whole run's artifact); imgcls-doctor on CUDA.

Never run on the machines imgcls is developed on (no GPU): see docs/gpu.md."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gpu_common import CUDA, python, read_json, tiny_recipe
from helpers import only_run, run_train, subprocess_env

pytestmark = CUDA

# one process of a torchrun job: the same pre-flight and Accelerator as training, then one all-reduce by hand
NCCL_PROBE = '''
import json, sys, torch, torch.distributed as dist
from imgcls.recipe import TrainConfig
from imgcls.training.distributed import create_accelerator
acc = create_accelerator(TrainConfig(), seed=0)
ones = torch.ones(3, device=acc.device)
dist.all_reduce(ones)
print(json.dumps({"initialized": dist.is_initialized(), "backend": dist.get_backend(), "world": dist.get_world_size(),
                  "device": acc.device.type, "distributed_type": str(acc.distributed_type), "sum": ones.tolist()}))
acc.end_training()
'''


def torchrun(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args],
                          capture_output=True, text=True, timeout=timeout, env=subprocess_env(), cwd=cwd)


def test_a_cuda_trained_model_exports_and_passes_parity_on_the_cpu(tmp_path, image_folder):
    pytest.importorskip("onnxruntime", reason="imgcls-export's ONNX parity check needs onnxruntime (imgcls[export])")
    done = run_train(tiny_recipe(tmp_path, image_folder, "a"), "train.epochs=1")
    assert done.returncode == 0, done.stderr
    run = only_run(tmp_path / "a")
    assert read_json(run / "env.json")["device"].startswith("cuda")
    cpu_only = {**subprocess_env(), "CUDA_VISIBLE_DEVICES": ""}  # the reference logits and the parity on the CPU
    export = subprocess.run([python(), "-m", "imgcls.inference.export", str(run / "model" / "best"), "--format",
                             "onnx", "torchscript"], capture_output=True, text=True, timeout=240, env=cpu_only,
                            cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    report = read_json(run / "model" / "best" / "export" / "export_report.json")
    assert report["passed"] is True and set(report["formats"]) == {"onnx", "torchscript"}
    for fmt, r in report["formats"].items():
        assert r["max_abs_diff"] <= r["atol"], fmt


def test_nccl_at_world_size_1_forms_the_group_and_all_reduces(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(NCCL_PROBE)
    done = torchrun(str(probe), cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    got = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    assert got == {"initialized": True, "backend": "nccl", "world": 1, "device": "cuda",
                   "distributed_type": "DistributedType.MULTI_GPU", "sum": [1.0, 1.0, 1.0]}


def test_ddp_with_nccl_at_world_size_1_trains_and_writes_the_artifact(tmp_path, image_folder):
    recipe = tiny_recipe(tmp_path, image_folder, "a")
    done = torchrun("-m", "imgcls.train", str(recipe), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run = only_run(tmp_path / "a")
    env = read_json(run / "env.json")
    assert (env["backend"], env["world_size"], env["device"][:4]) == ("nccl", 1, "cuda")
    assert {"model.safetensors", "config.json"} <= {p.name for p in (run / "model" / "best").iterdir()}
    assert read_json(run / "results.json")["test"]["top1"] >= 0.9  # 4 classes: chance is 0.25


def test_imgcls_doctor_on_cuda_measures_three_speeds_in_bf16(tmp_path, image_folder):
    recipe = tiny_recipe(tmp_path, image_folder, "a", 'mixed_precision = "bf16"\nchannels_last = true')
    report_path = tmp_path / "doctor.json"
    done = subprocess.run([python(), "-m", "imgcls.doctor", str(recipe), "--steps", "20", "--seconds", "10",
                           "--report", str(report_path)], capture_output=True, text=True, timeout=180,
                          env=subprocess_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = read_json(report_path)
    assert (report["device"], report["precision"], report["channels_last"]) == ("cuda", "bf16", True)
    assert report["gpu"]  # the device's name
    speeds = report["images_per_s"]
    assert all(speeds[k] > 0 for k in ("bare", "input", "trainer"))
    assert report["ratio_trainer_bare"] == pytest.approx(speeds["trainer"] / speeds["bare"], rel=1e-12)
    assert report["limit"] in ("model", "input", "trainer") and report["advice"]
    assert "trainer / bare loop" in done.stdout
    assert not (tmp_path / "a").exists()  # nothing under the recipe's runs
