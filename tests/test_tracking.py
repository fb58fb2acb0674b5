"""Tracking: what W&B (offline run files) and TensorBoard (event files) hold equals metrics.jsonl; a killed and
resumed run continues one W&B run and one TensorBoard log with increasing steps; a missing login or package,
or a tracker that breaks mid-run, never stops training."""
from __future__ import annotations

import json
import logging
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import write_class_folders, write_recipe
from helpers import (metrics_rows, only_run, run_train, subprocess_env, train_cmd, train_inprocess,
                     wait_for_checkpoint)
from imgcls.training.checkpoint import complete_checkpoints
from imgcls.recipe import load_recipe
from imgcls.tracking.runlog import RunLog, available_backends
from imgcls.tracking.wandb_reader import BLOCK, find_run_files, iter_payloads, read_run
from imgcls.errors import CorruptLog

TRACKING = '[tracking]\nbackends = ["wandb", "tensorboard"]\nupload_model = true\nmode = "offline"'


def _isolate_wandb(mp: pytest.MonkeyPatch, tmp: Path) -> None:
    """Offline, and nothing written to the user's wandb config, cache or netrc."""
    mp.setenv("WANDB_MODE", "offline")
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")):
        mp.setenv(var, str(tmp / "wandb_home" / sub))
    mp.setenv("NETRC", str(tmp / "netrc"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.delenv("WANDB_API_KEY", raising=False)
    mp.delenv("WANDB_SERVICE", raising=False)  # else subprocesses share this process's wandb-core, and its streams
    mp.setenv("WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL", "0.2")  # default 15 s: a killed run would leave no records
    (tmp / "netrc").touch()


def _image_folder(root: Path) -> Path:
    for split, n, seed in (("train", 40, 0), ("val", 10, 1), ("test", 10, 2)):
        write_class_folders(root / split, ["a", "b", "c", "d"], n, seed=seed)
    return root


def _tiny(tmp: Path, extra: str = "") -> Path:
    data = f'source = "folder"\nroot = "{_image_folder(tmp / "imgs")}"'
    return write_recipe(tmp / "tiny.toml", data, f"{extra}\n{TRACKING}")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Path:
    """One short run with both trackers, shared by the read-back tests: val at step 0 and 8, train every 2."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    tmp = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        _isolate_wandb(mp, tmp)
        recipe = _tiny(tmp)
        code = train_inprocess(recipe, "train.max_steps=8", "train.log_every_steps=2",
                               "train.evaluate_before_train=true")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    assert code == 0
    return only_run(tmp / "runs")


def _rows(run: Path, event: str) -> list[dict]:
    return [r for r in metrics_rows(run) if r["event"] == event]


def test_wandb_offline_run_holds_the_resolved_recipe_and_the_metrics(tracked):
    files = find_run_files(tracked)
    assert len(files) == 1
    run = read_run(files[0])
    saved = json.loads((complete_checkpoints(tracked)[-1] / "train_state.json").read_text())
    assert run.id == saved["tracker_ids"]["wandb"]
    assert {k: v for k, v in run.config.items() if k != "_wandb"} == \
        load_recipe(tracked / "recipe.toml").model_dump(mode="json")

    val, train, test = _rows(tracked, "val"), _rows(tracked, "train"), _rows(tracked, "test")
    assert [s for s, _ in run.series("val/top1")] == [0, 8]
    assert run.series("val/top1") == [(r["step"], r["top1"]) for r in val]
    assert run.series("val/per_class_top1/c") == [(r["step"], r["per_class_top1"]["c"]) for r in val]
    assert run.series("train/loss") == [(r["step"], r["loss"]) for r in train]
    assert run.series("test/top1") == [(8, test[0]["top1"])]
    assert run.steps == sorted(set(run.steps))

    final = run.history[-1]
    assert final["test/confusion_matrix_image"]["_type"] == "image-file"
    assert final["val/misclassified"]["_type"] == "table-file" and final["val/misclassified"]["ncols"] == 4
    model = [a for a in run.artifacts if a["type"] == "model"]
    assert model == [{"name": "tiny-model", "type": "model", "aliases": ["best", "latest"],
                      "files": ["config.json", "model.safetensors", "recipe.toml"]}]


def test_tensorboard_events_hold_each_scalar_series(tracked):
    events = EventAccumulator(str(tracked / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in tags["scalars"]}
    assert steps["train/loss"] == steps["train/lr"] == [2, 4, 6, 8]
    assert steps["train/images_per_s"] == [2, 4, 6, 8]
    assert steps["val/top1"] == steps["val/loss"] == steps["val/per_class_top1/a"] == [0, 8]
    assert steps["test/top1"] == [8]
    assert [e.value for e in events.Scalars("val/top1")] == pytest.approx([r["top1"] for r in _rows(tracked, "val")])
    assert {"test/confusion_matrix", "val/misclassified"} <= set(tags["images"])
    assert "recipe/text_summary" in tags["tensors"]


@pytest.mark.slow
def test_sigkill_and_resume_continue_one_wandb_run_and_one_tensorboard_log(tmp_path, monkeypatch):
    _isolate_wandb(monkeypatch, tmp_path)
    recipe = _tiny(tmp_path, "every_steps = 4\nkeep_last = 5")
    args = ("train.epochs=2", "train.log_every_steps=2", "tracking.plots=false")
    proc = subprocess.Popen(train_cmd(recipe, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(), cwd=tmp_path)
    wait_for_checkpoint(tmp_path / "runs", 12, proc)  # mid-epoch 1 (steps 11-20)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = only_run(tmp_path / "runs")
    assert not (run_dir / "results.json").exists(), "the kill must land before the end"
    resumed_at = int(complete_checkpoints(run_dir)[-1].name.split("-")[1])

    done = run_train(recipe, *args, "--resume", "auto")
    assert done.returncode == 0, done.stderr
    assert only_run(tmp_path / "runs") == run_dir
    files = find_run_files(run_dir)
    attempts = [read_run(f) for f in files]
    assert len(attempts) == 2
    saved = json.loads((complete_checkpoints(run_dir)[-1] / "train_state.json").read_text())
    assert {a.id for a in attempts} == {saved["tracker_ids"]["wandb"]}
    assert {f.name for f in files} == {f"run-{saved['tracker_ids']['wandb']}.wandb"}
    for attempt in attempts:
        assert attempt.steps and all(a < b for a, b in zip(attempt.steps, attempt.steps[1:]))
    first, second = attempts
    train = _rows(run_dir, "train")
    jsonl = [(r["step"], r["loss"]) for r in train]
    # the killed attempt holds what W&B flushed before the kill; the resumed one re-sent the log up to the
    # checkpoint and went on, so on its own it equals metrics.jsonl (exact resume: the same numbers)
    assert set(first.series("train/loss")) <= set(jsonl) and any(s > resumed_at for s in second.steps)
    assert second.series("train/loss") == jsonl
    assert second.series("val/top1") == [(r["step"], r["top1"]) for r in _rows(run_dir, "val")]

    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in loss] == [s for s, _ in jsonl] == list(range(2, 21, 2))
    assert [v for _, v in loss] == pytest.approx([v for _, v in jsonl])


def test_online_without_login_says_how_to_fix_it_and_keeps_the_other_tracker(tmp_path, monkeypatch, caplog):
    from accelerate import Accelerator

    _isolate_wandb(monkeypatch, tmp_path)
    monkeypatch.delenv("WANDB_MODE")
    recipe = load_recipe(_tiny(tmp_path), ['tracking.mode="online"'])
    accelerator = Accelerator()
    accelerator.project_configuration.logging_dir = str(tmp_path / "run" / "tensorboard")
    runlog = RunLog(accelerator, recipe, tmp_path / "run")
    (tmp_path / "run").mkdir()
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="imgcls.tracking.runlog"):
        runlog.start_trackers({})
    assert time.monotonic() - started < 20  # no prompt, no network wait
    assert runlog.trackers == ["tensorboard"] and runlog.run_ids() == {}
    assert "not logged in" in caplog.text and "`wandb login`" in caplog.text
    assert 'tracking.mode = "offline"' in caplog.text and "wandb sync" in caplog.text
    runlog.log("train", 1, {"loss": 0.5})
    runlog.close()
    assert metrics_rows(tmp_path / "run")[0]["loss"] == 0.5


def test_missing_tracker_package_is_named_with_the_install_command(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    assert available_backends(["wandb", "tensorboard"]) == ["tensorboard"]
    assert "pip install 'imgcls[tracking]'" in caplog.text and "'wandb'" in caplog.text


class _Tracker:
    def __init__(self, name: str, broken: bool = False):
        self.name, self.broken, self.logged, self.commits = name, broken, [], []

    def log(self, values, step=None, **kwargs):
        if self.broken:
            raise ConnectionError("server went away")
        self.logged.append((step, dict(values)))
        self.commits.append(kwargs.get("commit"))

    def finish(self):
        pass


def test_a_tracker_that_fails_mid_run_is_dropped_and_logging_goes_on(tmp_path, image_folder, caplog):
    recipe = load_recipe(write_recipe(tmp_path / "tiny.toml", f'source = "folder"\nroot = "{image_folder}"'))
    broken, good = _Tracker("wandb", broken=True), _Tracker("tensorboard")
    runlog = RunLog(SimpleNamespace(is_main_process=True, trackers=[broken, good]), recipe, tmp_path)
    runlog.trackers = ["wandb", "tensorboard"]
    runlog.log("val", 10, {"top1": 0.5, "per_class_top1": {"a": 1.0, "b": 0.0}})
    runlog.log("val", 20, {"top1": 0.75})
    assert runlog.trackers == ["tensorboard"]
    assert "the wandb tracker failed while logging (ConnectionError: server went away)" in caplog.text
    assert good.logged == [(10, {"val/top1": 0.5, "val/per_class_top1/a": 1.0, "val/per_class_top1/b": 0.0}),
                           (20, {"val/top1": 0.75})]
    assert [r["step"] for r in metrics_rows(tmp_path)] == [10, 20]


def test_wandb_gets_one_committed_row_per_step_and_tensorboard_each_event(tmp_path, image_folder):
    """W&B: the events of a step are merged here and sent once, with commit=True, when the step changes or at
    close (wandb would otherwise hold the last step open until the run's exit, and drop a step's later events
    once anything committed it). TensorBoard: every event as it comes, as before."""
    recipe = load_recipe(write_recipe(tmp_path / "tiny.toml", f'source = "folder"\nroot = "{image_folder}"'))
    wandb, board = _Tracker("wandb"), _Tracker("tensorboard")
    runlog = RunLog(SimpleNamespace(is_main_process=True, trackers=[wandb, board]), recipe, tmp_path)
    runlog.trackers = ["wandb", "tensorboard"]
    runlog.log("val", 0, {"top1": 0.25})
    runlog.log("train", 2, {"loss": 2.0})
    runlog.log("train", 8, {"loss": 1.0})
    assert wandb.logged == [(0, {"val/top1": 0.25}), (2, {"train/loss": 2.0})] and wandb.commits == [True, True]
    runlog.log("val", 8, {"top1": 0.5, "per_class_top1": {"a": 1.0}})
    runlog.log("test", 8, {"top1": 0.75})
    assert len(wandb.logged) == 2  # step 8 is still open
    runlog.close()
    assert wandb.logged[2:] == [(8, {"train/loss": 1.0, "val/top1": 0.5, "val/per_class_top1/a": 1.0,
                                     "test/top1": 0.75})] and wandb.commits == [True, True, True]
    assert board.logged == [(0, {"val/top1": 0.25}), (2, {"train/loss": 2.0}), (8, {"train/loss": 1.0}),
                            (8, {"val/top1": 0.5, "val/per_class_top1/a": 1.0}), (8, {"test/top1": 0.75})]
    assert board.commits == [None] * 5
    assert [r["step"] for r in metrics_rows(tmp_path)] == [0, 2, 8, 8, 8]


def _history_at(run_dir: Path, step: int) -> list[dict]:
    files = find_run_files(run_dir)
    return [row for row in read_run(files[0]).history if row.get("_step") == step] if files else []


def test_the_last_steps_wandb_row_is_written_with_the_final_report_not_at_exit(tmp_path, monkeypatch):
    """The final step's metrics and report reach the offline run file while the run is still open: they do not
    depend on wandb closing the step at the run's exit."""
    import torch
    from accelerate import Accelerator

    _isolate_wandb(monkeypatch, tmp_path)  # the run file is flushed every 0.2 s
    recipe = load_recipe(_tiny(tmp_path), ['tracking.backends=["wandb"]', "tracking.upload_model=false",
                                           "tracking.plots=false"])
    runlog = RunLog(Accelerator(), recipe, tmp_path / "run")
    (tmp_path / "run").mkdir()
    runlog.start_trackers({})
    assert runlog.trackers == ["wandb"]
    try:
        runlog.log("val", 0, {"top1": 0.25})
        runlog.log("train", 3, {"loss": 1.5})
        runlog.log("val", 3, {"top1": 0.5})
        runlog.log("test", 3, {"top1": 0.75})
        runlog.log_confusion("test", torch.tensor([[1, 1], [0, 2]]), ["a", "b"])
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16, 2))
        images = [(torch.rand(1, 16, 16), k % 2) for k in range(8)]
        runlog.final_report(model, images, 3)
        deadline = time.monotonic() + 20
        while not _history_at(tmp_path / "run", 3) and time.monotonic() < deadline:
            time.sleep(0.1)
        open_run = _history_at(tmp_path / "run", 3)
    finally:
        runlog.close()
    assert len(open_run) == 1, "the step-3 row was not in the run file before the run's exit"
    for rows in (open_run, _history_at(tmp_path / "run", 3)):
        assert len(rows) == 1
        row = rows[0]
        assert (row["train/loss"], row["val/top1"], row["test/top1"]) == (1.5, 0.5, 0.75)
        assert row["test/confusion_matrix_image"]["_type"] == "image-file"


