"""imgcls-launch: the exact commands it prints, its refusals, the accelerate configs, the SLURM template, and the
multi-node pre-flight (real processes on 127.0.0.1: a peer that never arrives must fail fast and clearly)."""
from __future__ import annotations

import logging
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from imgcls.training.preflight import Expected, preflight_timeout, rendezvous_failure_message
from imgcls.errors import PreflightError, RecipeError
from imgcls.recipe import load_recipe
from launcher import launch
from launcher.launch import (PLACEHOLDER_ADDRESS, SHUTDOWN_ENV, SHUTDOWN_TIMEOUT_S, build_command, expand_nodelist,
                             main, slurm_environment)
from launcher.supervise import exit_status

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
PROBE = '''import sys
from imgcls.training.preflight import init_distributed_state
init_distributed_state()
import torch.distributed as dist
from accelerate import Accelerator
a = Accelerator()
line = f"rank={a.process_index} world={a.num_processes} backend={dist.get_backend()} args={sys.argv[1:]}\\n"
sys.stdout.write(line)  # one write: the ranks share the pipe
sys.stdout.flush()
a.end_training()  # destroys the process group; without it gloo may abort at exit when the peer is already gone
'''


def cfg(name: str) -> str:
    return str(CONFIGS / name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _no_cluster_env(monkeypatch, tmp_path):
    """Nothing from the cluster or the user's shell; no `accelerate config` default file; 8 usable cores."""
    for key in list(os.environ):
        if key.startswith(("SLURM_", "MASTER_")) or key in (
                "IMGCLS_PREFLIGHT_TIMEOUT", "ACCELERATE_USE_CPU", "OMP_NUM_THREADS", SHUTDOWN_ENV, "XDG_CACHE_HOME"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(launch, "usable_cores", lambda: 8)


@pytest.fixture
def recipe(tmp_path) -> str:
    path = tmp_path / "t.toml"
    path.write_text('name = "t"\n[data]\nsource = "folder"\nroot = "/tmp/x"\n')
    return str(path)


def dry_run(capsys, *argv: str) -> list[str]:
    assert main(["--dry-run", *argv]) == 0  # first: anything after "--" belongs to imgcls.train
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return shlex.split(out[0])


def subprocess_env(tmp_path, **extra: str) -> dict:
    """The probe module importable, one thread per process (2 cores), nothing from the cluster."""
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


# ---- printed commands ------------------------------------------------------------------------------------------

def test_single_cpu(capsys, recipe):
    assert dry_run(capsys, recipe, "train.epochs=2", "--config", cfg("cpu.yaml")) == [
        "ACCELERATE_USE_CPU=1", *LAUNCH, "--config_file", cfg("cpu.yaml"), "--num_cpu_threads_per_process", "8",
        "-m", "imgcls.train", recipe, "train.epochs=2"]


def test_multi_gpu_with_process_count_and_train_args(capsys, recipe):
    tokens = dry_run(capsys, recipe, "--config", cfg("multi_gpu.yaml"), "--num-processes", "8", "optim.lr=0.2",
                     "--", "--resume", "auto")
    assert tokens == [f"{SHUTDOWN_ENV}=120", *LAUNCH, "--config_file", cfg("multi_gpu.yaml"), "--num_processes", "8",
                      "-m", "imgcls.train", recipe, "optim.lr=0.2", "--resume", "auto"]


def test_one_machine_takes_a_port(capsys, recipe):
    """Two multi-process jobs on one machine must not both use accelerate's default port."""
    assert dry_run(capsys, recipe, "--config", cfg("cpu_2proc.yaml"), "--main-port", "29611")[2:] == [
        *LAUNCH, "--config_file", cfg("cpu_2proc.yaml"), "--num_cpu_threads_per_process", "4",
        "--main_process_port", "29611", "-m", "imgcls.train", recipe]


def test_multi_node_from_flags(capsys, recipe):
    tokens = dry_run(capsys, recipe, "--config", cfg("multi_node.yaml"), "--num-machines", "2", "--machine-rank",
                     "1", "--main-address", "10.0.0.5", "--main-port", "29555", "--preflight-timeout", "45")
    assert tokens == ["IMGCLS_PREFLIGHT_TIMEOUT=45", f"{SHUTDOWN_ENV}=120", *LAUNCH,
                      "--config_file", cfg("multi_node.yaml"), "--num_machines", "2", "--machine_rank", "1",
                      "--main_process_ip", "10.0.0.5", "--main_process_port", "29555", "--rdzv_conf", "timeout=45",
                      "-m", "imgcls.train", recipe]


def test_multi_node_from_slurm(capsys, recipe, monkeypatch):
    for key, value in dict(SLURM_NODEID="1", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu[07-08]",
                           SLURM_GPUS_ON_NODE="8").items():
        monkeypatch.setenv(key, value)
    assert dry_run(capsys, recipe, "--config", cfg("multi_node.yaml")) == [
        f"{SHUTDOWN_ENV}=120", *LAUNCH, "--config_file", cfg("multi_node.yaml"), "--num_processes", "16", "--num_machines", "2",
        "--machine_rank", "1", "--main_process_ip", "gpu07", "--main_process_port", "29500",
        "--rdzv_conf", "timeout=300", "-m", "imgcls.train", recipe]


def test_flags_win_over_slurm(capsys, recipe, monkeypatch):
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.1.1.1")
    monkeypatch.setenv("MASTER_PORT", "31000")
    tokens = dry_run(capsys, recipe, "--config", cfg("multi_node.yaml"), "--machine-rank", "0",
                     "--main-address", "10.0.0.5")
    assert tokens[tokens.index("--machine_rank"):tokens.index("--rdzv_conf")] == [
        "--machine_rank", "0", "--main_process_ip", "10.0.0.5", "--main_process_port", "31000"]


# ---- refusals: nothing is printed, nothing starts ---------------------------------------------------------------

def test_bad_recipe_exits_2_with_the_recipe_error(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "t"\n[data]\nsource = "folder"\nroot = "/tmp/x"\n[train]\nepochz = 3\n')
    with pytest.raises(RecipeError) as expected:
        load_recipe(bad, ["optim.lr=-1"])
    assert main([str(bad), "optim.lr=-1", "--config", cfg("cpu.yaml")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == str(expected.value)
    assert "train.epochz: unknown key; did you mean 'epochs'?" in err and "optim.lr" in err


@pytest.mark.parametrize("argv, message", [
    (["--config", "multi_node.yaml"], "2 machines need --machine-rank and --main-address"),
    (["--config", "multi_node.yaml", "--machine-rank", "1"], "2 machines need --machine-rank and --main-address"),
    (["--config", "cpu.yaml", "--num-processes", "2"], "runs ONE process (distributed_type: 'NO')"),
    (["--config", "nope.yaml"], "accelerate config not found"),
])
def test_launch_refusals(capsys, recipe, argv, message):
    argv = [cfg(a) if a.endswith(".yaml") else a for a in argv]
    assert main([recipe, *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err


@pytest.mark.parametrize("argv, world", [
    (["--config", "cpu_2proc.yaml"], 2),                                  # the config's count
    (["--config", "multi_gpu.yaml", "--num-processes", "4"], 4),          # the flag wins
    (["--config", "multi_node.yaml", "--machine-rank", "0", "--main-address", "10.0.0.5"], 16),  # over machines
])
@pytest.mark.parametrize("check", ["schema", "full"])
def test_a_batch_that_does_not_divide_is_refused_before_anything_starts(capfd, recipe, monkeypatch, argv, world,
                                                                        check):
    """The trainer's own message (per_device_batch), and no process started: not even --check full's dry run."""
    from imgcls.training.distributed import per_device_batch

    started = []
    for module, name in ((subprocess, "Popen"), (os, "execve")):
        monkeypatch.setattr(module, name, lambda *a, **k: started.append(a) or pytest.fail("a process started"))
    overrides = ["train.global_batch_size=9", "train.grad_accum_steps=3"]  # 9 = 3 x 3: divides 1 process only
    with pytest.raises(RecipeError) as expected:
        per_device_batch(9, world, 3)
    argv = [cfg(a) if a.endswith(".yaml") else a for a in argv]
    assert main([recipe, *overrides, *argv, "--check", check]) == 2
    out, err = capfd.readouterr()
    assert (out, err, started) == ("", f"{expected.value}\n", [])
    assert str(expected.value) == (f"train.global_batch_size = 9 does not divide into {world} process(es) x 3 "
                                   f"accumulation step(s); pick a multiple of {world * 3}")


def test_bad_timeout_value(capsys, recipe, monkeypatch):
    monkeypatch.setenv("IMGCLS_PREFLIGHT_TIMEOUT", "soon")
    assert main([recipe, "--config", cfg("cpu.yaml"), "--dry-run"]) == 2
    assert "IMGCLS_PREFLIGHT_TIMEOUT='soon': expected a number of seconds" in capsys.readouterr().err
    with pytest.raises(PreflightError, match="must be > 0"):
        preflight_timeout({"IMGCLS_PREFLIGHT_TIMEOUT": "0"})
    assert preflight_timeout({}) == 300


def test_full_check_runs_the_trainer_dry_run(capfd, recipe):
    """The schema accepts root = "/tmp/x"; building the data does not, so --check full refuses to launch."""
    assert main([recipe, "--config", cfg("cpu.yaml"), "--check", "full", "--dry-run"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and "data.root = '/tmp/x'" in err


# ---- pure helpers -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[07-08]", ["gpu07", "gpu08"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a1,b[9-11],c", ["a1", "b9", "b10", "b11", "c"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("single", ["single"]),
    ("", []),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_slurm_environment():
    assert slurm_environment({}) == {}
    base = {"SLURM_PROCID": "3", "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "n[10-13]"}
    assert slurm_environment(base) == {"machine_rank": 3, "num_machines": 4, "main_address": "n10"}
    assert slurm_environment({**base, "SLURM_NODEID": "2", "MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "31000",
                              "SLURM_GPUS_ON_NODE": "4"}) == {
        "machine_rank": 2, "num_machines": 4, "main_address": "10.9.9.9", "main_port": 31000, "gpus_per_node": 4}


def test_rendezvous_failure_message():
    two = Expected(machines=2, procs_per_machine=8, node_rank=0, address="10.0.0.5", port="29500")
    assert rendezvous_failure_message(two, 30, "Timed out after 31 seconds waiting for clients. 1/2 clients joined.") \
        == ("could not form the process group: expected 2 machines x 8 processes at 10.0.0.5:29500; node rank 1 did "
            "not arrive within 30 s. Check that every node runs the launcher with the same --main-address/--main-port "
            "and that the port is open. (torch: Timed out after 31 seconds waiting for clients. 1/2 clients joined.)")
    four = Expected(4, 8, 0, "10.0.0.5", "29500")
    assert "; 2 of 4 machines did not arrive within 60 s." in rendezvous_failure_message(four, 60, "2/4 clients joined")
    one = Expected(1, 2, 0, "127.0.0.1", "29500")
    assert "; the processes did not all arrive within 10 s. Check the other processes' output: one crashed or " \
           "stalled before creating the Accelerator." in rendezvous_failure_message(
               one, 10, "wait timeout after 10000ms, keys: /default_pg/0//cpu//0/1", unit="processes")
    peer = Expected(2, 8, 1, "10.0.0.5", "29500")
    assert "; node rank 1 could not reach the main node (rank 0) within 30 s." in rendezvous_failure_message(
        peer, 30, "The client socket has timed out after 30000ms while trying to connect to (10.0.0.5, 29500).")


def test_the_exit_status_is_the_training_processes_own(capsys):
    """What accelerate's launcher raised -> the status imgcls-launch exits with (shell style for signals)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failed(*codes: int) -> ChildFailedError:
        failures = {}
        for rank, code in enumerate(codes):
            failures[rank] = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="<N/A>")
            failures[rank].timestamp = 1000 + rank  # rank 0 failed first: the root cause
        return ChildFailedError("imgcls.train", failures)

    assert exit_status(None, None, 1) == 0
    assert exit_status(subprocess.CalledProcessError(75, ["python"]), None, 1) == 75  # one process
    assert exit_status(subprocess.CalledProcessError(-2, ["python"]), None, 1) == 130
    assert exit_status(failed(75, -15), None, 1) == 75  # rank 1 was stopped by the agent after rank 0 exited
    assert capsys.readouterr().err == ""
    assert exit_status(failed(1, 75), None, 1) == 1  # a crash: torch's report of it is printed
    assert "rank      : 0 (local_rank: 0)\n  exitcode  : 1 (pid: 100)" in capsys.readouterr().err
    assert exit_status(failed(-9), None, 1) == 137


# ---- accelerate configs and the SLURM template ------------------------------------------------------------------

EXPECTED_CONFIGS = {  # file -> (distributed_type, use_cpu, num_machines, num_processes, mixed_precision)
    "cpu.yaml": (DistributedType.NO, True, 1, 1, "no"),
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, True, 1, 2, "no"),
    "single_gpu.yaml": (DistributedType.NO, False, 1, 1, "no"),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, False, 1, 8, "no"),
    "multi_gpu_bf16.yaml": (DistributedType.MULTI_GPU, False, 1, 8, "bf16"),
    "multi_gpu_fp16.yaml": (DistributedType.MULTI_GPU, False, 1, 8, "fp16"),
    "multi_node.yaml": (DistributedType.MULTI_GPU, False, 2, 16, "bf16"),
}


def test_every_config_loads_with_accelerate_and_documents_its_command():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED_CONFIGS)
    for name, expected in EXPECTED_CONFIGS.items():
        c = load_config_from_file(cfg(name))
        assert (c.distributed_type, c.use_cpu, c.num_machines, c.num_processes, c.mixed_precision) == expected, name
        header = (CONFIGS / name).read_text().split("compute_environment")[0]
        assert header.startswith("# Hardware:") and f"--config accelerate_configs/{name}" in header, name
    assert load_config_from_file(cfg("multi_node.yaml")).main_process_ip == PLACEHOLDER_ADDRESS


NOTICE = "The following values were not passed to `accelerate launch`"
MACHINE_FLAGS = {"multi_node.yaml": ["--machine-rank", "0", "--main-address", "10.0.0.5"]}


def accelerate_notice(tokens: list[str], monkeypatch, caplog) -> str:
    """What accelerate's own argument check logs for this printed command (no process starts)."""
    import accelerate.commands.launch as accelerate_launch

    monkeypatch.setattr(accelerate_launch, "default_config_file", "/nonexistent/default_config.yaml")
    for assignment in [t for t in tokens if "=" in t and t.split("=")[0].isupper()]:
        monkeypatch.setenv(*assignment.split("=", 1))
    args = accelerate_launch.launch_command_parser().parse_args(tokens[tokens.index(LAUNCH[-1]) + 1:])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="accelerate.commands.launch"):
        accelerate_launch._validate_launch_command(args)
    return caplog.text


@pytest.mark.parametrize("name", [*EXPECTED_CONFIGS, None])
def test_the_commands_state_every_value_accelerate_would_default(capsys, caplog, monkeypatch, recipe, name):
    """accelerate's "values were not passed" notice never appears for a command imgcls-launch prints: CPU
    configs get the threads per process (a config file cannot hold them), no config gets the whole hardware."""
    argv = ["--config", cfg(name), *MACHINE_FLAGS.get(name, [])] if name else []
    tokens = dry_run(capsys, recipe, *argv)
    assert NOTICE not in accelerate_notice(tokens, monkeypatch, caplog)


def test_without_a_config_the_hardware_is_stated(capsys, monkeypatch, recipe):
    """accelerate's choices without a config (every GPU, else one process), made explicit; on CPU with
    a thread per granted core instead of accelerate's OMP_NUM_THREADS=1."""
    assert dry_run(capsys, recipe) == [
        "ACCELERATE_USE_CPU=1", *LAUNCH, "--cpu", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--num_cpu_threads_per_process", "8", "--num_processes", "1",
        "-m", "imgcls.train", recipe]
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert dry_run(capsys, recipe) == [
        f"{SHUTDOWN_ENV}=120", *LAUNCH, "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--num_processes", "4", "-m", "imgcls.train", recipe]


def test_the_default_accelerate_config_is_used_and_named(capsys, recipe, tmp_path):
    default = tmp_path / "hf_home" / "accelerate" / "default_config.yaml"
    default.parent.mkdir(parents=True)
    default.write_text((CONFIGS / "multi_gpu.yaml").read_text())
    assert dry_run(capsys, recipe)[1:6] == [*LAUNCH, "--config_file", str(default)]


def test_the_shipped_gpu_configs_alone_leave_nothing_to_default(caplog, monkeypatch):
    for name in ("single_gpu.yaml", "multi_gpu.yaml", "multi_gpu_bf16.yaml", "multi_gpu_fp16.yaml"):
        assert NOTICE not in accelerate_notice([*LAUNCH, "--config_file", cfg(name), "x.py"], monkeypatch, caplog)


def test_cpu_config_run_prints_no_notice(tmp_path, capsys, recipe):
    """The real thing: the printed cpu.yaml command run by accelerate, without OMP_NUM_THREADS in the shell."""
    (tmp_path / "probe_mod.py").write_text("print('ran')\n")
    tokens = dry_run(capsys, recipe, "--config", cfg("cpu.yaml"))
    env = {k: v for k, v in subprocess_env(tmp_path).items() if k != "OMP_NUM_THREADS"}
    run = subprocess.run([("probe_mod" if t == "imgcls.train" else t) for t in tokens[1:]], env=env,
                         capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stdout) == (0, "ran\n"), run.stderr
    assert NOTICE not in run.stderr


def test_several_processes_get_time_to_save_before_torch_kills_them(capsys, recipe, monkeypatch):
    """torch elastic reads the variable the launcher sets; a value from the user's shell is kept."""
    from torch.distributed.launcher.api import LaunchConfig

    tokens = dry_run(capsys, recipe, "--config", cfg("cpu_2proc.yaml"))
    assert f"{SHUTDOWN_ENV}={SHUTDOWN_TIMEOUT_S}" in tokens
    monkeypatch.setenv(SHUTDOWN_ENV, str(SHUTDOWN_TIMEOUT_S))
    assert LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2).shutdown_timeout == SHUTDOWN_TIMEOUT_S
    monkeypatch.setenv(SHUTDOWN_ENV, "600")
    assert not any(t.startswith(SHUTDOWN_ENV) for t in dry_run(capsys, recipe, "--config", cfg("cpu_2proc.yaml")))
    assert not any(t.startswith(SHUTDOWN_ENV) for t in dry_run(capsys, recipe, "--config", cfg("cpu.yaml")))


def test_slurm_template_starts_one_launcher_per_node(tmp_path, recipe):
    """Run the sbatch script with stand-ins for scontrol and srun (srun runs its command once per node)."""
    assert "\n#SBATCH --signal=TERM@180\n" in (ROOT / "launcher" / "slurm.sbatch").read_text()
    launcher_exe = Path(sys.executable).parent / "imgcls-launch"
    if not launcher_exe.exists():
        pytest.skip("imgcls-launch console script not installed in this environment")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/bash\nprintf 'gpu07\\ngpu08\\n'\n")
    (fake / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                               'for n in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$n "$@" || exit; done\n')
    for exe in fake.iterdir():
        exe.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{launcher_exe.parent}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "1234",
           "SLURM_GPUS_ON_NODE": "8"}
    run = subprocess.run(["bash", str(ROOT / "launcher" / "slurm.sbatch"), recipe, "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0] == "imgcls: 2 nodes, rank 0 at gpu07:21234, config accelerate_configs/multi_node.yaml"
    for rank, line in enumerate(lines[1:]):
        assert not line.startswith(SHUTDOWN_ENV), "the template exports it: the launcher keeps the job's value"
        assert shlex.split(line)[1:] == [
            "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/multi_node.yaml",
            "--num_processes", "16", "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "gpu07",
            "--main_process_port", "21234", "--rdzv_conf", "timeout=300", "-m", "imgcls.train", recipe]
    assert len(lines) == 3


# ---- real processes ---------------------------------------------------------------------------------------------

def test_cpu_2proc_config_really_gives_world_size_2(tmp_path, capsys, recipe):
    """The printed command, run with a probe module in place of imgcls.train: 2 ranks, gloo."""
    (tmp_path / "probe_mod.py").write_text(PROBE)
    tokens = dry_run(capsys, recipe, "--config", cfg("cpu_2proc.yaml"), "train.epochs=2")
    assert tokens[:2] == ["ACCELERATE_USE_CPU=1", f"{SHUTDOWN_ENV}=120"]
    cmd = [("probe_mod" if t == "imgcls.train" else t) for t in tokens[2:]]
    run = subprocess.run(cmd, env=subprocess_env(tmp_path, ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(run.stdout.strip().splitlines()) == [
        f"rank={rank} world=2 backend=gloo args=['{recipe}', 'train.epochs=2']" for rank in (0, 1)]


def test_two_machines_on_localhost_form_one_group(tmp_path, recipe):
    """The multi-node flags the launcher builds are accepted by accelerate and meet: 2 machines x 1 process."""
    (tmp_path / "probe_mod.py").write_text(PROBE)
    port = free_port()
    procs = [subprocess.Popen(
        build_command(recipe, config=cfg("cpu_2proc.yaml"), num_processes=2, num_machines=2, machine_rank=rank,
                      main_address="127.0.0.1", main_port=port, rendezvous_timeout_s=30, module="probe_mod"),
        env=subprocess_env(tmp_path, ACCELERATE_USE_CPU="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for rank in (0, 1)]
    results = [p.communicate(timeout=120) for p in procs]
    for rank, (p, (out, err)) in enumerate(zip(procs, results)):
        assert p.returncode == 0, err[-3000:]
        assert out.strip() == f"rank={rank} world=2 backend=gloo args=['{recipe}']"


class Lonely:
    """A process whose peer never comes, started now and read later: both such tests wait at the same time."""

    def __init__(self, cmd: list[str], env: dict, port: int):
        self.port, self.start = port, time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)

    def finish(self) -> tuple[int, float, str]:
        _, err = self.proc.communicate(timeout=90)
        return self.proc.returncode, time.monotonic() - self.start, err


@pytest.fixture(scope="module")
def lonely(tmp_path_factory) -> dict[str, Lonely]:
    tmp = tmp_path_factory.mktemp("lonely")
    recipe = tmp / "t.toml"
    recipe.write_text('name = "t"\n[data]\nsource = "folder"\nroot = "/tmp/x"\n')
    (tmp / "lonely.py").write_text("from imgcls.training.preflight import init_distributed_state\n"
                                   "init_distributed_state(10)\n")
    clean = {k: v for k, v in subprocess_env(tmp).items() if not k.startswith(("SLURM_", "MASTER_"))}
    machine, worker = free_port(), free_port()
    started = {
        "machine": Lonely([sys.executable, "-m", "launcher.launch", str(recipe), "--config", cfg("cpu_2proc.yaml"),
                           "--num-processes", "2", "--num-machines", "2", "--machine-rank", "0",
                           "--main-address", "127.0.0.1", "--main-port", str(machine), "--preflight-timeout", "15"],
                          clean, machine),
        "worker": Lonely([sys.executable, str(tmp / "lonely.py")],
                         {**clean, "ACCELERATE_USE_CPU": "1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                          "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(worker)}, worker),
    }
    yield started
    for run in started.values():
        if run.proc.poll() is None:
            run.proc.kill()


def test_missing_peer_machine_fails_fast_with_a_clear_message(lonely):
    """Only machine rank 0 of 2 starts. torchrun's agent waits for its peer before any worker runs; the launcher
    bounds that wait (--rdzv_conf timeout) and explains the failure."""
    rc, elapsed, err = lonely["machine"].finish()
    assert rc != 0 and elapsed < 60, (elapsed, err[-2000:])
    assert (f"could not form the process group: expected 2 machines x 1 processes at 127.0.0.1:"
            f"{lonely['machine'].port}; node rank 1 did not arrive within 15 s. Check that every node runs the "
            "launcher with the same --main-address/--main-port and that the port is open.") in err


def test_missing_peer_process_fails_fast_inside_the_worker(lonely):
    """A worker whose peer never joins (rank 0 of 2, started from the environment as torchrun would): the
    process-group rendezvous in init_distributed_state gives up after its timeout with the same message."""
    rc, elapsed, err = lonely["worker"].finish()
    assert rc != 0 and elapsed < 60, (elapsed, err[-2000:])
    assert "PreflightError: could not form the process group: expected 2 machines x 1 processes at " \
           f"127.0.0.1:{lonely['worker'].port}; 1 of 2 processes did not arrive within 10 s." in err
