"""Train an image classifier from a TOML recipe.

    accelerate launch -m imgcls.train recipes/mnist.toml [section.key=value ...] [--resume auto|PATH] [--dry-run]
    python -m imgcls.train recipes/mnist.toml train.epochs=1          # one process, no launcher needed

The loop is written out in `train()` below, top to bottom: data -> model -> optimizer -> prepare -> epochs of
(train steps, validation, checkpoint, best/last artifacts) -> test on the best model -> results.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .calibration import calibrate_artifact
from .data import DataSplits, build_splits, make_datasets, make_loader
from .distributed import cpu_threads_note, create_accelerator, per_device_batch
from .metrics import evaluate, per_class_accuracy, scalars
from .models import apply_freeze, build_model, check_model_args, count_parameters, load_weights, set_train_mode
from .preflight import PreflightError
from .optim import build_optimizer, build_scheduler
from .recipe import Recipe, RecipeError, load_recipe, recipe_to_toml
from .runinfo import environment, setup_run, write_json
from .sources import DataError
from .tracking import RunLog
from .transforms import Preprocess, batch_mix

log = get_logger(__name__)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving; run again with --resume auto


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="imgcls-train", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe TOML file")
    p.add_argument("overrides", nargs="*", help="section.key=value (value read as TOML), e.g. train.epochs=3")
    p.add_argument("--resume", default="", help="'auto' (newest complete checkpoint of this recipe) or a path")
    p.add_argument("--dry-run", action="store_true", help="build data and model, print the plan, train nothing")
    return p.parse_intermixed_args(argv)


@dataclass
class Plan:
    """Everything derived from the recipe and the world size before training starts."""

    splits: DataSplits
    model: torch.nn.Module
    frozen: list[str]
    per_device_batch: int
    steps_per_epoch: int
    total_steps: int

    def summary(self, recipe: Recipe, world_size: int) -> str:
        trainable, total = count_parameters(self.model)
        return (f"{recipe.name}: {len(self.splits.class_names)} classes, {self.splits.sizes()}, "
                f"model {recipe.model.name} {total:,} parameters ({trainable:,} trainable), global batch "
                f"{recipe.train.global_batch_size} = {world_size} process(es) x {self.per_device_batch} x "
                f"{recipe.train.grad_accum_steps} accumulation, {self.steps_per_epoch} steps/epoch, "
                f"{self.total_steps} steps")


def make_plan(recipe: Recipe, world_size: int) -> Plan:
    """The semantic check: sources load, the model name and arguments resolve, the batch divides."""
    per_dev = per_device_batch(recipe.train.global_batch_size, world_size, recipe.train.grad_accum_steps)
    check_model_args(recipe.model)
    splits = build_splits(recipe.data)
    model = build_model(recipe.model, len(splits.class_names), recipe.data.channels, recipe.data.image_size)
    if recipe.model.weights:
        load_weights(model, recipe.model.weights, recipe.model.train_mode, recipe.data.channels)
    frozen = apply_freeze(model, recipe.model.freeze)
    steps_per_epoch = len(splits.train) // recipe.train.global_batch_size
    if steps_per_epoch == 0:
        raise RecipeError(f"train.global_batch_size = {recipe.train.global_batch_size} is larger than the "
                          f"training split ({len(splits.train)} images)")
    total = steps_per_epoch * recipe.train.epochs
    if recipe.train.max_steps:
        total = min(total, recipe.train.max_steps)
    return Plan(splits, model, frozen, per_dev, steps_per_epoch, total)


class StopSignal:
    """SIGTERM/SIGINT: finish the current step, save, exit with EXIT_PREEMPTED."""

    def __init__(self):
        self.raised = 0
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def release(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.raised = signum

    def agreed(self, accelerator) -> bool:
        """All processes stop at the same step if any one was signalled."""
        flag = torch.tensor([float(self.raised)], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item())


def artifact_config(recipe: Recipe, plan: Plan, extra: dict) -> dict:
    return {"model": {"name": recipe.model.name, "args": dict(recipe.model.args),
                      "num_classes": len(plan.splits.class_names), "in_channels": recipe.data.channels},
            "class_names": plan.splits.class_names,
            "preprocess": Preprocess.from_data(recipe.data).to_dict(), "temperature": 1.0, **extra}


def setup_logging(accelerator, run_dir: Path | None = None) -> None:
    """INFO to stderr (main process only, via accelerate's logger); with a run dir, also to its train.log."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    logging.basicConfig(format=fmt, datefmt="%H:%M:%S")
    root.setLevel(logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    for noisy in ("accelerate.accelerator", "accelerate.checkpointing"):  # a line per file, naming the .tmp
        logging.getLogger(noisy).setLevel(logging.WARNING)                 # folder: we log the checkpoint once
    for handler in [h for h in root.handlers if getattr(h, "imgcls_run_log", False)]:
        root.removeHandler(handler)  # a previous run in this process (tests, notebooks)
        handler.close()
    if run_dir is not None and accelerator.is_main_process:
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter(fmt))
        handler.imgcls_run_log = True
        root.addHandler(handler)


def write_run_files(recipe: Recipe, accelerator, run_dir: Path, per_dev: int) -> None:
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(accelerator, run_dir)
        (run_dir / "recipe.toml").write_text(recipe_to_toml(recipe))
        write_json(run_dir / "env.json", environment(accelerator, per_dev))
    accelerator.wait_for_everyone()


def restore(accelerator, source: Path, run_dir: Path, runlog: RunLog) -> ckpt.TrainState:
    accelerator.load_state(str(source))
    state = ckpt.TrainState()
    state.load_state_dict(json.loads((source / "train_state.json").read_text()))
    if state.world_size != accelerator.num_processes:
        log.warning("resuming a run saved with %d process(es) on %d: the global batch is kept, the per-device "
                    "batch is re-derived; the mid-epoch data position is kept in global samples",
                    state.world_size, accelerator.num_processes)
    runlog.truncate(state.log_rows)
    log.info("resumed from %s at epoch %d, optimizer step %d", source, state.epoch, state.step)
    return state


def save_models(recipe, plan, accelerator, model, run_dir, state, val, is_best) -> None:
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    extra = {"epoch": state.epoch, "step": state.step, "val": scalars(val)}
    config = artifact_config(recipe, plan, extra)
    ckpt.save_artifact(run_dir / "model" / "last", unwrapped, config, recipe_to_toml(recipe))
    if is_best:
        ckpt.save_artifact(run_dir / "model" / "best", unwrapped, config, recipe_to_toml(recipe))


def better(recipe: Recipe, val: dict, best: float | None) -> bool:
    key = recipe.checkpoint.select_metric
    return best is None or (val[key] > best if key == "top1" else val[key] < best)


def log_eval(runlog: RunLog, split: str, step: int, epoch: int, metrics: dict, names: list[str]) -> None:
    per_class = dict(zip(names, per_class_accuracy(metrics["confusion"])))
    runlog.log(split, step, {"epoch": epoch, **scalars(metrics), "per_class_top1": per_class})
    runlog.log_confusion(split, metrics["confusion"], names)
    log.info("epoch %d %s: loss %.4f top1 %.4f%s", epoch, split, metrics["loss"], metrics["top1"],
             f" top5 {metrics['top5']:.4f}" if "top5" in metrics else "")


def train(recipe: Recipe, resume: str = "", dry_run: bool = False) -> int:
    accelerator = create_accelerator(recipe.train, recipe.seed)  # trackers are started by RunLog, one by one
    setup_logging(accelerator)
    if note := cpu_threads_note(accelerator.device):
        log.warning(note)
    set_seed(recipe.seed)
    plan = make_plan(recipe, accelerator.num_processes)
    if dry_run:
        if accelerator.is_main_process:
            print(recipe_to_toml(recipe))
            print(plan.summary(recipe, accelerator.num_processes))
        return 0
    run_dir, source = setup_run(recipe, accelerator, resume)
    write_run_files(recipe, accelerator, run_dir, plan.per_device_batch)
    accelerator.project_configuration.set_directories(str(run_dir))
    accelerator.project_configuration.logging_dir = str(run_dir / "tensorboard")
    log.info(plan.summary(recipe, accelerator.num_processes))
    log.info("precision in effect: %s on %s", accelerator.mixed_precision, accelerator.device)

    num_classes = len(plan.splits.class_names)
    datasets = make_datasets(plan.splits, recipe.data, recipe.seed)
    train_loader = make_loader(datasets["train"], plan.per_device_batch, recipe.data, True, recipe.seed)
    eval_loaders = {k: make_loader(ds, recipe.train.eval_batch_size, recipe.data, False, recipe.seed)
                    for k, ds in datasets.items() if k != "train"}
    model = plan.model
    if recipe.model.sync_batchnorm and accelerator.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(recipe.optim, model)
    scheduler = build_scheduler(recipe.schedule, optimizer, plan.steps_per_epoch, plan.total_steps)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    eval_loaders = {k: accelerator.prepare(v) for k, v in eval_loaders.items()}
    accelerator.register_for_checkpointing(scheduler)

    state = ckpt.TrainState(world_size=accelerator.num_processes)
    runlog = RunLog(accelerator, recipe, run_dir)
    if source is not None:
        state = restore(accelerator, source, run_dir, runlog)
        state.world_size = accelerator.num_processes
    runlog.start_trackers(state.tracker_ids)
    state.tracker_ids = runlog.run_ids()
    mix = batch_mix(recipe.data.augment, num_classes)
    stop = StopSignal()
    micro_per_epoch = plan.steps_per_epoch * recipe.train.grad_accum_steps
    try:
        if recipe.train.evaluate_before_train and state.step == 0:
            log_eval(runlog, "val", 0, 0, evaluate(model, eval_loaders["val"], accelerator, num_classes),
                     plan.splits.class_names)
        while state.epoch < recipe.train.epochs and state.step < plan.total_steps:
            stopped = train_epoch(recipe, plan, accelerator, model, optimizer, scheduler, train_loader, mix,
                                  state, runlog, stop, micro_per_epoch, run_dir)
            if stopped:
                ckpt_path = ckpt.save_checkpoint(accelerator, run_dir, sync_rows(state, runlog),
                                                 recipe.checkpoint.keep_last)
                log.warning("stopped by signal %d at step %d; saved %s. Continue with: python -m imgcls.train %s "
                            "--resume auto", stop.raised, state.step, ckpt_path, " ".join(sys.argv[1:2]))
                return EXIT_PREEMPTED
            if state.batch_in_epoch >= micro_per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if end_of_epoch(recipe, plan, accelerator, model, eval_loaders["val"], state, runlog, run_dir):
                break
        return finish(recipe, plan, accelerator, model, eval_loaders, state, runlog, run_dir)
    finally:
        stop.release()
        runlog.close()
        accelerator.end_training()  # every rank: finishes trackers, tears the process group down cleanly


def sync_rows(state: ckpt.TrainState, runlog: RunLog) -> ckpt.TrainState:
    state.log_rows = runlog.rows
    return state


def train_epoch(recipe, plan, accelerator, model, optimizer, scheduler, train_loader, mix, state, runlog, stop,
                micro_per_epoch, run_dir) -> bool:
    """One epoch (or the rest of one, after a resume). Returns True when a stop signal was agreed on."""
    set_train_mode(model, plan.frozen)
    train_loader.set_epoch(state.epoch)
    # accelerate's set_epoch skips the dataset when the sampler is sharded (several processes): set it here
    train_loader.dataset.set_epoch(state.epoch)
    loader = accelerator.skip_first_batches(train_loader, state.batch_in_epoch) if state.batch_in_epoch \
        else train_loader
    bar = tqdm(total=micro_per_epoch, initial=state.batch_in_epoch, desc=f"epoch {state.epoch}",
               disable=None if accelerator.is_local_main_process else True, dynamic_ncols=True,
               leave=False)
    window = {"images": 0, "wait": 0.0, "t0": time.perf_counter()}
    fetched = time.perf_counter()
    for images, labels in loader:
        window["wait"] += time.perf_counter() - fetched
        with accelerator.accumulate(model):
            targets = labels
            if mix is not None:
                images, targets = mix(images, labels)
            logits = model(images)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=recipe.train.label_smoothing)
            accelerator.backward(loss)
            if accelerator.sync_gradients and recipe.optim.grad_clip_norm:
                accelerator.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip_norm)
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        state.batch_in_epoch += 1
        state.window_loss += loss.detach().float().item()
        state.window_batches += 1
        window["images"] += images.shape[0] * accelerator.num_processes
        bar.update(1)
        if accelerator.sync_gradients:
            state.step += 1
            if state.step % recipe.train.log_every_steps == 0 or state.batch_in_epoch >= micro_per_epoch:
                log_train_window(accelerator, scheduler, state, runlog, window, bar)
            every = recipe.checkpoint.every_steps
            if every and state.step % every == 0 and state.batch_in_epoch < micro_per_epoch:
                ckpt.save_checkpoint(accelerator, run_dir, sync_rows(state, runlog), recipe.checkpoint.keep_last)
            if stop.agreed(accelerator):
                bar.close()
                return True
            if state.batch_in_epoch >= micro_per_epoch or state.step >= plan.total_steps:
                break
        fetched = time.perf_counter()
    bar.close()
    return False


