"""Train an image classifier from a TOML recipe.

    accelerate launch -m imgcls.train recipes/mnist.toml [section.key=value ...] [--resume auto|RUN] [--dry-run]
    python -m imgcls.train recipes/mnist.toml train.epochs=1          # one process, no launcher needed
    python -m imgcls.train --resume runs/mnist/20261123-101500        # continue that run with its own recipe

`Trainer` owns one run: `setup()` builds data, model, optimizer and trackers onto it, `run()` is the loop, read
top to bottom, and `cleanup()` closes what setup opened. After every optimizer step `after_step()` decides, in
this order: log, epoch end, evaluation (best/last artifacts), checkpoint, stop.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm

from imgcls.inference.artifact import save_artifact
from imgcls.training import checkpoint as ckpt
from imgcls.training.calibration import calibrate_artifact
from imgcls.data.loaders import make_datasets, make_loader, train_sampler
from imgcls.training.distributed import apply_cpu_threads, bf16_cpu_warning, create_accelerator
from imgcls.exitcodes import EXIT_PREEMPTED, EXIT_USAGE
from imgcls.training.ema import WeightEma
from imgcls.data.gpu_decode import check_gpu_decode
from imgcls.training.guards import Deadline, NonFiniteGuard, nonfinite_message
from imgcls.errors import NonFiniteLoss
from imgcls.data.imbalance import class_weights, describe_weights, split_labels
from imgcls.training.metrics import evaluate, per_class_accuracy, scalars
from imgcls.training.plan import Plan, make_plan
from imgcls.errors import PreflightError
from imgcls.training.probe import probe_stage
from imgcls.training.optim import build_optimizer, build_scheduler
from imgcls.recipe import Recipe, TrainConfig, recipe_to_toml
from imgcls.errors import RecipeError
from imgcls.training.runinfo import load_run_recipe, setup_logging, setup_run, write_json, write_run_files
from imgcls.errors import ShardError
from imgcls.training.signals import StopSignal, resume_command
from imgcls.errors import DataError
from imgcls.tracking.runlog import RunLog
from imgcls.data.transforms import Preprocess, batch_mix
from imgcls.models.weights import set_train_mode

log = get_logger(__name__)
STOP_CHECK_STEPS = 10  # with several processes, a stop signal is acted on within this many optimizer steps


class Trainer:
    """One run: its recipe, accelerator, plan, run folder and, after `setup()`, its data, model, optimizer,
    schedule, state and trackers. `source`: the checkpoint to resume from, or None."""

    def __init__(self, recipe: Recipe, accelerator, plan: Plan, run_dir: Path, source: Path | None):
        self.recipe, self.accelerator, self.plan = recipe, accelerator, plan
        self.run_dir, self.source = run_dir, source
        self.micro_per_epoch = plan.steps_per_epoch * recipe.train.grad_accum_steps
        self.saved_step = -1  # one checkpoint per optimizer step, however many reasons ask for it
        self.stop: StopSignal | None = None
        self.runlog: RunLog | None = None
        self.stopped_by = ""  # "max_time" | "early_stop" once the run ends before its planned steps

    # ------------------------------------------------------------------ setup / cleanup
    def setup(self) -> None:
        r, acc, plan = self.recipe, self.accelerator, self.plan
        datasets = make_datasets(plan.splits, r.data, r.seed)
        self.train_images = datasets["train"]  # augments on the device: per-sample parameters of (seed, epoch, k)
        self.class_weights = None  # train.class_weights: the cross-entropy's `weight`
        if r.train.class_weights == "balanced":
            names = plan.splits.class_names
            self.class_weights = class_weights(split_labels(plan.splits.train), names).to(acc.device)
            log.info("train.class_weights = \"balanced\": %s", describe_weights(self.class_weights, names))
        self.sampler = train_sampler(plan.splits.train, r.data, r.seed, acc.num_processes, plan.per_device_batch,
                                     self.micro_per_epoch)
        train_loader = make_loader(datasets["train"], plan.per_device_batch, r.data, True, r.seed, self.sampler)
        eval_loaders = {k: make_loader(ds, r.train.eval_batch_size, r.data, False, r.seed)
                        for k, ds in datasets.items() if k != "train"}
        model = plan.model
        if r.model.sync_batchnorm and acc.num_processes > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model, self.ema = speed_and_ema(model, r.train, acc.device)
        optimizer = build_optimizer(r.optim, model)
        self.scheduler = build_scheduler(r.schedule, optimizer, plan.steps_per_epoch, plan.total_steps)
        self.model, self.optimizer, self.train_loader = acc.prepare(model, optimizer, train_loader)
        self.eval_loaders = {k: acc.prepare(v) for k, v in eval_loaders.items()}
        # the scheduler and the EMA are saved by imgcls (ckpt.save_checkpoint), not registered with accelerate,
        # whose custom states are pickles it loads with weights_only=False
        self.state = ckpt.TrainState(world_size=acc.num_processes)
        self.runlog = RunLog(acc, r, self.run_dir)
        if self.source is not None:
            self.restore(self.source)
        self.runlog.start_trackers(self.state.tracker_ids)
        self.state.tracker_ids = self.runlog.run_ids()
        self.mix = batch_mix(r.data.augment, plan.num_classes)
        self.loss_sum = torch.zeros((), device=acc.device)  # summed on the device: no host sync per step
        self.loss_sum += self.resumed_window_loss()
        self.top1_counts = torch.tensor(self.resumed_top1_counts(), device=acc.device)  # [correct, seen] this epoch
        self.nonfinite = NonFiniteGuard(acc.device)
        self.deadline = Deadline(r.train.max_time)
        self.stop = StopSignal()
        if self.source is None and r.probe.enabled:
            self.run_probe(datasets)

    def run_probe(self, datasets: dict) -> None:
        """Stage 1 (`[probe]`): the new head fitted on the frozen backbone's features. Its val result is a
        candidate for model/best like any epoch's; a checkpoint at step 0 follows, so a resumed run starts
        stage 2 from this head and never fits it again."""
        fit, row, val = probe_stage(self.model, datasets, self.plan.splits, self.recipe, self.accelerator,
                                    self.class_weights)
        log.info("probe: %d train features (%d views) in %.1fs (%d of %d sets from the cache), head fitted in "
                 "%.1fs: l2 %g, train loss %.4f, val loss %.4f, val top1 %.4f", row["train_features"], row["views"],
                 row["features_s"], row["feature_sets_cached"], row["feature_sets"], row["fit_s"], fit.l2,
                 fit.train_loss, fit.val_loss, fit.val_top1)
        self.runlog.log("probe", 0, row)
        if self.ema is not None:  # the average starts from the probed model, not from the random head
            self.ema.module.load_state_dict(self.accelerator.unwrap_model(self.model).state_dict())
        self.select(0, val)
        self.save_checkpoint()

    def restore(self, source: Path) -> None:
        ckpt.check_no_pickles(source)
        self.accelerator.load_state(str(source))
        self.state = ckpt.read_train_state(source, self.micro_per_epoch)
        ckpt.restore_extras(source, self.scheduler, self.ema, self.accelerator.process_index, self.state.world_size)
        if self.state.world_size != self.accelerator.num_processes:
            log.warning("resuming a run saved with %d process(es) on %d: the global batch is kept, the per-device "
                        "batch is re-derived; the mid-epoch data position is kept in global samples",
                        self.state.world_size, self.accelerator.num_processes)
        self.state.world_size = self.accelerator.num_processes
        self.runlog.truncate(self.state.log_rows)
        log.info("resumed from %s at epoch %d, optimizer step %d", source, self.state.epoch, self.state.step)

    def resumed_window_loss(self) -> float:
        """This process's loss sum since the last log, as saved; on another process count, the saved mean."""
        saved, acc = self.state.window_losses, self.accelerator
        if len(saved) == acc.num_processes:
            return saved[acc.process_index]
        return sum(saved) / len(saved) if saved else 0.0

    def resumed_top1_counts(self) -> list[int]:
        """This process's [correct, seen] of the epoch so far, as saved; on another process count, all on rank 0."""
        saved, acc = self.state.epoch_top1, self.accelerator
        if len(saved) == acc.num_processes:
            return saved[acc.process_index]
        return [sum(c for c, _ in saved), sum(n for _, n in saved)] if saved and acc.is_main_process else [0, 0]

    def cleanup(self) -> None:
        """Close what setup() opened, also after a failure part-way through it."""
        if self.stop is not None:
            self.stop.release()
        if self.runlog is not None:
            self.runlog.close()
        self.accelerator.end_training()  # every rank: finishes trackers, tears the process group down cleanly

    # ------------------------------------------------------------------ the loop
    @property
    def done(self) -> bool:
        s, t = self.state, self.recipe.train
        early = t.early_stop_patience and s.bad_epochs >= t.early_stop_patience
        return bool(s.step >= self.plan.total_steps or s.epoch >= t.epochs or early or self.stopped_by)

    def run(self) -> int:
        if self.recipe.train.evaluate_before_train and self.state.step == 0 and not self.recipe.probe.enabled:
            self.log_eval("val", 0, self.evaluate("val"))
        while not self.done:
            if self.train_epoch() == "stopped":
                log.warning("stopped by signal %d at step %d; saved %s. Continue with:\n  %s", self.stop.raised,
                            self.state.step, ckpt.checkpoint_dir(self.run_dir, self.state.step),
                            resume_command(self.run_dir))
                return EXIT_PREEMPTED
        return self.finish()

    def train_epoch(self) -> str | None:
        """The rest of the current epoch; returns after_step()'s verdict that ended it."""
        s = self.state
        set_train_mode(self.model, self.plan.frozen, self.recipe.model.freeze_bn)
        bar = tqdm(total=self.micro_per_epoch, initial=s.batch_in_epoch, desc=f"epoch {s.epoch}", leave=False,
                   disable=None if self.accelerator.is_local_main_process else True, dynamic_ncols=True)
        self.window = {"images": 0, "wait": 0.0, "t0": time.perf_counter(), "bar": bar}
        fetched = time.perf_counter()
        for images, labels, positions in self.epoch_loader():
            self.window["wait"] += time.perf_counter() - fetched
            self.train_step(self.train_images.model_input(images, positions), labels)
            bar.update(1)
            if self.accelerator.sync_gradients:
                verdict = self.after_step()
                if verdict != "continue":
                    bar.close()
                    return verdict
            fetched = time.perf_counter()
        raise RuntimeError(f"the train loader ended after {s.batch_in_epoch} of {self.micro_per_epoch} batches "
                           f"of epoch {s.epoch}")

    def epoch_loader(self):
        s, loader = self.state, self.train_loader
        loader.set_epoch(s.epoch)
        self.train_images.set_augment_epoch(s.epoch)  # the augmentation's epoch
        if self.recipe.data.source == "shards" and self.accelerator.is_main_process:  # who reads which shards
            lanes = "; ".join(f"process {p} reads {' '.join(map(str, lane))}"
                              for p, lane in enumerate(self.sampler.lane_shards(s.epoch)))
            log.info("epoch %d: %d train shards; %s", s.epoch, len(self.sampler.counts), lanes)
        if s.batch_in_epoch:
            loader = self.accelerator.skip_first_batches(loader, s.batch_in_epoch)
            loader.set_epoch(s.epoch)  # accelerate < 1.15 builds the skipping loader at epoch 0
        return loader

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        acc, r = self.accelerator, self.recipe
        with acc.accumulate(self.model):
            targets = labels
            if r.train.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if self.mix is not None:
                images, targets = self.mix(images, labels)
            logits = self.model(images)
            loss = F.cross_entropy(logits.float(), targets, weight=self.class_weights,
                                   label_smoothing=r.train.label_smoothing)
            self.nonfinite.observe(loss, self.state.step + 1)
            self.top1_counts[0] += (logits.argmax(1) == labels).sum()  # hard labels, also under mixup/cutmix
            self.top1_counts[1] += labels.numel()
            acc.backward(loss)
            skip = acc.sync_gradients and r.train.on_nonfinite == "skip" and self.skip_step()
            if acc.sync_gradients and r.optim.grad_clip_norm and not skip:
                acc.clip_grad_norm_(self.model.parameters(), r.optim.grad_clip_norm)
            if not skip:
                self.optimizer.step()
            if acc.sync_gradients:
                self.scheduler.step()
                if self.ema is not None and not skip:
                    self.ema.update(acc.unwrap_model(self.model))
            self.optimizer.zero_grad(set_to_none=True)
        self.state.batch_in_epoch += 1
        self.state.window_batches += 1
        self.loss_sum += loss.detach().float()
        self.window["images"] += images.shape[0] * acc.num_processes

    def after_step(self) -> str:
        """The one place that decides, after each optimizer step: log, epoch end, evaluation, checkpoint, stop.
        Returns "continue", "epoch" (epoch over), "done" (run over, or early stop) or "stopped" (signal; the
        checkpoint is saved)."""
        s, r = self.state, self.recipe
        s.step += 1
        epoch = s.epoch
        epoch_end = s.batch_in_epoch >= self.micro_per_epoch
        if s.step % r.train.log_every_steps == 0 or epoch_end:
            self.log_train(epoch_end)
        if epoch_end:
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0
        run_end = s.step >= self.plan.total_steps or s.epoch >= r.train.epochs
        every, every_epochs = r.checkpoint.every_steps, r.checkpoint.every_epochs
        due = (every and s.step % every == 0) or (epoch_end and every_epochs and (epoch + 1) % every_epochs == 0)
        # several processes agree by an all-reduce: every STOP_CHECK_STEPS steps, and wherever a save is due anyway
        ask = self.accelerator.num_processes == 1 or s.step % STOP_CHECK_STEPS == 0 or due or epoch_end or run_end
        if not run_end and ask and self.deadline.expired(self.accelerator):  # ends as the last step would
            run_end, self.stopped_by = True, "max_time"
            log.warning("train.max_time = %gs reached at step %d of %d: final validation, checkpoint and test",
                        r.train.max_time, s.step, self.plan.total_steps)
        if run_end or (epoch_end and (epoch + 1) % r.train.eval_every_epochs == 0):
            self.validate(epoch)
        stop = bool(ask) and self.stop.agreed(self.accelerator)
        if due or run_end or stop or self.done:
            self.save_checkpoint()
        if stop:
            return "stopped"
        if self.done and not run_end:
            log.info("early stop: no val improvement for %d evaluations (best epoch %d)",
                     r.train.early_stop_patience, s.best_epoch)
        return "done" if self.done else "epoch" if epoch_end else "continue"

    # ------------------------------------------------------------------ guards: non-finite loss
    def check_finite(self) -> None:
        """on_nonfinite = "stop": read the device flag where the loop syncs anyway (log, evaluation, checkpoint),
        before anything of a bad state is logged or saved."""
        if self.recipe.train.on_nonfinite == "stop" and (bad := self.nonfinite.read(self.accelerator)):
            self.raise_nonfinite(*bad)

    def skip_step(self) -> bool:
        """on_nonfinite = "skip": whether this optimizer step had a non-finite loss; if so its gradients are
        dropped. One host sync per optimizer step (the decision must precede `optimizer.step()`)."""
        s, bad = self.state, self.nonfinite.read(self.accelerator)
        if bad is None:
            s.skipped_in_a_row = 0
            return False
        s.skipped_steps, s.skipped_in_a_row = s.skipped_steps + 1, s.skipped_in_a_row + 1
        if s.skipped_in_a_row > self.recipe.train.max_skipped_steps:
            self.raise_nonfinite(*bad, in_a_row=s.skipped_in_a_row)
        log.warning("non-finite training loss (%s) at optimizer step %d: step skipped (%d in a row, %d in all)",
                    bad[1], bad[0], s.skipped_in_a_row, s.skipped_steps)
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def raise_nonfinite(self, step: int, value: float, in_a_row: int = 0) -> None:
        saved = ckpt.complete_checkpoints(self.run_dir)
        raise NonFiniteLoss(nonfinite_message(step, (step - 1) // self.plan.steps_per_epoch, value,
                                              saved[-1] if saved else None, in_a_row))

    # ------------------------------------------------------------------ logging, evaluation, saving
    def log_train(self, epoch_end: bool = False) -> None:
        self.check_finite()
        s, acc, w = self.state, self.accelerator, self.window
        loss = (self.loss_sum / max(s.window_batches, 1)).reshape(1)
        loss = (acc.reduce(loss, reduction="mean") if acc.num_processes > 1 else loss).item()
        elapsed = max(time.perf_counter() - w["t0"], 1e-9)
        values = {"epoch": s.epoch, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                  "images_per_s": w["images"] / elapsed, "data_wait_fraction": w["wait"] / elapsed}
        if self.recipe.train.on_nonfinite == "skip":
            values["skipped_steps"] = s.skipped_steps
        if epoch_end:  # over the epoch's train batches, as the model was while it trained on them
            correct, seen = (acc.reduce(self.top1_counts.clone(), reduction="sum") if acc.num_processes > 1
                             else self.top1_counts).tolist()
            values["train_top1"] = correct / max(seen, 1)
            self.top1_counts.zero_()
            log.info("epoch %d train: top1 %.4f over %d images (argmax against the hard labels)", s.epoch,
                     values["train_top1"], seen)
        self.runlog.log("train", s.step, values)
        w["bar"].set_postfix(loss=f"{loss:.4f}", img_s=f"{values['images_per_s']:.0f}")
        if w["bar"].disable:  # no terminal (batch jobs, CI): progress goes to the log instead
            log.info("epoch %d step %d: loss %.4f lr %.4g %.0f images/s", s.epoch, s.step, loss, values["lr"],
                     values["images_per_s"])
        self.loss_sum.zero_()
        s.window_batches = 0
        w.update(images=0, wait=0.0, t0=time.perf_counter())

    def evaluate(self, split: str, keep_logits: bool = False) -> dict:
        return evaluate(self.model, self.eval_loaders[split], self.accelerator, self.plan.num_classes, keep_logits)

    def log_eval(self, split: str, epoch: int, metrics: dict) -> None:
        names = self.plan.splits.class_names
        per_class = dict(zip(names, per_class_accuracy(metrics["confusion"])))
        self.runlog.log(split, self.state.step, {"epoch": epoch, **scalars(metrics), "per_class_top1": per_class})
        self.runlog.log_confusion(split, metrics["confusion"], names)
        log.info("epoch %d %s: loss %.4f top1 %.4f%s", epoch, split, metrics["loss"], metrics["top1"],
                 f" top5 {metrics['top5']:.4f}" if "top5" in metrics else "")

    def validate(self, epoch: int) -> None:
        """Validate, then keep model/last and, when it improved, model/best."""
        self.check_finite()
        self.select(epoch, self.evaluate("val"))

    def select(self, epoch: int, val: dict) -> None:
        """Log val's result, then keep model/last and, when it improved, model/best."""
        s, key = self.state, self.recipe.checkpoint.select_metric
        self.log_eval("val", epoch, val)
        if self.ema is not None:
            val_ema = evaluate(self.ema.module, self.eval_loaders["val"], self.accelerator, self.plan.num_classes)
            self.log_eval("val_ema", epoch, val_ema)
            val = val_ema if self.recipe.checkpoint.select_ema else val
        self.runlog.draw_plots()
        is_best = s.best_metric is None or (val[key] < s.best_metric if key == "loss" else val[key] > s.best_metric)
        if is_best:
            s.best_metric, s.best_epoch, s.best_step, s.bad_epochs = val[key], epoch, s.step, 0
        else:
            s.bad_epochs += 1
        self.save_models({"epoch": epoch, "step": s.step, "val": scalars(val)}, is_best)

    def save_models(self, extra: dict, is_best: bool) -> None:
        # collective: under FSDP every rank takes part in gathering the full state dict
        tensors = self.accelerator.get_state_dict(self.model)
        if not self.accelerator.is_main_process:
            return
        config = artifact_config(self.recipe, self.plan, extra)
        model = self.accelerator.unwrap_model(self.model)
        ema_best = self.ema is not None and self.recipe.checkpoint.select_ema  # model/last keeps the trained weights
        for kind in ("last", "best") if is_best else ("last",):
            chosen = self.ema.module.state_dict() if kind == "best" and ema_best else tensors
            save_artifact(self.run_dir / "model" / kind, model, config, recipe_to_toml(self.recipe),
                               state_dict=chosen)

    def save_checkpoint(self) -> None:
        if self.state.step == self.saved_step:
            return
        self.check_finite()  # a bad state is never saved: the newest checkpoint stays the last good one
        self.state.log_rows = self.runlog.rows
        self.state.epoch_top1 = self.accelerator.gather(self.top1_counts.reshape(1, 2)).tolist()
        # collective, as every save: each process has its own sum, and the next log is their mean
        self.state.window_losses = self.accelerator.gather(self.loss_sum.reshape(1)).tolist()
        ckpt.save_checkpoint(self.accelerator, self.run_dir, self.state, self.recipe.checkpoint.keep_last,
                             self.scheduler, self.ema)
        self.saved_step = self.state.step

    def finish(self) -> int:
        """Test once, on the best model; calibrate it; export it if the recipe asks; write results.json."""
        acc, r, s = self.accelerator, self.recipe, self.state
        acc.wait_for_everyone()
        best_dir = self.run_dir / "model" / "best"
        best = load_file(str(best_dir / "model.safetensors"))  # every rank loads it: all test the same model
        acc.unwrap_model(self.model).load_state_dict(best)
        results = {"name": r.name, "run_dir": str(self.run_dir), "best_epoch": s.best_epoch,
                   "best_step": s.best_step, "steps": s.step,
                   "select_metric": r.checkpoint.select_metric,
                   "stopped_by": self.stopped_by or ("early_stop" if s.step < self.plan.total_steps
                                                     and s.epoch < r.train.epochs else "")}
        if r.train.on_nonfinite == "skip":
            results["skipped_steps"] = s.skipped_steps
        val = self.evaluate("val", keep_logits=r.train.calibrate)
        results["val"] = scalars(val)
        if r.train.calibrate and acc.is_main_process:  # T goes into model/best/config.json
            results["calibration"] = calibrate_artifact(val["logits"], val["labels"], best_dir)
        if "test" in self.eval_loaders:
            test = self.evaluate("test")
            self.log_eval("test", s.best_epoch, test)
            results["test"] = scalars(test)
            if r.train.test_tta:
                test = evaluate(self.model, self.eval_loaders["test"], acc, self.plan.num_classes, flip_tta=True)
                self.log_eval("test_tta", s.best_epoch, test)
                results["test_tta"] = scalars(test)
        self.runlog.final_report(acc.unwrap_model(self.model), self.eval_loaders["val"].dataset, s.step)
        if r.export.formats and acc.is_main_process:  # with its parity check, as imgcls-export does
            from imgcls.inference.export import main as export_main

            results["export"] = {"passed": export_main([str(best_dir)]) == 0,
                                 "report": str(best_dir / "export" / "export_report.json")}
        if acc.is_main_process:
            write_json(self.run_dir / "results.json", results)
        log.info("results: val top1 %.4f%s%s -> %s", results["val"]["top1"],
                 f", test top1 {results['test']['top1']:.4f}" if "test" in results else "",
                 f", test_tta top1 {results['test_tta']['top1']:.4f}" if "test_tta" in results else "",
                 self.run_dir / "results.json")
        return 0


