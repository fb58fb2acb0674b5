"""imgcls-launch: check a recipe, then run it under `accelerate launch`, printing the exact command first.

    imgcls-launch RECIPE [section.key=value ...] [--config accelerate_configs/X.yaml] [--num-processes N]
                  [--num-machines M --machine-rank R --main-address HOST --main-port P]
                  [--preflight-timeout S] [--check schema|full] [--dry-run] [-- ARGS FOR imgcls.train]

    imgcls-launch recipes/mnist.toml --config accelerate_configs/cpu_2proc.yaml train.epochs=3
    imgcls-launch recipes/mnist.toml --config accelerate_configs/multi_node.yaml --dry-run -- --resume auto

The recipe is validated before anything starts (`--check schema`, the default, is pure and fast; `--check full`
also runs `python -m imgcls.train ... --dry-run`, which builds data and model). A bad recipe exits 2.
`--num-processes` is the total over all machines, as in accelerate. For several machines, the rank, main address
and port come from the flags, else from SLURM (SLURM_NODEID/SLURM_PROCID, SLURM_NNODES, MASTER_ADDR or the first
host of SLURM_JOB_NODELIST, MASTER_PORT, SLURM_GPUS_ON_NODE), else from the config. The peers must meet within
`--preflight-timeout` seconds (default: $IMGCLS_PREFLIGHT_TIMEOUT or 300), or the job stops with one clear message.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping

import yaml

from imgcls.preflight import TIMEOUT_ENV, Expected, PreflightError, preflight_timeout, rendezvous_failure_message
from imgcls.recipe import RecipeError, load_recipe

PLACEHOLDER_ADDRESS = "MAIN_NODE_ADDRESS"  # what accelerate_configs/multi_node.yaml ships with
DEFAULT_PORT = 29500
RENDEZVOUS_FAILURE = re.compile(r"torch\.distributed\.(?:DistStoreError|DistNetworkError): ([^\n]*)")


class LaunchError(ValueError):
    """The launch cannot be assembled (missing address, wrong process count...); nothing was started."""


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


def build_command(recipe: str, overrides: list[str] = (), extra: list[str] = (), *, config: str | None = None,
                  num_processes: int | None = None, num_machines: int = 1, machine_rank: int = 0,
                  main_address: str | None = None, main_port: int = DEFAULT_PORT,
                  rendezvous_timeout_s: float = 300, module: str = "imgcls.train") -> list[str]:
    """The `accelerate launch` argv; machine flags (and the rendezvous deadline) only for several machines."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config:
        cmd += ["--config_file", config]
    if num_processes:
        cmd += ["--num_processes", str(num_processes)]
    if num_machines > 1:
        cmd += ["--num_machines", str(num_machines), "--machine_rank", str(machine_rank),
                "--main_process_ip", str(main_address), "--main_process_port", str(main_port),
                "--rdzv_conf", f"timeout={math.ceil(rendezvous_timeout_s)}"]
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
    p.add_argument("--main-port", type=int)
    p.add_argument("--preflight-timeout", type=float, help=f"seconds for all processes to meet (sets {TIMEOUT_ENV})")
    p.add_argument("--check", choices=["schema", "full"], default="schema")
    p.add_argument("--dry-run", action="store_true", help="print the command, start nothing")
    args = p.parse_intermixed_args(argv)
    args.extra = extra
    return args


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


def supervise(cmd: list[str], env: dict, expected: Expected, timeout_s: float) -> int:
    """Run accelerate, pass its stderr through, and explain a rendezvous that timed out (torchrun's agent)."""
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    signal.signal(signal.SIGTERM, lambda sig, _: proc.send_signal(sig))  # SLURM's stop; Ctrl-C reaches it already
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tail = b""
    while chunk := os.read(proc.stderr.fileno(), 65536):
        sys.stderr.buffer.write(chunk)
        sys.stderr.buffer.flush()
        tail = (tail + chunk)[-65536:]
    rc = proc.wait()
    text = tail.decode(errors="replace")
    failure = RENDEZVOUS_FAILURE.search(text)
    if rc != 0 and failure and "PreflightError" not in text:  # a worker's own pre-flight message is clear already
        print("\n" + rendezvous_failure_message(expected, timeout_s, failure.group(1)), file=sys.stderr)
    return rc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    extra_env = {TIMEOUT_ENV: f"{args.preflight_timeout:g}"} if args.preflight_timeout else {}
    try:
        load_recipe(args.recipe, args.overrides)
        timeout_s = preflight_timeout({**os.environ, **extra_env})
        cfg = read_config(args.config)
        hw = resolve_machines(args, cfg, os.environ)
    except (RecipeError, LaunchError, PreflightError, yaml.YAMLError) as e:
        print(e, file=sys.stderr)
        return 2
    if cfg.get("use_cpu"):
        extra_env["ACCELERATE_USE_CPU"] = "1"  # accelerate's multi-process launcher does not pass use_cpu on
    env = {**os.environ, **extra_env}
    if args.check == "full":
        check = [sys.executable, "-m", "imgcls.train", args.recipe, *args.overrides, *args.extra, "--dry-run"]
        if subprocess.run(check, env=env).returncode != 0:
            return 2
    cmd = build_command(args.recipe, args.overrides, args.extra, config=args.config,
                        rendezvous_timeout_s=timeout_s, **hw)
    print(shlex.join([f"{k}={v}" for k, v in extra_env.items()] + cmd), flush=True)
    if args.dry_run:
        return 0
    if hw["num_machines"] == 1:
        os.execve(cmd[0], cmd, env)
    total = hw["num_processes"] or cfg["num_processes"]
    expected = Expected(hw["num_machines"], total // hw["num_machines"], hw["machine_rank"],
                        hw["main_address"], str(hw["main_port"]))
    return supervise(cmd, env, expected, timeout_s)


if __name__ == "__main__":
    sys.exit(main())
