"""imgcls-launch: check a recipe, then run it under accelerate's launcher, printing the exact command first.

    imgcls-launch RECIPE [section.key=value ...] [--config accelerate_configs/X.yaml] [--num-processes N]
                  [--num-machines M --machine-rank R --main-address HOST] [--main-port P]
                  [--preflight-timeout S] [--check schema|full] [--dry-run] [-- ARGS FOR imgcls.train]

    imgcls-launch recipes/mnist.toml --config accelerate_configs/cpu_2proc.yaml train.epochs=3
    imgcls-launch recipes/mnist.toml --config accelerate_configs/multi_node.yaml --dry-run -- --resume auto

The recipe is validated before anything starts (`--check schema`, the default, is pure and fast, and includes
the batch arithmetic: train.global_batch_size must divide into processes x train.grad_accum_steps; `--check full`
also runs `python -m imgcls.train ... --dry-run`, which builds data and model). A bad recipe exits 2.
`--num-processes` is the total over all machines, as in accelerate. For several machines, the rank, main address
and port come from the flags, else from SLURM (SLURM_NODEID/SLURM_PROCID, SLURM_NNODES, MASTER_ADDR or the first
host of SLURM_JOB_NODELIST, MASTER_PORT, SLURM_GPUS_ON_NODE), else from the config. The peers must meet within
`--preflight-timeout` seconds (default: $IMGCLS_PREFLIGHT_TIMEOUT or 300), or the job stops with one clear message.

The printed command states every value accelerate would otherwise fill in with its "values were not passed"
notice (CPU threads per process; without any config, the whole hardware: every CUDA GPU, else one CPU process).
Without --config, the default file written by `accelerate config` is used, as accelerate does, and named.
The command is run by accelerate's own launcher inside this process, with two differences from a shell running
it: Ctrl-C and SIGTERM go to the training processes (which finish the step, save and exit 75), and the exit
status is theirs; `accelerate launch` itself would answer with a traceback and status 130 or 1.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence

import yaml

from imgcls.data.pool import usable_cores
from imgcls.errors import LaunchError, PreflightError, RecipeError
from imgcls.recipe import Recipe, load_recipe, per_device_batch
from imgcls.training.preflight import TIMEOUT_ENV, Expected, preflight_timeout
from imgcls.training.signals import RESUME_ENV, absolute_paths
from launcher.supervise import run_accelerate

PLACEHOLDER_ADDRESS = "MAIN_NODE_ADDRESS"  # what accelerate_configs/multi_node.yaml ships with
DEFAULT_PORT = 29500
# torch elastic SIGKILLs the workers this many seconds after passing a stop signal on (its default, 30 s, can cut
# a large checkpoint save short); it reads the variable when accelerate starts its agent
SHUTDOWN_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
SHUTDOWN_TIMEOUT_S = 120


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM host lists: "gpu[07-08],cpu1" -> ["gpu07", "gpu08", "cpu1"] (zero padding kept)."""
    hosts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist + ","):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            hosts += _expand_one(nodelist[start:i].strip()) if nodelist[start:i].strip() else []
            start = i + 1
    return hosts


def _expand_one(name: str) -> list[str]:
    m = re.match(r"([^\[]*)\[([^\]]*)\](.*)$", name)
    if not m:
        return [name]
    prefix, ranges, rest = m.groups()
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        for n in range(int(lo), int(hi or lo) + 1):
            out += _expand_one(f"{prefix}{n:0{len(lo)}d}{rest}")
    return out


def slurm_environment(env: Mapping[str, str]) -> dict:
    """Whatever of machine_rank, num_machines, main_address, main_port, gpus_per_node the environment states."""
    found: dict = {}
    rank = env.get("SLURM_NODEID") or env.get("SLURM_PROCID")
    if rank:
        found["machine_rank"] = int(rank)
    if env.get("SLURM_NNODES"):
        found["num_machines"] = int(env["SLURM_NNODES"])
    nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST", ""))
    if env.get("MASTER_ADDR") or nodes:
        found["main_address"] = env.get("MASTER_ADDR") or nodes[0]
    if env.get("MASTER_PORT"):
        found["main_port"] = int(env["MASTER_PORT"])
    if env.get("SLURM_GPUS_ON_NODE"):
        found["gpus_per_node"] = int(env["SLURM_GPUS_ON_NODE"])
    return found


