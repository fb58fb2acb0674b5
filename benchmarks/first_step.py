"""Time from the command's start to the first training step, as a user runs it, for each cache mode.

    python benchmarks/first_step.py recipes/imagefolder_resnet18.toml data.root=/tmp/cifar10_folder \
        data.image_size=[32,32] data.crop_pct=1.0 [more overrides]

Runs `python -m imgcls.train RECIPE ... train.log_every_steps=1` and watches the run's metrics.jsonl for its first
`train` row (written after optimizer step 1), then stops the run. Cases, in this order: cache "none"; cache
"disk" with an empty cache folder (it fills the store); cache "disk" again (the store and the folder index are
reused). Python's start and imports are included: the number is what the user waits.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def first_step_seconds(recipe: str, overrides: list[str], out: Path, env_cache: Path, limit: float = 900) -> float:
    cmd = [sys.executable, "-m", "imgcls.train", recipe, *overrides, "train.log_every_steps=1", "name=first_step",
           f"checkpoint.output_dir={out}", f"data.cache_dir={env_cache}"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < limit:
            for metrics in out.glob("first_step/*/metrics.jsonl"):
                rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
                if any(r["event"] == "train" for r in rows):
                    return time.perf_counter() - start
            if proc.poll() is not None:
                raise RuntimeError(f"the run ended (exit {proc.returncode}) before its first step: {' '.join(cmd)}")
            time.sleep(0.05)
        raise RuntimeError(f"no first step within {limit} s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def main(argv: list[str]) -> int:
    recipe, overrides = argv[0], argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cases = [("cache none", ["data.cache=none"]), ("cache disk, first run (fills)", ["data.cache=disk"]),
                 ("cache disk, second run", ["data.cache=disk"])]
        for k, (name, extra) in enumerate(cases):
            seconds = first_step_seconds(recipe, [*overrides, *extra], Path(tmp) / f"runs{k}", cache)
            print(f"{name}: first training step {seconds:.1f} s after the command started", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