def test_a_failing_wandb_final_report_keeps_the_last_steps_metrics_and_ends_the_run(tmp_path, monkeypatch,
                                                                                     caplog):
    """The final report's media failing (here wandb.Image) costs the images, not the last step's metrics: W&B
    stays tracked, the step's row is committed and the run is finished, so the run file holds the final step."""
    import torch
    import wandb
    from accelerate import Accelerator

    _isolate_wandb(monkeypatch, tmp_path)
    recipe = load_recipe(_tiny(tmp_path), ['tracking.backends=["wandb"]', "tracking.upload_model=false",
                                           "tracking.plots=false"])
    runlog = RunLog(Accelerator(), recipe, tmp_path / "run")
    (tmp_path / "run").mkdir()
    runlog.start_trackers({})
    try:
        runlog.log("val", 0, {"top1": 0.25})
        runlog.log("val", 5, {"top1": 0.5})
        runlog.log("test", 5, {"top1": 0.75})
        runlog.log_confusion("test", torch.tensor([[1, 1], [0, 2]]), ["a", "b"])

        def broken_image(*args, **kwargs):
            raise OSError("no space left on device")

        monkeypatch.setattr(wandb, "Image", broken_image)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16, 2))
        with caplog.at_level(logging.ERROR, logger="imgcls.tracking.runlog"):
            runlog.final_report(model, [(torch.rand(1, 16, 16), k % 2) for k in range(8)], 5)
        assert runlog.trackers == ["wandb"]
        assert "could not send the final report to W&B (OSError: no space left on device)" in caplog.text
    finally:
        runlog.close()
        if wandb.run is not None:  # a dropped tracker is never finished: do not leave its run to later tests
            wandb.run.finish()
    history = read_run(find_run_files(tmp_path / "run")[0]).history
    assert [(row["_step"], row.get("val/top1"), row.get("test/top1")) for row in history] == \
        [(0, 0.25, None), (5, 0.5, 0.75)]