def speed_and_ema(model: torch.nn.Module, train: TrainConfig, device: torch.device
                  ) -> tuple[torch.nn.Module, WeightEma | None]:
    """train.channels_last and train.compile applied to the model; its EMA copy is taken before compiling."""
    if train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = WeightEma(model, train.ema_decay, train.ema_warmup_steps) if train.ema_decay else None
    if ema is not None:
        ema.module.to(device)
    if train.compile:
        if device.type == "cpu" and not any(map(shutil.which, (os.environ.get("CXX", "g++"), "c++", "clang++"))):
            raise RecipeError("train.compile = true: torch.compile on the CPU generates C++ and needs a compiler "
                              "(g++ or clang++ on PATH, or CXX=<compiler>); none was found. Install one, or set "
                              "train.compile = false")
        model.compile()  # in place: parameter names, state_dict and artifacts stay those of the plain model
    return model, ema


def artifact_config(recipe: Recipe, plan: Plan, extra: dict) -> dict:
    return {"model": {"name": recipe.model.name, "args": dict(recipe.model.args),
                      "num_classes": plan.num_classes, "in_channels": recipe.data.channels},
            "class_names": plan.splits.class_names,
            "preprocess": Preprocess.from_data(recipe.data).to_dict(), "temperature": 1.0, **extra}


