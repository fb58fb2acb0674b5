"""imgcls-doctor's verdict: which part limits the run, and what to change, with the measured numbers.

The trainer's time per image is split into four parts, each measured: the model (the bare loop's time per image),
waiting for the loader (the trainer's own `data_wait_fraction`), turning a batch into the model's input on the
device (decode there, augmentation, normalize: timed alone in the input phase), and the rest (the trainer's own
work between steps). The model's part is "model"; waiting plus preparing is "input"; the rest is "trainer"; the
largest names the limit. Pure functions of the measurements: tested without running anything.
"""
from __future__ import annotations

import math

from imgcls.recipe import Recipe

LIMITS = {"model": "the model (compute): the data is ready when the model asks for it",
          "input": "the input pipeline: the model waits for data",
          "trainer": "the trainer's own work between steps: neither the model nor the data"}
WORTH = 1.1  # a measured variant is advised when it is at least this much faster
WAITING = 0.05  # the trainer waiting for the loader this fraction of its time: the loader is worth changing


def name_limit(speeds: dict, inputs: dict, measured: dict) -> dict:
    """{"limit": "model" | "input" | "trainer", "ms_per_image": each part's milliseconds per image}."""
    trainer_ms, model_ms = 1000 / speeds["trainer"], 1000 / speeds["bare"]
    wait_ms = measured["data_wait_fraction"] * trainer_ms
    prepare_ms = 1000 / inputs["prepare_images_per_s"]
    parts = {"model": model_ms, "input": wait_ms + prepare_ms,
             "trainer": max(trainer_ms - model_ms - wait_ms - prepare_ms, 0.0)}
    return {"limit": max(parts, key=parts.get), "ms_per_image": parts,
            "ms_per_image_detail": {"wait": wait_ms, "prepare": prepare_ms, "trainer_total": trainer_ms}}


def _item(setting: str, why: str) -> dict:
    return {"setting": setting, "why": why}


def input_advice(recipe: Recipe, facts: dict, speeds: dict, inputs: dict, measured: dict) -> list[dict]:
    d, out = recipe.data, []
    waits = measured["data_wait_fraction"] >= WAITING
    bare, workers, cap = speeds["bare"], d.workers, max(facts["cores"] - 1, 1)
    fetch = inputs["fetch_images_per_s"]
    per_worker = fetch / max(workers, 1)
    needed = max(math.ceil(1.2 * bare / per_worker), 1)  # 20 % headroom; 1: fetching leaves the model's process
    decodes = d.cache == "none" or d.decode == "gpu"
    on_cpu = facts["device"] == "cpu"
    # on the CPU, decoding once comes first: a worker takes a core from the model's threads there (on 2 cores,
    # data.workers = 1 beside 2 compute threads made the trainer x0.75, data.cache = "memory" x1.5-1.6)
    cache = workers_item = None
    if waits and d.cache == "none" and d.decode == "cpu" and d.source != "shards":
        mib = facts["working_bytes"] / 2 ** 20
        where = '"memory" (or "disk")' if mib < 4096 else '"disk"'
        cache = _item(f'data.cache = {where}', (
            f"every epoch decodes and resizes each image again; a store of the decoded train pixels "
            f"({mib:,.0f} MiB at the working size) is filled once, then read: later epochs (and runs) decode "
            f"nothing"))
    if waits and needed > workers and workers < cap:
        n = min(needed, cap)
        workers_item = _item(f"data.workers = {n}", (
            f"the loader gives {fetch:,.0f} images/s with {workers} worker(s) (~{per_worker:,.0f} per "
            f"{'worker' if workers else 'process'}); the model takes {bare:,.0f} images/s, so ~{needed} workers "
            f"would keep up" + (f"; {cap} is all this machine's {facts['cores']} cores allow (one stays with the "
                                f"model)" if needed > cap else "") + (
            f"; on the CPU the workers share the cores with the model's threads: set train.cpu_threads = "
            f"{max(facts['cores'] - n, 1)} with it" if on_cpu else "")))
    # on a GPU the workers feed it without slowing it: workers first
    out += [a for a in ((cache, workers_item) if on_cpu else (workers_item, cache)) if a is not None]
    if waits and facts["device"] == "cuda" and d.decode == "cpu" and d.cache == "none" and d.source in ("folder", "listfile"):
        out.append(_item('data.decode = "gpu"', (
            "nvJPEG decodes each batch's JPEGs on the GPU in one call; the workers only read bytes "
            "(needs torchcodec: pip install \"imgcls[gpu-decode]\")")))
    prepare_ms = 1000 / inputs["prepare_images_per_s"] * facts["per_device_batch"]
    if not decodes and inputs["prepare_images_per_s"] < fetch:
        out.append(_item("data.augment", (
            f"turning a batch into the model's input on the {facts['device']} (augmentation, normalize) takes "
            f"{prepare_ms:.1f} ms per batch of {facts['per_device_batch']}, more than the loader: cheaper "
            f"augmentations, or data.working_size = image_size so the framing resizes nothing")))
    return out


