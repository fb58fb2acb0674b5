"""imgcls-doctor's measurements: is the device waiting for data? Three speeds of one recipe, in one process:

    report = diagnose(recipe_path, overrides, steps=100, seconds=20)   # imgcls/doctor.py is the command

- bare: the recipe's model alone (as planned: weights, frozen parts) in a bare loop on random tensors already on
  the device, at the per-device batch, with the recipe's precision (autocast; fp16 with a gradient scaler),
  channels-last and compile; timed between device synchronisations after warm-up steps.
- input: the recipe's own train loader (its workers, cache, decode, sampler) and the step that turns a batch into
  the model's input on the device (GPU decode, augmentation, normalize); no model.
- trainer: the `Trainer` itself for N optimizer steps (its own setup, loader, `train_epoch`, `train_step` and
  logging; evaluation and checkpoints are left out), its speed the median `images_per_s` of its logged windows
  after the first, as benchmarks/ceiling.py reads a real run's metrics.jsonl.

Each phase stops at `steps` steps or `seconds`, whichever comes first. `doctor_advice.py` names the limit and
says what to change.
"""
from __future__ import annotations

import copy
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from imgcls.data.gpu_decode import check_gpu_decode
from imgcls.data.loaders import make_loader
from imgcls.data.pool import usable_cores
from imgcls.errors import DataError, RecipeError
from imgcls.recipe import Recipe, load_recipe
from imgcls.training.distributed import apply_cpu_threads, create_accelerator
from imgcls.training.doctor_advice import advise, name_limit
from imgcls.training.optim import build_optimizer
from imgcls.training.plan import make_plan
from imgcls.training.trainer import Trainer

WARMUP_STEPS = 5
WARMUP_SECONDS = 2.0  # and at least this long: the first steps in a process pay one-off costs (allocator, kernels)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device, steps: int, seconds: float, warmup: int = WARMUP_STEPS) -> float:
    """The median seconds of one synchronised `step()`, after at least `warmup` calls and WARMUP_SECONDS (at most
    `seconds`), over up to `steps` steps or `seconds`. The median: a machine shared with other work stalls a few
    steps now and then, and one stall must not decide the verdict."""
    start, n = time.perf_counter(), 0
    while n < warmup or time.perf_counter() - start < min(WARMUP_SECONDS, seconds):
        step()
        n += 1
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < steps and (not times or time.perf_counter() - start < seconds):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bare_loop(model: torch.nn.Module, recipe: Recipe, device: torch.device, precision: str, batch: int,
              num_classes: int, steps: int, seconds: float, channels_last: bool | None = None) -> float:
    """Images/s of forward + backward + optimizer step of a copy of `model` on one batch already on the device
    (the median step)."""
    t, data = recipe.train, recipe.data
    channels_last = t.channels_last if channels_last is None else channels_last
    torch.manual_seed(0)
    model = copy.deepcopy(model).to(device).train()
    images = torch.randn(batch, data.channels, *data.image_size, device=device)
    if channels_last:
        model, images = model.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
    if t.compile:
        model.compile()
    optimizer = build_optimizer(recipe.optim, model)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    dtype = DTYPES.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=t.label_smoothing)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
    step_s = timed(step, device, steps, seconds, warmup=WARMUP_STEPS * (4 if t.compile else 1))
    del model, optimizer, images
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return batch / step_s


def input_pipeline(trainer: Trainer, batch: int, steps: int, seconds: float) -> dict:
    """The trainer's train dataset through a loader of its own (the recipe's workers, cache, decode and sampler)
    and onto the device as the loop does (decode there, augment, normalize); no model. images_per_s counts both,
    fetch_images_per_s the loader alone; first_batch_s is the loader's start (workers, first reads)."""
    r, device, ds = trainer.recipe, trainer.accelerator.device, trainer.train_images
    loader = make_loader(ds, batch, r.data, True, r.seed, trainer.sampler)
    if trainer.sampler is not None:
        trainer.sampler.set_epoch(0)
    start = time.perf_counter()
    it = iter(loader)
    fetch = prepare = 0.0
    n = 0
    first = None
    try:
        while n < steps and (first is None or n == 0 or time.perf_counter() - first < seconds):
            t0 = time.perf_counter()
            images, labels, positions = next(it)
            t1 = time.perf_counter()
            if isinstance(images, torch.Tensor):
                images = images.to(device, non_blocking=True)
            ds.model_input(images, positions.to(device, non_blocking=True))
            labels.to(device, non_blocking=True)
            sync(device)
            t2 = time.perf_counter()
            if first is None:  # the loader's start-up is reported, not counted in the speed
                first = t2
                first_batch_s = t2 - start
                continue
            fetch, prepare, n = fetch + t1 - t0, prepare + t2 - t1, n + 1
    except StopIteration:
        pass
    finally:
        del it
    if first is None or n == 0:
        raise DataError(f"imgcls-doctor times the train loader from its second batch on, and it gave fewer than 2 "
                        f"batches of {batch}: use a train split of at least {2 * batch} images, or a smaller "
                        f"train.global_batch_size")
    images = n * batch
    return {"images_per_s": images / (fetch + prepare), "fetch_images_per_s": images / max(fetch, 1e-9),
            "prepare_images_per_s": images / max(prepare, 1e-9), "batches": n, "first_batch_s": first_batch_s}


class MeasuredTrainer(Trainer):
    """The Trainer as it trains, without evaluation and checkpoints: the doctor measures its steps."""

    def validate(self, epoch: int) -> None:
        """No validation: only the training steps are timed."""

    def save_checkpoint(self) -> None:
        """No checkpoint: the doctor writes nothing into a run folder."""