def log_train_window(accelerator, scheduler, state, runlog, window, bar) -> None:
    loss = torch.tensor([state.window_loss / max(state.window_batches, 1)], device=accelerator.device)
    loss = accelerator.reduce(loss, reduction="mean").item() if accelerator.num_processes > 1 else loss.item()
    elapsed = time.perf_counter() - window["t0"]
    values = {"epoch": state.epoch, "loss": loss, "lr": scheduler.get_last_lr()[0],
              "images_per_s": window["images"] / max(elapsed, 1e-9),
              "data_wait_fraction": window["wait"] / max(elapsed, 1e-9)}
    runlog.log("train", state.step, values)
    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{values['images_per_s']:.0f}")
    if bar.disable:  # no terminal (batch jobs, CI): progress goes to the log instead
        log.info("epoch %d step %d: loss %.4f lr %.4g %.0f images/s", state.epoch, state.step, loss,
                 values["lr"], values["images_per_s"])
    state.window_loss, state.window_batches = 0.0, 0
    window.update(images=0, wait=0.0, t0=time.perf_counter())


def end_of_epoch(recipe, plan, accelerator, model, val_loader, state, runlog, run_dir) -> bool:
    """Validate, keep best/last, save resume state. Returns True when training should stop early."""
    epoch = state.epoch - 1 if state.batch_in_epoch == 0 else state.epoch
    done = state.step >= plan.total_steps or state.epoch >= recipe.train.epochs
    if not done and (epoch + 1) % recipe.train.eval_every_epochs:
        return False
    val = evaluate(model, val_loader, accelerator, len(plan.splits.class_names))
    log_eval(runlog, "val", state.step, epoch, val, plan.splits.class_names)
    runlog.draw_plots()
    is_best = better(recipe, val, state.best_metric)
    if is_best:
        state.best_metric, state.best_epoch, state.bad_epochs = val[recipe.checkpoint.select_metric], epoch, 0
    else:
        state.bad_epochs += 1
    save_models(recipe, plan, accelerator, model, run_dir, state, val, is_best)
    if recipe.checkpoint.every_epochs and (epoch + 1) % recipe.checkpoint.every_epochs == 0 or done:
        ckpt.save_checkpoint(accelerator, run_dir, sync_rows(state, runlog), recipe.checkpoint.keep_last)
    patience = recipe.train.early_stop_patience
    if patience and state.bad_epochs >= patience:
        log.info("early stop: no val improvement for %d evaluations (best epoch %d)", patience, state.best_epoch)
        return True
    return False