def model_advice(recipe: Recipe, facts: dict, speeds: dict, variants: dict) -> list[dict]:
    out, bare = [], speeds["bare"]

    def gained(key: str) -> str:
        v = variants[key]
        return f"the bare loop goes from {bare:,.0f} to {v['images_per_s']:,.0f} images/s (x{v['gain']:.2f})"
    if variants.get("train.channels_last", {}).get("gain", 0) >= WORTH:
        out.append(_item("train.channels_last = true", gained("train.channels_last")))
    if variants.get("train.mixed_precision", {}).get("gain", 0) >= WORTH:
        out.append(_item('train.mixed_precision = "bf16"', gained("train.mixed_precision") +
                         "; bf16 keeps fp32's range (no loss scaling)"))
    if variants.get("batch_x2", {}).get("gain", 0) >= WORTH:
        g = recipe.train.global_batch_size
        out.append(_item(f"train.global_batch_size = {2 * g}", (
            f"at per-device batch {2 * facts['per_device_batch']} {gained('batch_x2')}; the device is not full at "
            f"{facts['per_device_batch']}. Scale optim.lr with the batch (x2 by the linear rule) and check the "
            f"accuracy")))
    if not out:
        out.append(_item("nothing in the input path", (
            f"the model is the limit and none of the speed settings tried ({', '.join(variants) or 'none apply'}) "
            f"made its bare loop {WORTH:.1f}x faster; a smaller model or a faster device would")))
    return out


def trainer_advice(recipe: Recipe, facts: dict, limit: dict) -> list[dict]:
    t, batch = recipe.train, facts["per_device_batch"]
    overhead = limit["ms_per_image"]["trainer"] * batch
    causes = []
    if t.on_nonfinite == "skip":
        causes.append('train.on_nonfinite = "skip" waits for the device after every step (use "stop")')
    if t.ema_decay:
        causes.append(f"train.ema_decay = {t.ema_decay} updates a copy of the weights every step")
    if t.log_every_steps < 20:
        causes.append(f"train.log_every_steps = {t.log_every_steps} syncs with the device that often")
    if t.grad_accum_steps > 1:
        causes.append(f"train.grad_accum_steps = {t.grad_accum_steps}: smaller micro-batches, more launches")
    if batch < 64:
        causes.append(f"a per-device batch of {batch} makes fixed per-step costs large: a larger batch")
    why = f"{overhead:.1f} ms per batch of {batch} is neither the model nor the data"
    return [_item("; ".join(causes) if causes else "the per-step overhead", why)]


def advise(recipe: Recipe, facts: dict, speeds: dict, inputs: dict, measured: dict, limit: dict,
           variants: dict) -> list[dict]:
    """Concrete settings for the limiting part, each with the numbers that justify it."""
    if limit["limit"] == "input":
        return input_advice(recipe, facts, speeds, inputs, measured)
    if limit["limit"] == "model":
        return model_advice(recipe, facts, speeds, variants)
    return trainer_advice(recipe, facts, limit)