def train(recipe: Recipe, resume: str = "", dry_run: bool = False) -> int:
    accelerator = create_accelerator(recipe.train, recipe.seed)  # trackers are started by RunLog, one by one
    setup_logging(accelerator)
    if note := apply_cpu_threads(accelerator.device, recipe.train.cpu_threads):
        log.info(note)
    check_gpu_decode(recipe.data, accelerator.device)
    set_seed(recipe.seed)
    plan = make_plan(recipe, accelerator.num_processes)
    recipe = plan.recipe  # with the pretrained weights' own preprocessing where the recipe left it unset
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
    if warning := bf16_cpu_warning(accelerator):
        log.warning(warning)
    trainer = Trainer(recipe, accelerator, plan, run_dir, source)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        trainer.cleanup()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="imgcls-train", description=__doc__.split("\n\n")[0])
    p.add_argument("words", nargs="*", metavar="[RECIPE] [section.key=value ...]",
                   help="recipe TOML file (optional with --resume RUN), then overrides read as TOML, "
                        "e.g. train.epochs=3")
    p.add_argument("--resume", default="", help="a run folder or checkpoint (without a RECIPE, the run's own "
                                                "recipe.toml is used; with one, it is checked against the run), or "
                                                "'auto' (newest complete checkpoint of the RECIPE's runs)")
    p.add_argument("--dry-run", action="store_true", help="build data and model, print the plan, train nothing")
    args = p.parse_intermixed_args(argv)
    first = args.words[0] if args.words else ""
    is_recipe = bool(first) and ("=" not in first or Path(first).is_file())
    args.recipe, args.overrides = (first, args.words[1:]) if is_recipe else ("", args.words)
    if not args.recipe and (not args.resume or args.resume == "auto"):
        p.error("a recipe file is needed (only --resume RUN_FOLDER can do without one: it uses the run's recipe)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_run_recipe(args.recipe, args.overrides, args.resume)
        return train(recipe, resume=args.resume, dry_run=args.dry_run)
    except (RecipeError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (PreflightError, ShardError, NonFiniteLoss, ckpt.CheckpointError) as e:  # the environment or the run, not the recipe
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the loop's own handler is installed: nothing was trained or saved
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