def build_command(recipe: str, overrides: Sequence[str] = (), extra: Sequence[str] = (), *,
                  config: str | None = None, stated: Sequence[str] = (), num_processes: int | None = None,
                  num_machines: int = 1, machine_rank: int = 0, main_address: str | None = None,
                  main_port: int | None = None, rendezvous_timeout_s: float = 300,
                  module: str = "imgcls.train") -> list[str]:
    """The `accelerate launch` argv; `stated` are values accelerate would otherwise default (stated_values);
    machine flags (and the rendezvous deadline) only for several machines; one machine takes just a port."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config:
        cmd += ["--config_file", config]
    cmd += stated
    if num_processes:
        cmd += ["--num_processes", str(num_processes)]
    if num_machines > 1:
        cmd += ["--num_machines", str(num_machines), "--machine_rank", str(machine_rank),
                "--main_process_ip", str(main_address), "--main_process_port", str(main_port or DEFAULT_PORT),
                "--rdzv_conf", f"timeout={math.ceil(rendezvous_timeout_s)}"]
    elif main_port:
        cmd += ["--main_process_port", str(main_port)]
    return cmd + ["-m", module, recipe, *overrides, *extra]


def parse_args(argv: list[str]) -> argparse.Namespace:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="imgcls-launch", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value, as for imgcls.train")
    p.add_argument("--config", help="an accelerate config (accelerate_configs/*.yaml); default: accelerate's own")
    p.add_argument("--num-processes", type=int, help="total processes over all machines")
    p.add_argument("--num-machines", type=int)
    p.add_argument("--machine-rank", type=int)
    p.add_argument("--main-address")
    p.add_argument("--main-port", type=int, help=f"rank 0's port (default {DEFAULT_PORT}); also for one machine")
    p.add_argument("--preflight-timeout", type=float, help=f"seconds for all processes to meet (sets {TIMEOUT_ENV})")
    p.add_argument("--check", choices=["schema", "full"], default="schema")
    p.add_argument("--dry-run", action="store_true", help="print the command, start nothing")
    args = p.parse_intermixed_args(argv)
    args.extra = extra
    return args


def relaunch_command(argv: list[str]) -> str:
    """`imgcls-launch RECIPE [overrides] [options] --` and the trainer arguments but --resume: what a stopped
    run's resume command starts with (paths made absolute, so it works from any folder)."""
    args = parse_args(argv)
    head = argv[:argv.index("--")] if "--" in argv else argv
    head = [os.path.abspath(w) if w == args.recipe else w for w in absolute_paths(head, ("--config",))]
    extra = [w for k, w in enumerate(args.extra) if w != "--resume" and args.extra[k - 1:k] != ["--resume"]]
    return shlex.join(["imgcls-launch", *head, "--", *extra])


def accelerate_default_config(env: Mapping[str, str]) -> str | None:
    """The file `accelerate config` writes, which accelerate reads when it is given no --config_file."""
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    path = os.path.join(os.path.expanduser(home), "accelerate", "default_config.yaml")
    return path if os.path.isfile(path) else None


def read_config(path: str | None) -> dict:
    if path is None:
        return {}
    if not os.path.isfile(path):
        raise LaunchError(f"{path}: accelerate config not found (see accelerate_configs/)")
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def resolve_machines(args: argparse.Namespace, cfg: dict, env: Mapping[str, str]) -> dict:
    """Flags > SLURM/MASTER_* variables > config, for every hardware value the command needs."""
    slurm = slurm_environment(env)

    def pick(flag, slurm_key: str, cfg_key: str, default=None):
        return next((v for v in (flag, slurm.get(slurm_key), cfg.get(cfg_key)) if v is not None), default)

    machines = pick(args.num_machines, "num_machines", "num_machines", 1)
    total = args.num_processes
    if total is None and "gpus_per_node" in slurm and not cfg.get("use_cpu"):
        total = slurm["gpus_per_node"] * machines
    if str(cfg.get("distributed_type", "")).upper() == "NO" and max(total or 1, machines) > 1:
        raise LaunchError(f"{args.config} runs ONE process (distributed_type: 'NO'); for {total or machines} "
                          "processes use cpu_2proc.yaml (CPU) or multi_gpu.yaml / multi_node.yaml (GPU)")
    hw = {"num_processes": total, "num_machines": machines}
    if machines == 1 and args.main_port:  # two jobs on one machine need two ports
        hw["main_port"] = args.main_port
    if machines > 1:
        rank = args.machine_rank if args.machine_rank is not None else slurm.get("machine_rank")
        address = pick(args.main_address, "main_address", "main_process_ip")
        if rank is None or address in (None, "", PLACEHOLDER_ADDRESS):
            raise LaunchError(f"{machines} machines need --machine-rank and --main-address on every node "
                              "(or SLURM variables / MASTER_ADDR); the address is rank 0's, the same on all nodes")
        if (total or cfg.get("num_processes") or 0) < machines:
            raise LaunchError("multi-node needs the total process count: --num-processes or num_processes in --config")
        hw.update(machine_rank=rank, main_address=address,
                  main_port=pick(args.main_port, "main_port", "main_process_port", DEFAULT_PORT))
    return hw


