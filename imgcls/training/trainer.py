"""The Trainer: one run of a recipe. `setup()` builds data, model, optimizer and trackers onto it, `run()` is the
loop, read top to bottom, and `cleanup()` closes what setup opened. After every optimizer step `after_step()`
decides, in this order: log, epoch end, evaluation (best/last artifacts), checkpoint, stop. Its other parts:
`trainer_eval.EvalAndSave` (logging, evaluation, model selection, saving), `trainer_end.EndOfRun` (test, calibration,
export, results.json), `guards.NonFiniteSteps` (`train.on_nonfinite`), `speed.speed_and_ema`.

    return train(recipe, resume="auto")     # what `python -m imgcls.train RECIPE --resume auto` runs
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from imgcls.data.gpu_decode import check_gpu_decode
from imgcls.data.imbalance import class_weights, describe_weights, split_labels
from imgcls.data.loaders import make_datasets, make_loader, train_sampler
from imgcls.data.shard_order import ShardOrderSampler
from imgcls.data.transforms import batch_mix
from imgcls.exitcodes import EXIT_PREEMPTED
from imgcls.models.weights import set_train_mode
from imgcls.recipe import Recipe, recipe_to_toml
from imgcls.tracking.runlog import RunLog
from imgcls.training import checkpoint as ckpt
from imgcls.training.distributed import apply_cpu_threads, bf16_cpu_warning, create_accelerator, local_main_first
from imgcls.training.guards import Deadline, NonFiniteGuard, NonFiniteSteps
from imgcls.training.optim import build_optimizer, build_scheduler
from imgcls.training.plan import Plan, make_plan
from imgcls.training.probe import probe_stage
from imgcls.training.runinfo import setup_logging, setup_run, write_run_files
from imgcls.training.signals import StopSignal, resume_command
from imgcls.training.speed import speed_and_ema
from imgcls.training.trainer_end import EndOfRun
from imgcls.training.trainer_eval import EvalAndSave

log = get_logger("imgcls.train")  # the name users see in the log since the first release
STOP_CHECK_STEPS = 10  # with several processes, a stop signal is acted on within this many optimizer steps


class Trainer(EvalAndSave, EndOfRun, NonFiniteSteps):
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
        if isinstance(self.sampler, ShardOrderSampler):  # on another process count: the saved global position
            self.sampler.resume_from(self.state.epoch, self.state.world_size, self.state.batch_in_epoch)
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


def plan_run(recipe: Recipe):
    """The accelerator and the plan (data checked, model built, batches sized): what a run starts from."""
    accelerator = create_accelerator(recipe.train, recipe.seed)  # trackers are started by RunLog, one by one
    setup_logging(accelerator)
    if note := apply_cpu_threads(accelerator.device, recipe.train.cpu_threads):
        log.info(note)
    check_gpu_decode(recipe.data, accelerator.device)
    set_seed(recipe.seed)
    return accelerator, local_main_first(accelerator, lambda: make_plan(recipe, accelerator.num_processes))


def plan_text(recipe: Recipe) -> str | None:
    """`--dry-run`: the resolved recipe and the plan, as text; None on every process but the main one."""
    accelerator, plan = plan_run(recipe)
    if not accelerator.is_main_process:
        return None
    return f"{recipe_to_toml(plan.recipe)}\n{plan.summary(plan.recipe, accelerator.num_processes)}"


def train(recipe: Recipe, resume: str = "") -> int:
    accelerator, plan = plan_run(recipe)
    recipe = plan.recipe  # with the pretrained weights' own preprocessing where the recipe left it unset
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
