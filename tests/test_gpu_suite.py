"""benchmarks/gpu_suite.py's pieces that run anywhere: the photo folder it makes, a step over its budget, the
junit counts it reports. (The whole suite runs in CI as `python benchmarks/gpu_suite.py --smoke`.)"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_suite import junit_counts, run  # noqa: E402
from gpu_suite_data import hub_layout, photo_folder  # noqa: E402


def test_the_photo_folder_puts_one_in_ten_of_every_class_in_val_at_the_asked_size(tmp_path):
    hub = hub_layout(tmp_path / "hub", 32, 3, "img", {"train": 100})  # labels 0..9 in turn
    out = photo_folder(sorted((hub / "data").glob("*.parquet")), tmp_path / "photos", 100, 48)
    per_split = Counter((p.parts[-3], p.parts[-2]) for p in out.rglob("*.jpg"))
    assert per_split == {**{("val", f"c{k}"): 1 for k in range(10)}, **{("train", f"c{k}"): 9 for k in range(10)}}
    with Image.open(next(out.rglob("*.jpg"))) as im:
        assert (im.format, im.size) == ("JPEG", (48, 48))


def test_a_step_over_its_budget_is_killed_with_its_children_and_recorded(tmp_path):
    # the child starts a grandchild (as a DataLoader worker or torchrun's worker) that a kill of the child alone
    # would leave running
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    result = run("sleepy", [sys.executable, "-c", script], 3.0, tmp_path, env=dict(os.environ))
    assert (result["status"], result["returncode"]) == ("over budget", -9)
    assert 3.0 <= result["seconds"] < 10
    assert Path(result["log"]).read_text() == "started\n"
    grandchild = int(pid_file.read_text())
    for _ in range(100):  # killed; gone once reaped by whoever inherited it
        if not Path(f"/proc/{grandchild}").exists() or "State:\tZ" in Path(f"/proc/{grandchild}/status").read_text():
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the grandchild {grandchild} still runs")


def test_junit_counts_read_pytests_xml(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite name="pytest" errors="1" failures="2" skipped="3" tests="10">'
                   '</testsuite></testsuites>')
    assert junit_counts(xml) == {"tests": 10, "failed_tests": 3, "skipped_tests": 3, "passed_tests": 4}
    assert junit_counts(tmp_path / "missing.xml") == {}
