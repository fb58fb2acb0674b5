"""Building the Accelerator: precision policy, process group, and the batch arithmetic across processes."""
from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

from .preflight import init_distributed_state
from .recipe import RecipeError, TrainConfig


def create_accelerator(train: TrainConfig, seed: int, log_with: list[str] = ()) -> Accelerator:
    """The recipe pins precision only when `train.mixed_precision` is not "config". The process group is formed
    first, with a deadline (see preflight.py), so a missing peer fails with a message instead of hanging."""
    init_distributed_state()
    accelerator = Accelerator(
        mixed_precision=None if train.mixed_precision == "config" else train.mixed_precision,
        gradient_accumulation_steps=train.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
        log_with=list(log_with) or None,
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise RecipeError(
            "fp16 was asked for but this process runs on the CPU, where Accelerate would silently compute in "
            "fp32. Use train.mixed_precision=\"bf16\" (autocast works on CPU) or \"no\", or run on a GPU."
        )
    return accelerator


def cpu_threads_note(device: torch.device, threads: int | None = None, cores: int | None = None,
                     local_processes: int | None = None) -> str | None:
    """On the CPU, say so when this process computes with fewer threads than its share of the cores: a bare
    `accelerate launch` (no --cpu, no config with use_cpu) sets OMP_NUM_THREADS=1. We do not override a thread
    count the user may have chosen; we say how to change it."""
    if device.type != "cpu":
        return None
    threads = torch.get_num_threads() if threads is None else threads
    if cores is None:  # the cores this process may run on (Linux); elsewhere (macOS, Windows) all of them
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if local_processes is None else local_processes
    share = max(cores // max(local, 1), 1)
    if threads >= share:
        return None
    return (f"training on the CPU with {threads} thread(s) per process while {cores} core(s) are available to "
            f"{local} process(es) (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; `accelerate "
            f"launch` sets 1 unless it runs with --cpu or a config with use_cpu: true). For speed, launch with "
            f"--num_cpu_threads_per_process {share} or --config_file accelerate_configs/cpu.yaml")


def per_device_batch(global_batch: int, world_size: int, accum: int) -> int:
    """The global batch is the recipe's; each process gets global / (world x accumulation)."""
    share = world_size * accum
    if global_batch % share:
        raise RecipeError(
            f"train.global_batch_size = {global_batch} does not divide into {world_size} process(es) x "
            f"{accum} accumulation step(s); pick a multiple of {share}"
        )
    return global_batch // share