def finish(recipe, plan, accelerator, model, eval_loaders, state, runlog, run_dir) -> int:
    """Test once, on the best model; calibrate it; export it if the recipe asks; write results.json."""
    accelerator.wait_for_everyone()
    best_dir = run_dir / "model" / "best"
    accelerator.unwrap_model(model).load_state_dict(load_file(str(best_dir / "model.safetensors")))
    names = plan.splits.class_names
    results = {"name": recipe.name, "run_dir": str(run_dir), "best_epoch": state.best_epoch,
               "steps": state.step, "select_metric": recipe.checkpoint.select_metric}
    val = evaluate(model, eval_loaders["val"], accelerator, len(names), keep_logits=recipe.train.calibrate)
    results["val"] = scalars(val)
    if recipe.train.calibrate and accelerator.is_main_process:  # T goes into model/best/config.json
        results["calibration"] = calibrate_artifact(val["logits"], val["labels"], best_dir)
    if "test" in eval_loaders:
        test = evaluate(model, eval_loaders["test"], accelerator, len(names))
        log_eval(runlog, "test", state.step, state.best_epoch, test, names)
        results["test"] = scalars(test)
    runlog.final_report(accelerator.unwrap_model(model), eval_loaders["val"].dataset, state.step)
    if recipe.export.formats and accelerator.is_main_process:  # with its parity check, as imgcls-export does
        from .export import main as export_main

        results["export"] = {"passed": export_main([str(best_dir)]) == 0,
                             "report": str(best_dir / "export" / "export_report.json")}
    if accelerator.is_main_process:
        write_json(run_dir / "results.json", results)
    log.info("results: val top1 %.4f%s -> %s", results["val"]["top1"],
             f", test top1 {results['test']['top1']:.4f}" if "test" in results else "", run_dir / "results.json")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        return train(recipe, resume=args.resume, dry_run=args.dry_run)
    except (RecipeError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PreflightError as e:  # the environment, not the recipe
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
