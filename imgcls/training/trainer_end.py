"""The end of a run: val and test on the best model (and test with flip TTA), the temperature fit, the final
report and plots, the export with its parity check, and results.json. A mixin of `imgcls.training.trainer.Trainer`."""
from __future__ import annotations

from accelerate.logging import get_logger
from safetensors.torch import load_file

from imgcls.training.calibration import calibrate_artifact
from imgcls.training.metrics import evaluate, scalars
from imgcls.training.runinfo import write_json

log = get_logger("imgcls.train")


class EndOfRun:
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
