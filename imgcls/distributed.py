"""Building the Accelerator: precision policy, process group, and the batch arithmetic across processes."""
from __future__ import annotations

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


def per_device_batch(global_batch: int, world_size: int, accum: int) -> int:
    """The global batch is the recipe's; each process gets global / (world x accumulation)."""
    share = world_size * accum
    if global_batch % share:
        raise RecipeError(
            f"train.global_batch_size = {global_batch} does not divide into {world_size} process(es) x "
            f"{accum} accumulation step(s); pick a multiple of {share}"
        )
    return global_batch // share
