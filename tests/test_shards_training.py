"""Training on shards (data.source = "shards"): the same run as on the folder the shards were written from, an
exact resume after SIGKILL, and processes that read disjoint runs of shards."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import write_recipe
from helpers import (assert_same_run, kill_mid_epoch_then_resume, assert_same_weights, only_run, stable_rows,
                     train_inprocess, weights)
from imgcls.data.tools.cli import main as data_main
from test_distributed import cpu_env, free_port, launch_cmd

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


def test_two_processes_read_disjoint_shards_and_together_every_shard(tmp_path, image_folder):
    """Global batch 16 on 2 processes: 10 micro-batches of 8 per process per epoch = 80 images = 4 shards of 20,
    so the two lanes meet at a shard boundary. The log gives the plan; that process r's loader yields exactly
    lane r is tested with accelerate's BatchSamplerShard in tests/test_shard_order.py."""
    shards = write_shards(image_folder, tmp_path / "shards")
    r = recipe(tmp_path, f'source = "shards"\nroot = "{shards}"', "two")
    r.write_text(r.read_text().replace("epochs = 3", "epochs = 2"))
    done = subprocess.run(launch_cmd(r, "--multi_gpu", "--num_processes", "2", "--main_process_port",
                                     str(free_port())), capture_output=True, text=True, env=cpu_env(),
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    plans = re.findall(r"\[RANK 0\] epoch (\d): 8 train shards; process 0 reads ([\d ]+); process 1 reads ([\d ]+)",
                       done.stderr)
    read = {(p, int(epoch)): {int(k) for k in lanes[p].split()} for epoch, *lanes in plans for p in (0, 1)}
    assert sorted(read) == [(0, 0), (0, 1), (1, 0), (1, 1)], done.stderr[-3000:]
    for epoch in (0, 1):
        mine, theirs = read[(0, epoch)], read[(1, epoch)]
        assert len(mine) == len(theirs) == 4 and not mine & theirs and mine | theirs == set(range(8))
    assert read[(0, 0)] != read[(0, 1)]  # the shard order changes with the epoch