def test_close_returns_once_wandb_core_has_written_the_whole_run_file(tmp_path, monkeypatch):
    """The CI flake: `wandb.finish()` returns before wandb-core has written the run file's tail, which it does
    when it handles the SDK's inform_finish message (sent without waiting). Here that message reaches
    wandb-core 1.5 s late and no timer flushes the file: close() must still return only once the file holds
    the whole run, the last step included."""
    import threading

    from accelerate import Accelerator
    from wandb.sdk.lib.service.service_connection import ServiceConnection

    _isolate_wandb(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL", "600")
    inform_finish = ServiceConnection.inform_finish
    monkeypatch.setattr(ServiceConnection, "inform_finish",
                        lambda self, run_id: threading.Timer(1.5, inform_finish, (self, run_id)).start())
    recipe = load_recipe(_tiny(tmp_path), ['tracking.backends=["wandb"]', "tracking.plots=false"])
    runlog = RunLog(Accelerator(), recipe, tmp_path / "run")
    (tmp_path / "run").mkdir()
    runlog.start_trackers({})
    runlog.log("val", 0, {"top1": 0.25})
    runlog.log("train", 2, {"loss": 1.5})
    runlog.log("val", 2, {"top1": 0.5})
    runlog.close()
    run = read_run(find_run_files(tmp_path / "run")[0])
    assert run.series("val/top1") == [(0, 0.25), (2, 0.5)] and run.series("train/loss") == [(2, 1.5)]


def _write_log(path: Path, payloads: list[bytes]) -> None:
    """LevelDB log format as wandb writes it, to test the reader on records that span blocks."""
    out = bytearray(struct.pack("<4sHB", b":W&B", 0xBEE1, 0))
    for payload in payloads:
        first = True
        while True:
            room = BLOCK - len(out) % BLOCK
            if room < 7:
                out += b"\0" * room
                continue
            piece, payload = payload[:room - 7], payload[room - 7:]
            kind = (1 if not payload else 2) if first else (4 if not payload else 3)
            out += struct.pack("<IHB", zlib.crc32(bytes([kind]) + piece), len(piece), kind) + piece
            first = False
            if not payload:
                break
    path.write_bytes(bytes(out))


def test_reader_reassembles_records_across_blocks_and_checks_crc(tmp_path, caplog):
    big = bytes(range(256)) * 300  # 76.8 kB: FIRST, MIDDLE, LAST over three blocks
    used = (7 + (7 + 10) + (3 * 7 + len(big))) % BLOCK  # file header, small record, big record
    fill = b"z" * (BLOCK - used - 7 - 3)  # leaves 3 bytes in its block: padding, too short for a header
    payloads = [b"a" * 10, big, fill, b"end"]
    path = tmp_path / "run-x.wandb"
    _write_log(path, payloads)
    assert path.stat().st_size == 3 * BLOCK + 7 + 3
    assert list(iter_payloads(path)) == payloads
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[:-2]))  # the writer was killed mid-record
    assert list(iter_payloads(path)) == payloads[:-1] and "cut off" in caplog.text
    data[BLOCK + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptLog, match="checksum mismatch"):
        list(iter_payloads(path))
    path.write_bytes(b"not a wandb file")
    with pytest.raises(CorruptLog, match="not a W&B run file"):
        list(iter_payloads(path))
