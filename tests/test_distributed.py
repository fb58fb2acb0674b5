"""Several processes on CPU (gloo) through `accelerate launch`: same numbers as one process, one writer,
a 2-node job on loopback, and the precision policy (bf16 really used; fp16 on CPU refused)."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_class_folders, write_recipe
from helpers import (metrics_rows, only_run, relative_files, stable_rows, subprocess_env, train_cmd, train_inprocess,
                     wait_for_checkpoint, weights)
from imgcls.train import EXIT_PREEMPTED

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(recipe: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *flags, "-m", "imgcls.train", str(recipe)]


def cpu_env() -> dict:
    env = subprocess_env()
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", IMGCLS_PREFLIGHT_TIMEOUT="120")
    return env


@pytest.fixture
def no_bn_recipe(tmp_path, image_folder):
    """No batch norm and no dropout: the only difference between 1 and 2 processes is how the sum is split."""
    def make(runs: str) -> Path:
        recipe = write_recipe(tmp_path / f"{runs}.toml", f'source = "folder"\nroot = "{image_folder}"',
                              output_dir=tmp_path / runs, augment="crop_padding = 2")
        recipe.write_text(recipe.read_text().replace("dropout = 0.0", 'dropout = 0.0, norm = "none"'))
        return recipe
    return make


def test_two_processes_match_one_process_and_only_rank0_writes(tmp_path, no_bn_recipe):
    one = no_bn_recipe("one")
    assert train_inprocess(one) == 0
    two = no_bn_recipe("two")
    done = subprocess.run(launch_cmd(two, "--multi_gpu", "--num_processes", "2", "--main_process_port",
                                     str(free_port())), capture_output=True, text=True, env=cpu_env(),
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run1, run2 = only_run(tmp_path / "one"), only_run(tmp_path / "two")
    env2 = json.loads((run2 / "env.json").read_text())
    assert (env2["world_size"], env2["backend"], env2["per_device_batch_size"]) == (2, "gloo", 8)

    w1, w2 = weights(run1 / "model" / "last"), weights(run2 / "model" / "last")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    val = lambda run: [(r["step"], r["n"], r["top1"]) for r in metrics_rows(run) if r["event"] in ("val", "test")]
    assert val(run1) == val(run2)
    assert [r["step"] for r in stable_rows(run1)] == [r["step"] for r in stable_rows(run2)]  # no row twice

    # rank 1 writes nothing but its own RNG state inside each resume checkpoint
    ckpts = {p.split("/")[1] for p in relative_files(run2) if p.startswith("checkpoints/")}
    expected = relative_files(run1) | {f"checkpoints/{c}/random_states_1.pkl" for c in ckpts}
    assert relative_files(run2) == expected
    assert len(list((tmp_path / "two").iterdir())) == 1


def test_two_node_job_on_loopback_completes_with_one_run_dir(tmp_path, no_bn_recipe):
    recipe = no_bn_recipe("nodes")
    port = str(free_port())
    procs = [subprocess.Popen(
        launch_cmd(recipe, "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank), "--num_processes",
                   "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cpu_env(), cwd=tmp_path)
        for rank in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    run = only_run(tmp_path / "nodes")
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 2
    assert json.loads((run / "results.json").read_text())["steps"] == 30


def test_bf16_on_cpu_runs_convolutions_in_bfloat16():
    from imgcls.training.distributed import create_accelerator
    from imgcls.models.registry import build_model
    from imgcls.recipe import ModelConfig, TrainConfig

    accelerator = create_accelerator(TrainConfig(mixed_precision="bf16"), seed=0)
    assert accelerator.mixed_precision == "bf16"
    model = accelerator.prepare(build_model(ModelConfig(name="small_cnn", args={"width": 4}), 3, 1, (16, 16)))
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    logits = model(torch.randn(2, 1, 16, 16))
    assert seen and set(seen) == {torch.bfloat16}
    assert logits.shape == (2, 3)


def test_bf16_training_run_logs_bf16_as_the_precision(tmp_path, image_folder):
    recipe = write_recipe(tmp_path / "t.toml", f'source = "folder"\nroot = "{image_folder}"')
    assert train_inprocess(recipe, 'train.mixed_precision="bf16"') == 0
    run = only_run(tmp_path / "runs")
    assert json.loads((run / "env.json").read_text())["mixed_precision"] == "bf16"
    assert "precision in effect: bf16 on cpu" in (run / "train.log").read_text()
    assert json.loads((run / "results.json").read_text())["test"]["top1"] >= 0.9


def test_bf16_on_a_cpu_without_bf16_instructions_warns_that_it_is_emulated(tmp_path, image_folder, monkeypatch):
    import imgcls.training.distributed

    recipe = write_recipe(tmp_path / "t.toml", f'source = "folder"\nroot = "{image_folder}"')
    monkeypatch.setattr(imgcls.training.distributed, "cpu_has_native_bf16", lambda: False)
    assert train_inprocess(recipe, 'train.mixed_precision="bf16"', "train.epochs=1") == 0
    log = (only_run(tmp_path / "runs") / "train.log").read_text()
    assert ("WARNING imgcls.train: [RANK 0] bf16 autocast on a CPU without bf16 instructions (AVX512-BF16 or AMX) is "
            "emulated and usually slower than fp32 here; set train.mixed_precision=\"no\" on this machine") in log
    monkeypatch.setattr(imgcls.training.distributed, "cpu_has_native_bf16", lambda: True)
    assert train_inprocess(recipe, 'train.mixed_precision="bf16"', "train.epochs=1",
                           f"checkpoint.output_dir={tmp_path / 'runs2'}") == 0
    assert "bf16 autocast on a CPU" not in (only_run(tmp_path / "runs2") / "train.log").read_text()


def test_fp16_on_cpu_is_refused_with_a_clear_message(tmp_path, image_folder, capsys):
    recipe = write_recipe(tmp_path / "t.toml", f'source = "folder"\nroot = "{image_folder}"')
    assert train_inprocess(recipe, 'train.mixed_precision="fp16"') == 2
    err = capsys.readouterr().err
    assert "fp16 was asked for but this process runs on the CPU, where Accelerate would silently compute" in err
    assert 'train.mixed_precision="bf16"' in err
    assert not (tmp_path / "runs").exists()


def test_resume_on_another_process_count_keeps_the_global_batch_and_the_data_position(tmp_path, no_bn_recipe):
    """1 process is stopped mid-epoch (SIGTERM); 2 processes finish the run: the same weights and validation
    numbers as one process all the way."""
    straight = no_bn_recipe("one")
    assert train_inprocess(straight) == 0
    moved = no_bn_recipe("moved")
    proc = subprocess.Popen(train_cmd(moved, "checkpoint.every_steps=4"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=tmp_path)
    wait_for_checkpoint(tmp_path / "moved", 12, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED
    done = subprocess.run(launch_cmd(moved, "--multi_gpu", "--num_processes", "2", "--main_process_port",
                                     str(free_port())) + ["--resume", "auto", "checkpoint.every_steps=4"],
                          capture_output=True, text=True, env=cpu_env(), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming a run saved with 1 process(es) on 2: the global batch is kept" in done.stderr
    run1, run2 = only_run(tmp_path / "one"), only_run(tmp_path / "moved")
    assert json.loads((run2 / "results.json").read_text())["steps"] == 30
    w1, w2 = weights(run1 / "model" / "last"), weights(run2 / "model" / "last")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    val = lambda run: [(r["step"], r["n"], r["top1"]) for r in metrics_rows(run) if r["event"] in ("val", "test")]
    assert val(run1) == val(run2)


def test_cpu_threads_auto_shares_the_cores_between_local_processes():
    from imgcls.training.distributed import cpu_threads

    assert cpu_threads("auto", cores=2, local_processes=1) == 2
    assert cpu_threads("auto", cores=2, local_processes=2) == 1
    assert cpu_threads("auto", cores=8, local_processes=3) == 2
    assert cpu_threads("auto", cores=1, local_processes=4) == 1
    assert cpu_threads(3, cores=2, local_processes=1) == 3  # the user's number wins


def test_a_bare_launch_computes_with_every_core_and_says_so(tmp_path, image_folder, monkeypatch, caplog):
    """`accelerate launch` without --cpu sets OMP_NUM_THREADS=1 (one thread, one core idle): not any more."""
    import logging
    import os

    recipe = write_recipe(tmp_path / "tiny.toml", f'source = "folder"\nroot = "{image_folder}"')
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with caplog.at_level(logging.INFO):
            assert train_inprocess(recipe, "train.max_steps=2", "checkpoint.every_epochs=0") == 0
    finally:
        torch.set_num_threads(before)
    cores = len(os.sched_getaffinity(0))
    assert json.loads((only_run(tmp_path / "runs") / "env.json").read_text())["torch_threads"] == cores
    assert (f"computing on the CPU with {cores} thread(s) per process (auto: cores / local processes; "
            "OMP_NUM_THREADS=1 is overridden); set train.cpu_threads=N to change it") in caplog.text
    assert train_inprocess(recipe, "train.max_steps=2", "train.cpu_threads=1", "name=one") == 0
    torch.set_num_threads(before)
    assert json.loads((only_run(tmp_path / "runs", "one") / "env.json").read_text())["torch_threads"] == 1


def test_a_bad_resume_path_stops_every_process_with_the_reason(tmp_path, no_bn_recipe):
    recipe = no_bn_recipe("bad")
    done = subprocess.run(launch_cmd(recipe, "--multi_gpu", "--num_processes", "2", "--main_process_port",
                                     str(free_port())) + ["--resume", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, env=cpu_env(), cwd=tmp_path, timeout=300)
    assert done.returncode != 0
    assert f"--resume {tmp_path / 'nowhere'}: not a complete checkpoint (no COMPLETE marker)" in done.stderr
    assert not (tmp_path / "bad").exists()  # nothing written


def test_cpu_threads_work_without_sched_getaffinity(monkeypatch):
    """macOS and Windows have no os.sched_getaffinity: the core count falls back to os.cpu_count()."""
    import os

    from imgcls.training.distributed import cpu_threads

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_threads("auto") == 4


def test_fsdp_is_refused_with_what_to_use_instead(tmp_path, image_folder, monkeypatch, capsys):
    """accelerate runs FSDP only on GPUs (on CPU an FSDP config silently becomes plain multi-process), so the
    sharded save and resume path cannot be tested here: it is refused rather than shipped untested."""
    recipe = write_recipe(tmp_path / "tiny.toml", f'source = "folder"\nroot = "{image_folder}"')
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    assert train_inprocess(recipe) == 2
    assert capsys.readouterr().err.strip() == (
        "error: FSDP is not supported by imgcls: accelerate runs FSDP only on GPUs, so its sharded save and resume "
        "path cannot be tested on the machines imgcls is tested on. Use DDP instead "
        "(accelerate_configs/multi_gpu.yaml or multi_gpu_bf16.yaml); for a model too large for one GPU, use "
        "train.mixed_precision=\"bf16\" and a smaller global batch with train.grad_accum_steps.")
    assert not (tmp_path / "runs").exists()


def test_the_image_check_decodes_on_one_process_per_machine(tmp_path):
    """#19.9: every process decoded every image in the up-front check (8 processes x the whole dataset). The
    node's main process checks first; the others then find its result in the cache and decode nothing."""
    write_class_folders(tmp_path / "imgs" / "train", ["a", "b", "c", "d"], 60, seed=0)
    write_class_folders(tmp_path / "imgs" / "val", ["a", "b", "c", "d"], 10, seed=1)
    recipe = write_recipe(tmp_path / "r.toml", f'source = "folder"\nroot = "{tmp_path / "imgs"}"')
    recipe.write_text(recipe.read_text().replace("epochs = 3", "epochs = 1"))
    wrapper = tmp_path / "count_decodes.py"
    wrapper.write_text(
        "import os, sys\n"
        "import imgcls.data.scan as scan\n"
        "real = scan._decode_all\n"
        "def counted(splits, which):\n"
        f"    with open(os.path.join({str(tmp_path)!r}, 'decoded-' + os.environ['RANK']), 'a') as f:\n"
        "        f.write(f'{sum(len(splits[k]) for k in which)}\\n')\n"
        "    return real(splits, which)\n"
        "scan._decode_all = counted\n"
        "from imgcls.train import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    env = cpu_env()
    env["IMGCLS_CACHE"] = str(tmp_path / "cache")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), str(wrapper), str(recipe)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    decoded = {rank: sum(map(int, (tmp_path / f"decoded-{rank}").read_text().split())) for rank in ("0", "1")}
    assert decoded == {"0": 280, "1": 0}


def test_a_data_error_found_first_by_the_main_process_stops_every_process(tmp_path):
    """The main process checks first; when it finds a broken image nobody waits forever at the barrier: every
    process reports the same error and the job ends (status 1 from accelerate, the trainer's 2 in the log)."""
    write_class_folders(tmp_path / "imgs" / "train", ["a", "b"], 20, seed=0)
    write_class_folders(tmp_path / "imgs" / "val", ["a", "b"], 4, seed=1)
    (tmp_path / "imgs" / "train" / "a" / "broken.png").write_bytes(b"not a png")
    recipe = write_recipe(tmp_path / "r.toml", f'source = "folder"\nroot = "{tmp_path / "imgs"}"')
    done = subprocess.run(launch_cmd(recipe, "--multi_gpu", "--num_processes", "2", "--main_process_port",
                                     str(free_port())), capture_output=True, text=True, env=cpu_env(),
                          cwd=tmp_path, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count('error: data.on_bad_image = "error": 1 unreadable image:') == 2, done.stderr[-3000:]