def without_config(hw: dict) -> dict:
    """What accelerate assumes when it has no config at all, as a config: one process per visible CUDA GPU,
    else one CPU process; several processes -> MULTI_GPU (on CPU too, see cpu_2proc.yaml); no mixed precision."""
    import torch  # only here, as in accelerate, which counts the GPUs itself when it has no config

    gpus = torch.cuda.device_count()
    total = hw["num_processes"] or max(gpus, 1)
    return {"distributed_type": "MULTI_GPU" if total > 1 else "NO", "use_cpu": gpus == 0, "num_processes": total,
            "num_machines": hw["num_machines"], "mixed_precision": "no"}


def stated_values(cfg: dict, has_file: bool, env: Mapping[str, str]) -> tuple[list[str], dict]:
    """The flags and environment for every value accelerate would otherwise fill in with its "were not passed"
    notice: threads per CPU process (no config file can hold them) and, without a file, the whole hardware."""
    flags: list[str] = []
    if not has_file:
        flags += ["--multi_gpu"] if cfg["num_processes"] > 1 else ["--cpu"] if cfg["use_cpu"] else []
        flags += ["--num_machines", "1"] if cfg["num_machines"] == 1 else []  # several: build_command says it
        flags += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    if cfg.get("use_cpu") and "OMP_NUM_THREADS" not in env:  # accelerate: physical cores; we: the granted ones
        local = max(cfg["num_processes"] // max(cfg.get("num_machines", 1), 1), 1)
        flags += ["--num_cpu_threads_per_process", str(max(usable_cores() // local, 1))]
    extra_env = {}
    if cfg.get("use_cpu"):
        extra_env["ACCELERATE_USE_CPU"] = "1"  # accelerate's multi-process launcher does not pass use_cpu on
    if cfg["num_processes"] > 1 and SHUTDOWN_ENV not in env:
        extra_env[SHUTDOWN_ENV] = str(SHUTDOWN_TIMEOUT_S)
    return flags, extra_env


def check_batch(recipe: Recipe, processes: int) -> None:
    per_device_batch(recipe.train.global_batch_size, processes, recipe.train.grad_accum_steps)


def plan_launch(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[dict, dict, list[str], dict]:
    """Validate everything that can be checked before a process starts; (config, machines, flags, extra env)."""
    recipe = load_recipe(args.recipe, args.overrides)
    cfg = read_config(args.config)
    hw = resolve_machines(args, cfg, env)
    if args.config is None:
        cfg = without_config(hw)
        hw["num_processes"] = cfg["num_processes"]
    one = str(cfg.get("distributed_type", "")).upper() == "NO"  # accelerate's default count: 1, else none
    cfg = {**cfg, "num_processes": hw["num_processes"] or cfg.get("num_processes", 1 if one else -1),
           "num_machines": hw["num_machines"]}
    if cfg["num_processes"] < 1:
        raise LaunchError(f"{args.config} does not say how many processes: pass --num-processes N")
    check_batch(recipe, cfg["num_processes"])
    flags, extra_env = stated_values(cfg, args.config is not None, env)
    return cfg, hw, flags, extra_env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    args.config = args.config or accelerate_default_config(os.environ)
    extra_env = {TIMEOUT_ENV: f"{args.preflight_timeout:g}"} if args.preflight_timeout else {}
    try:
        timeout_s = preflight_timeout({**os.environ, **extra_env})
        cfg, hw, flags, more_env = plan_launch(args, os.environ)
    except (RecipeError, LaunchError, PreflightError, yaml.YAMLError) as e:
        print(e, file=sys.stderr)
        return 2
    extra_env.update(more_env)
    if args.check == "full":
        check = [sys.executable, "-m", "imgcls.train", args.recipe, *args.overrides, *args.extra, "--dry-run"]
        if subprocess.run(check, env={**os.environ, **extra_env}).returncode != 0:
            return 2
    cmd = build_command(args.recipe, args.overrides, args.extra, config=args.config, stated=flags,
                        rendezvous_timeout_s=timeout_s, **hw)
    print(shlex.join([f"{k}={v}" for k, v in extra_env.items()] + cmd), flush=True)
    if args.dry_run:
        return 0
    os.environ.update(extra_env)
    os.environ[RESUME_ENV] = relaunch_command(sys.argv[1:] if argv is None else list(argv))
    expected = None
    if hw["num_machines"] > 1:
        expected = Expected(hw["num_machines"], cfg["num_processes"] // hw["num_machines"], hw["machine_rank"],
                            hw["main_address"], str(hw["main_port"]))
    return run_accelerate(cmd[3:], expected, timeout_s)


if __name__ == "__main__":
    sys.exit(main())
