"""Training on shards (data.source = "shards"): the same run as on the folder the shards were written from, an
exact resume after SIGKILL, and processes that read disjoint runs of shards."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_recipe
from helpers import (assert_same_run, kill_mid_epoch_then_resume, assert_same_weights, only_run, stable_rows,
                     train_inprocess, weights)
from imgcls.data.tools.cli import main as data_main
from test_distributed import cpu_env, free_port

pytestmark = pytest.mark.slow


def write_shards(image_folder: Path, out: Path, *extra: str) -> Path:
    """The fixture's 160 / 40 / 40 images as shards of 20 images: 8 train shards."""
    assert data_main(["shard", str(image_folder), str(out), "--image-size", "16", "16", "--channels", "1",
                      "--shard-size", "20", *extra]) == 0
    return out


def recipe(tmp_path: Path, data: str, runs: str, shuffle: bool = True) -> Path:
    # augmentation and dropout on, so RNG state, data order and sample positions all matter
    r = write_recipe(tmp_path / f"{runs}.toml", f"{data}\nshuffle = {str(shuffle).lower()}",
                     "every_steps = 3\nkeep_last = 3", output_dir=tmp_path / runs,
                     augment="crop_padding = 2\nhflip = 0.5")
    r.write_text(r.read_text().replace("dropout = 0.0", "dropout = 0.2"))
    return r


def test_a_run_on_shards_in_source_order_equals_the_run_on_the_folder(tmp_path, image_folder):
    """Unshuffled, shards written in the source's order are read in the folder loader's order, and each image is
    the same bytes at the same position: the same pixels, augmentation, metrics and weights."""
    shards = write_shards(image_folder, tmp_path / "shards", "--order", "source")
    assert train_inprocess(recipe(tmp_path, f'source = "folder"\nroot = "{image_folder}"', "folder", False)) == 0
    assert train_inprocess(recipe(tmp_path, f'source = "shards"\nroot = "{shards}"', "sharded", False)) == 0
    a, b = only_run(tmp_path / "folder"), only_run(tmp_path / "sharded")
    assert stable_rows(a) == stable_rows(b)
    assert_same_weights(weights(a / "model" / "best"), weights(b / "model" / "best"))


def test_sigkill_on_shards_then_resume_auto_is_bit_identical(tmp_path, image_folder):
    shards = write_shards(image_folder, tmp_path / "shards")
    data = f'source = "shards"\nroot = "{shards}"\nworkers = 2'
    assert train_inprocess(recipe(tmp_path, data, "a")) == 0
    run_a = only_run(tmp_path / "a")

    assert_same_run(run_a, kill_mid_epoch_then_resume(recipe(tmp_path, data, "b"), tmp_path / "b"))


# Runs imgcls.train as a script, recording which items of which split each process reads (ShardImages.raw: the
# bytes it opens), in order, one file per split and rank under $SHARD_READS.
OBSERVER = """
import os, sys
from imgcls.data import shards
from imgcls.train import main

raw = shards.ShardImages.raw


def recorded(self, i):
    name = os.path.join(os.environ["SHARD_READS"], f"{self.split}-{os.environ.get('RANK', '0')}.txt")
    with open(name, "a") as f:
        f.write(f"{i}\\n")
    return raw(self, i)


shards.ShardImages.raw = recorded
sys.exit(main(sys.argv[1:]))
"""


def observed_run(tmp_path: Path, reads: Path, recipe_path: Path, *args: str, processes: int = 1) -> str:
    """Train (`processes` > 1: under accelerate launch, CPU); the stderr. Each process's reads land in `reads`."""
    script = tmp_path / "observed_train.py"
    script.write_text(OBSERVER)
    reads.mkdir()
    launch = ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--main_process_port", str(free_port())] if processes > 1 else [sys.executable])
    done = subprocess.run([*launch, str(script), str(recipe_path), *args], capture_output=True, text=True,
                          env={**cpu_env(), "SHARD_READS": str(reads)}, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def reads_of(reads: Path, split: str, rank: int) -> list[int]:
    return [int(line) for line in (reads / f"{split}-{rank}.txt").read_text().split()]


def test_two_processes_read_disjoint_shards_and_together_every_shard(tmp_path, image_folder):
    """Global batch 16 on 2 processes: 10 micro-batches of 8 per process per epoch = 80 images = 4 shards of 20,
    so the two lanes meet at a shard boundary. What each process opened is recorded (not re-derived from the
    sampler), and the log's plan must say the same."""
    shards = write_shards(image_folder, tmp_path / "shards")
    r = recipe(tmp_path, f'source = "shards"\nroot = "{shards}"', "two")
    r.write_text(r.read_text().replace("epochs = 3", "epochs = 2"))
    stderr = observed_run(tmp_path, tmp_path / "reads", r, processes=2)
    read = {rank: reads_of(tmp_path / "reads", "train", rank) for rank in (0, 1)}
    assert len(read[0]) == len(read[1]) == 160  # 2 epochs of 80
    plans = re.findall(r"\[RANK 0\] epoch (\d): 8 train shards; process 0 reads ([\d ]+); process 1 reads ([\d ]+)",
                       stderr)
    assert [int(epoch) for epoch, *_ in plans] == [0, 1], stderr[-3000:]
    shards_read = {}
    for epoch, *lanes in plans:
        epoch = int(epoch)
        mine, theirs = (read[rank][80 * epoch:80 * (epoch + 1)] for rank in (0, 1))
        assert sorted(mine + theirs) == list(range(160))  # every image once this epoch
        for rank, items in ((0, mine), (1, theirs)):  # in the order the log gives, item i in shard i // 20
            shards_read[rank, epoch] = list(dict.fromkeys(i // 20 for i in items))
            assert shards_read[rank, epoch] == [int(k) for k in lanes[rank].split()]
        assert len(shards_read[0, epoch]) == 4 and not set(shards_read[0, epoch]) & set(shards_read[1, epoch])
    assert shards_read[0, 0] != shards_read[0, 1]  # the shard order changes with the epoch


def test_a_resume_on_another_process_count_reads_every_image_of_the_epoch_once(tmp_path, image_folder):
    """Saved by 2 processes after 6 of 10 micro-batches, continued by 1: the rest of the epoch is exactly the 64
    images the 2 processes had not read (it was 32 of them again and 32 others left out)."""
    shards = write_shards(image_folder, tmp_path / "shards")
    r = recipe(tmp_path, f'source = "shards"\nroot = "{shards}"', "switch")
    r.write_text(r.read_text().replace("epochs = 3", "epochs = 1"))
    observed_run(tmp_path, tmp_path / "two", r, processes=2)
    seen = reads_of(tmp_path / "two", "train", 0)[:6 * 8] + reads_of(tmp_path / "two", "train", 1)[:6 * 8]
    checkpoint = only_run(tmp_path / "switch") / "checkpoints" / "step-0000006"
    observed_run(tmp_path, tmp_path / "one", r, "--resume", str(checkpoint))
    rest = reads_of(tmp_path / "one", "train", 0)
    assert len(rest) == 64 and sorted(seen + rest) == list(range(160))
