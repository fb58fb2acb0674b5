"""Building the Accelerator: precision policy, process group, and the batch arithmetic across processes."""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

from imgcls.data.pool import usable_cores
from imgcls.training.preflight import init_distributed_state
from imgcls.errors import RecipeError
from imgcls.recipe import TrainConfig, per_device_batch  # noqa: F401 (per_device_batch: imported from here too)

T = TypeVar("T")


FSDP_REFUSED = (
    "FSDP is not supported by imgcls: accelerate runs FSDP only on GPUs, so its sharded save and resume path "
    "cannot be tested on the machines imgcls is tested on. Use DDP instead (accelerate_configs/multi_gpu.yaml or "
    "multi_gpu_bf16.yaml); for a model too large for one GPU, use train.mixed_precision=\"bf16\" and a smaller "
    "global batch with train.grad_accum_steps.")


def create_accelerator(train: TrainConfig, seed: int, log_with: list[str] = ()) -> Accelerator:
    """The recipe pins precision only when `train.mixed_precision` is not "config". The process group is formed
    first, with a deadline (see preflight.py), so a missing peer fails with a message instead of hanging."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1"):
        raise RecipeError(FSDP_REFUSED)
    init_distributed_state()
    accelerator = Accelerator(
        mixed_precision=None if train.mixed_precision == "config" else train.mixed_precision,
        gradient_accumulation_steps=train.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed, non_blocking=True),
        log_with=list(log_with) or None,
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise RecipeError(
            "fp16 was asked for but this process runs on the CPU, where Accelerate would silently compute in "
            "fp32. Use train.mixed_precision=\"bf16\" (autocast works on CPU) or \"no\", or run on a GPU."
        )
    return accelerator


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN then runs bf16 convolutions natively (elsewhere they are emulated)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_cpu_warning(accelerator: Accelerator) -> str | None:
    """The line to warn with when bf16 autocast on this CPU would be slower than fp32."""
    if accelerator.mixed_precision != "bf16" or accelerator.device.type != "cpu" or cpu_has_native_bf16():
        return None
    return ("bf16 autocast on a CPU without bf16 instructions (AVX512-BF16 or AMX) is emulated and usually "
            "slower than fp32 here; set train.mixed_precision=\"no\" on this machine")


def cpu_threads(setting: int | str, cores: int | None = None, local_processes: int | None = None) -> int:
    """`train.cpu_threads`: a number, or "auto" = the cores this process may run on, shared by the processes on
    this machine. `accelerate launch` without --cpu sets OMP_NUM_THREADS=1, which left one core of two idle."""
    if setting != "auto":
        return int(setting)
    if cores is None:
        cores = usable_cores()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if local_processes is None else local_processes
    return max(cores // max(local, 1), 1)


def apply_cpu_threads(device: torch.device, setting: int | str) -> str | None:
    """Set torch's intra-op threads on a CPU device; returns the line to log (None on GPUs)."""
    if device.type != "cpu":
        return None
    threads = cpu_threads(setting)
    torch.set_num_threads(threads)
    how = "auto: cores / local processes" if setting == "auto" else "train.cpu_threads"
    return (f"computing on the CPU with {threads} thread(s) per process ({how}; "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} is overridden); "
            f"set train.cpu_threads=N to change it")


def local_main_first(accelerator: Accelerator, work: Callable[[], T]) -> T:
    """`work()` on this machine's main process first, then on the others, which find what it cached (the image
    check, the folder index, downloaded weights) instead of doing it again (8 processes decoded every image 8
    times). No process waits forever on another's failure: the main process passes the barrier with its error
    held, the others run `work()` themselves (meeting the same error, or not), and then it raises it."""
    if accelerator.num_processes == 1:
        return work()
    error: BaseException | None = None
    if accelerator.is_local_main_process:
        try:
            result = work()
        except Exception as e:  # noqa: BLE001 (raised again below, after the barrier)
            error = e
    accelerator.wait_for_everyone()
    if not accelerator.is_local_main_process:
        result = work()
    if error is not None:
        raise error
    return result