def trainer_speed(trainer: Trainer) -> dict:
    """Run the trainer's own epochs until its max_steps/max_time; median of its logged windows after the first."""
    while not trainer.done:
        trainer.train_epoch()
    if trainer.state.window_batches:  # the steps since the last logged window (a max_time stop, a short run)
        trainer.log_train()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if r["event"] == "train"]
    windows = windows[1:] or windows
    if not windows:
        raise RuntimeError("the trainer logged no train window; raise --steps")
    return {"images_per_s": statistics.median(r["images_per_s"] for r in windows),
            "data_wait_fraction": statistics.median(r["data_wait_fraction"] for r in windows),
            "steps": trainer.state.step, "windows": len(windows)}


def measure_overrides(steps: int, seconds: float) -> list[str]:
    """The trainer phase: `steps` optimizer steps (or `seconds` after setup), logged in about 8 windows; no
    trackers, plots, probe or calibration."""
    every = max(steps // 8, 5)  # as benchmarks/ceiling.py
    return [f"train.max_steps={steps}", f"train.max_time={seconds}", f"train.log_every_steps={every}",
            "tracking.backends=[]", "tracking.plots=false", "probe.enabled=false", "train.calibrate=false",
            "train.evaluate_before_train=false", "export.formats=[]"]


def diagnose(recipe_path: str, overrides: list[str], steps: int = 100, seconds: float = 20.0) -> dict:
    """The three speeds of the recipe on this process's device, the limit and the advice, as one JSON-able dict."""
    user = load_recipe(recipe_path, overrides)
    recipe = load_recipe(recipe_path, [*overrides, *measure_overrides(steps, seconds)])
    started = time.perf_counter()
    accelerator = create_accelerator(recipe.train, recipe.seed)  # refuses fp16 on the CPU, as train does
    if accelerator.num_processes > 1:
        raise RecipeError(f"imgcls-doctor measures one device in one process, and this is process "
                          f"{accelerator.process_index} of {accelerator.num_processes}: run it as imgcls-doctor RECIPE "
                          f"(or python -m imgcls.doctor RECIPE), not under accelerate launch or torchrun")
    device = accelerator.device
    apply_cpu_threads(device, recipe.train.cpu_threads)
    check_gpu_decode(recipe.data, device)  # refuses data.decode = "gpu" without CUDA, as train does
    set_seed(recipe.seed)  # as train does: the same initial weights
    plan = make_plan(recipe, accelerator.num_processes)
    recipe, batch, precision = plan.recipe, plan.per_device_batch, accelerator.mixed_precision
    setup_s = time.perf_counter() - started

    def bare(**kw) -> float:  # a variant gets a quarter of the time: the whole run stays within ~2 minutes
        return bare_loop(plan.model, recipe, device, kw.pop("precision", precision), kw.pop("batch", batch),
                         plan.num_classes, steps, seconds / 4 if kw else seconds, **kw)
    speeds = {"bare": bare()}
    with tempfile.TemporaryDirectory(prefix="imgcls-doctor-") as tmp:
        trainer = MeasuredTrainer(recipe, accelerator, plan, Path(tmp), None)
        try:
            trainer.setup()
            inputs = input_pipeline(trainer, batch, steps, seconds)
            measured = trainer_speed(trainer)
        finally:
            trainer.cleanup()
    speeds["input"], speeds["trainer"] = inputs["images_per_s"], measured["images_per_s"]
    facts = {"device": device.type, "cores": usable_cores(), "precision": precision, "per_device_batch": batch,
             "train_images": len(plan.splits.train), "bf16_ok": bf16_usable(device),
             "working_bytes": working_bytes(recipe, len(plan.splits.train))}
    limit = name_limit(speeds, inputs, measured)
    variants = try_variants(bare, recipe, facts, speeds["bare"]) if limit["limit"] == "model" else {}
    return {"recipe": recipe_path, "overrides": overrides, "name": user.name, **facts,
            "workers": user.data.workers, "cache": user.data.cache, "decode": user.data.decode,
            "channels_last": user.train.channels_last, "compile": user.train.compile,
            "images_per_s": speeds, "ratio_trainer_bare": speeds["trainer"] / speeds["bare"],
            "data_wait_fraction": measured["data_wait_fraction"], "input": inputs, "trainer": measured,
            **limit, "variants": variants, "advice": advise(user, facts, speeds, inputs, measured, limit, variants),
            "steps": steps, "seconds_per_phase": seconds, "setup_s": setup_s,
            "total_s": time.perf_counter() - started, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else ""}


def bf16_usable(device: torch.device) -> bool:
    """bf16 runs natively: a CUDA device that supports it, or a CPU with AVX512-BF16/AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def working_bytes(recipe: Recipe, images: int) -> int:
    """Bytes of the train split as stored uint8 pixels at the working size (what data.cache would keep)."""
    d = recipe.data
    size = d.working_size or [math.floor(s / d.crop_pct) for s in d.image_size]
    return images * d.channels * size[0] * size[1]


def try_variants(bare, recipe: Recipe, facts: dict, base: float) -> dict:
    """A model-bound run: the bare loop again with each speed setting the recipe does not use yet."""
    out = {}
    if not recipe.train.channels_last and facts["device"] == "cuda":
        out["train.channels_last"] = bare(channels_last=True)
    if facts["precision"] == "no" and facts["bf16_ok"]:
        out["train.mixed_precision"] = bare(precision="bf16")
    try:
        out["batch_x2"] = bare(batch=2 * facts["per_device_batch"])
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
    return {k: {"images_per_s": v, "gain": v / base} for k, v in out.items()}
