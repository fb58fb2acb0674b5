"""imgcls-doctor on the CPU: the report's fields and speeds, the limit named, the advice on a recipe made
input-bound on purpose (a 224-px JPEG folder with data.workers = 0), the GPU-only refusals, and the verdict's
arithmetic on given numbers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_recipe
from helpers import subprocess_env
from imgcls.doctor import main as doctor_main
from imgcls.recipe import load_recipe
from imgcls.training.doctor_advice import LIMITS, advise, name_limit

FIELDS = {"recipe", "overrides", "name", "device", "cores", "precision", "per_device_batch", "train_images",
          "workers", "cache", "decode", "channels_last", "images_per_s", "ratio_trainer_bare", "data_wait_fraction",
          "input", "trainer", "limit", "ms_per_image", "advice", "variants", "steps", "total_s"}


def run_doctor(recipe: Path, *args: str) -> tuple[int, dict | None]:
    report = recipe.parent / "doctor.json"
    code = doctor_main([str(recipe), *args, "--report", str(report)])
    return code, json.loads(report.read_text()) if report.exists() else None


def test_report_holds_three_positive_speeds_their_ratio_and_the_limit(tmp_path, image_folder, capsys):
    recipe = write_recipe(tmp_path / "r.toml", f'source = "folder"\nroot = "{image_folder}"')
    code, report = run_doctor(recipe, "--steps", "8", "--seconds", "10")
    assert code == 0
    assert FIELDS <= report.keys()
    speeds = report["images_per_s"]
    assert set(speeds) == {"bare", "input", "trainer"} and all(v > 0 for v in speeds.values())
    assert report["ratio_trainer_bare"] == pytest.approx(speeds["trainer"] / speeds["bare"], rel=1e-12)
    assert report["limit"] in LIMITS and report["advice"]
    assert report["device"] == "cpu" and report["per_device_batch"] == 16 and report["train_images"] == 160
    assert 0 < report["trainer"]["steps"] <= 8
    out = capsys.readouterr().out
    for line in ("bare loop (model alone)", "input pipeline (no model)", "trainer / bare loop",
                 f"limit: {LIMITS[report['limit']]}", f"report: {recipe.parent / 'doctor.json'}"):
        assert line in out
    assert not (tmp_path / "runs").exists()  # the doctor writes nothing under the recipe's runs


def jpeg_folder(root: Path, n: int = 24, size: int = 224) -> Path:
    """4 classes of noisy 224-px JPEGs (noise: the decoder gets no easy blocks)."""
    rng = np.random.default_rng(0)
    for label in "abcd":
        (root / label).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(root / label / f"{i}.jpg", quality=95)
    return root


def test_an_input_bound_recipe_is_named_so_and_told_to_raise_workers(tmp_path, capsys):
    """Input-bound on purpose: every step decodes 224-px JPEGs in the model's own process (workers = 0), and
    the model, trained on 16-px crops of them, costs little. One thread: two threads on a CPU shared with other
    work wait on each other at every operation, which makes a tiny model look slow."""
    root = jpeg_folder(tmp_path / "photos")
    recipe = tmp_path / "photos.toml"
    recipe.write_text(f'''name = "photos"
[data]
source = "folder"
root = "{root}"
val_fraction = 0.2
image_size = [16, 16]
working_size = [224, 224]
workers = 0
[data.augment]
random_resized_crop = true
[model]
name = "small_cnn"
args = {{ width = 4, blocks = 1, dropout = 0.0 }}
[train]
epochs = 1
global_batch_size = 16
cpu_threads = 1
[checkpoint]
output_dir = "{tmp_path / 'runs'}"
''')
    code, report = run_doctor(recipe, "--steps", "4", "--seconds", "20")
    assert code == 0
    assert report["limit"] == "input"
    assert report["data_wait_fraction"] > 0.2  # workers = 0: the model's process decodes every image itself
    settings = [a["setting"] for a in report["advice"]]
    # on the CPU decoding once comes first (a worker takes a core from the model's threads there)
    assert settings[0] == 'data.cache = "memory" (or "disk")'
    assert "(11 MiB at the working size)" in report["advice"][0]["why"]  # 76 train images x 3 x 224 x 224 bytes
    workers = int(settings[1].removeprefix("data.workers = "))
    assert 1 <= workers <= max(report["cores"] - 1, 1)
    assert f"set train.cpu_threads = {max(report['cores'] - workers, 1)} with it" in report["advice"][1]["why"]
    assert f"- data.workers = {workers}: the loader gives" in capsys.readouterr().out


def test_fp16_on_the_cpu_is_refused_by_the_doctor_as_by_train(tmp_path, image_folder, capsys):
    recipe = write_recipe(tmp_path / "r.toml", f'source = "folder"\nroot = "{image_folder}"')
    code, report = run_doctor(recipe, 'train.mixed_precision="fp16"')
    assert (code, report) == (2, None)
    assert ("error: fp16 was asked for but this process runs on the CPU, where Accelerate would silently compute "
            "in fp32") in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_gpu_decode_without_cuda_is_refused_by_the_doctor_as_by_train(tmp_path, image_folder, capsys):
    recipe = write_recipe(tmp_path / "r.toml", f'source = "folder"\nroot = "{image_folder}"')
    code, report = run_doctor(recipe, 'data.decode="gpu"')
    assert (code, report) == (2, None)
    assert ('error: data.decode = "gpu" decodes training JPEGs with nvJPEG on a CUDA device, and this process '
            'computes on cpu: no CUDA device here') in capsys.readouterr().err


def facts(**kw) -> dict:
    return {"device": "cuda", "cores": 16, "precision": "no", "per_device_batch": 128, "working_bytes": 2 ** 30,
            "bf16_ok": True, **kw}


def test_waiting_for_workers_on_a_gpu_gets_workers_from_the_per_worker_speed_then_cache_and_nvjpeg():
    recipe = load_recipe_text("data.workers=2")
    speeds = {"bare": 3000.0, "input": 800.0, "trainer": 800.0}
    inputs = {"fetch_images_per_s": 800.0, "prepare_images_per_s": 100000.0}
    measured = {"data_wait_fraction": 0.7}
    limit = name_limit(speeds, inputs, measured)
    assert limit["limit"] == "input"
    assert limit["ms_per_image"]["input"] == pytest.approx(0.7 * 1000 / 800 + 1000 / 100000)
    got = advise(recipe, facts(), speeds, inputs, measured, limit, {})
    # 400 images/s per worker; 1.2 x 3000 / 400 = 9 workers
    assert [a["setting"] for a in got] == ["data.workers = 9", 'data.cache = "memory" (or "disk")',
                                           'data.decode = "gpu"']
    assert "~400 per worker" in got[0]["why"] and "3,000 images/s" in got[0]["why"]


def test_workers_are_capped_by_the_cores_and_the_cap_is_said():
    recipe = load_recipe_text("data.workers=0")
    speeds = {"bare": 3000.0, "input": 100.0, "trainer": 100.0}
    inputs = {"fetch_images_per_s": 100.0, "prepare_images_per_s": 100000.0}
    got = advise(recipe, facts(cores=4), speeds, inputs, {"data_wait_fraction": 0.9},
                 name_limit(speeds, inputs, {"data_wait_fraction": 0.9}), {})
    assert got[0]["setting"] == "data.workers = 3"
    assert "3 is all this machine's 4 cores allow" in got[0]["why"]


def test_a_model_bound_run_is_advised_only_the_variants_that_measured_faster():
    recipe = load_recipe_text()
    speeds = {"bare": 1000.0, "input": 50000.0, "trainer": 950.0}
    inputs = {"fetch_images_per_s": 60000.0, "prepare_images_per_s": 200000.0}
    limit = name_limit(speeds, inputs, {"data_wait_fraction": 0.0})
    assert limit["limit"] == "model"
    variants = {"train.channels_last": {"images_per_s": 1500.0, "gain": 1.5},
                "train.mixed_precision": {"images_per_s": 1050.0, "gain": 1.05},
                "batch_x2": {"images_per_s": 1300.0, "gain": 1.3}}
    got = advise(recipe, facts(), speeds, inputs, {"data_wait_fraction": 0.0}, limit, variants)
    assert [a["setting"] for a in got] == ["train.channels_last = true", "train.global_batch_size = 128"]
    assert "from 1,000 to 1,500 images/s (x1.50)" in got[0]["why"]


def test_time_in_neither_model_nor_data_is_the_trainer_and_names_its_per_step_costs():
    recipe = load_recipe_text('train.on_nonfinite="skip"', "train.log_every_steps=5")
    speeds = {"bare": 1000.0, "input": 50000.0, "trainer": 400.0}
    inputs = {"fetch_images_per_s": 60000.0, "prepare_images_per_s": 100000.0}
    limit = name_limit(speeds, inputs, {"data_wait_fraction": 0.0})
    assert limit["limit"] == "trainer"
    assert limit["ms_per_image"]["trainer"] == pytest.approx(2.5 - 1.0 - 0.01)
    (got,) = advise(recipe, facts(), speeds, inputs, {"data_wait_fraction": 0.0}, limit, {})
    assert 'train.on_nonfinite = "skip" waits for the device after every step' in got["setting"]
    assert "train.log_every_steps = 5" in got["setting"]
    assert got["why"] == f"{1.49 * 128:.1f} ms per batch of 128 is neither the model nor the data"


def load_recipe_text(*overrides: str):
    """recipes/imagefolder_resnet18.toml: a folder of photos, global batch 64."""
    return load_recipe(Path(__file__).parents[1] / "recipes" / "imagefolder_resnet18.toml", list(overrides))


def test_a_trainer_stopped_by_the_time_limit_before_its_first_log_still_gives_a_speed(tmp_path, image_folder):
    """--seconds far below one step: every phase still times one step; the trainer's steps since its last
    logged window (here: all of them) are logged when the phase ends."""
    recipe = write_recipe(tmp_path / "r.toml", f'source = "folder"\nroot = "{image_folder}"')
    code, report = run_doctor(recipe, "--steps", "40", "--seconds", "0.001")
    assert code == 0
    assert report["trainer"]["steps"] == 1 and report["trainer"]["windows"] == 1
    assert 1 <= report["input"]["batches"] < 9  # 10 batches an epoch, the first not timed
    assert all(v > 0 for v in report["images_per_s"].values())


def test_a_train_split_of_one_batch_is_a_clear_error_not_a_traceback(tmp_path, image_folder, capsys):
    recipe = write_recipe(tmp_path / "r.toml", f'source = "folder"\nroot = "{image_folder}"')
    code, report = run_doctor(recipe, "train.global_batch_size=100")  # 160 train images: one batch
    assert (code, report) == (2, None)
    assert ("error: imgcls-doctor times the train loader from its second batch on, and it gave fewer than 2 "
            "batches of 100: use a train split of at least 200 images") in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_are_refused_one_device_is_measured(tmp_path, image_folder):
    """Under a 2-process launch each process would measure its own device and both would write the report."""
    recipe = write_recipe(tmp_path / "r.toml", f'source = "folder"\nroot = "{image_folder}"')
    env = {**subprocess_env(), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "IMGCLS_PREFLIGHT_TIMEOUT": "120"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "imgcls.doctor", str(recipe), "--report", str(tmp_path / "d.json")],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode != 0
    assert ("error: imgcls-doctor measures one device in one process, and this is process 0 of 2: run it as "
            "imgcls-doctor RECIPE (or python -m imgcls.doctor RECIPE), not under accelerate launch or torchrun"
            ) in done.stderr
    assert not (tmp_path / "d.json").exists()
