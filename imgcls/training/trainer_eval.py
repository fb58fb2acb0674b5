"""The Trainer's logging, evaluation, model selection and saving: the train row of `metrics.jsonl`, val (and
val_ema) results, model/last and model/best, and the resume checkpoint. A mixin of `imgcls.training.trainer.Trainer`,
whose attributes (state, recipe, accelerator, plan, model, ema, runlog, ...) it uses."""
from __future__ import annotations

import time

from accelerate.logging import get_logger

from imgcls.data.transforms import Preprocess
from imgcls.inference.artifact import save_artifact
from imgcls.recipe import Recipe, recipe_to_toml
from imgcls.training import checkpoint as ckpt
from imgcls.training.metrics import evaluate, per_class_accuracy, scalars
from imgcls.training.plan import Plan

log = get_logger("imgcls.train")


class EvalAndSave:
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
            with self.accelerator.autocast():  # the average is not prepared: give it the run's precision, as val
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


def artifact_config(recipe: Recipe, plan: Plan, extra: dict) -> dict:
    return {"model": {"name": recipe.model.name, "args": dict(recipe.model.args),
                      "num_classes": plan.num_classes, "in_channels": recipe.data.channels},
            "class_names": plan.splits.class_names,
            "preprocess": Preprocess.from_data(recipe.data).to_dict(), "temperature": 1.0, **extra}
