"""`pool.map_chunks`: the process pool the up-front check and the store fills decode in. Results come back in
the chunks' order, a tensor in shared memory or a mapped file is written in place by the children, and the
first error is raised in the parent with its own type and text."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from imgcls.data.pool import map_chunks
from imgcls.errors import DataError


def pid_and_square(shared, chunk):
    return os.getpid(), [shared * x * x for x in chunk]


def write_rows(pixels, rows):
    for k in rows:
        pixels[k] = k
    return len(rows)


def fail_on_three(_, chunk):
    if 3 in chunk:
        raise DataError(f"cannot read image item{chunk[0]}.png: broken")
    return chunk


def test_results_come_back_in_order_from_other_processes():
    chunks = [[k, k + 1] for k in range(0, 40, 2)]
    out = list(map_chunks(pid_and_square, 10, chunks, workers=2))
    assert [sq for _, sq in out] == [[10 * k * k, 10 * (k + 1) ** 2] for k in range(0, 40, 2)]
    assert {pid for pid, _ in out} - {os.getpid()}, "no chunk ran in a child process"


def test_one_worker_or_one_chunk_runs_here():
    assert {pid for pid, _ in map_chunks(pid_and_square, 1, [[1], [2]], workers=1)} == {os.getpid()}
    assert {pid for pid, _ in map_chunks(pid_and_square, 1, [[1, 2]], workers=2)} == {os.getpid()}


def test_children_write_a_shared_memory_tensor_in_place():
    pixels = torch.zeros(100, dtype=torch.int64).share_memory_()
    done = sum(map_chunks(write_rows, pixels, [range(s, s + 10) for s in range(0, 100, 10)], workers=2))
    assert done == 100 and torch.equal(pixels, torch.arange(100))


def test_children_write_a_mapped_file_in_place(tmp_path):
    mapped = np.memmap(tmp_path / "rows.i8", dtype=np.int64, mode="w+", shape=(50,))
    list(map_chunks(write_rows, torch.from_numpy(mapped), [range(s, s + 5) for s in range(0, 50, 5)], workers=2))
    mapped.flush()
    assert np.array_equal(np.fromfile(tmp_path / "rows.i8", dtype=np.int64), np.arange(50))


def test_the_first_error_is_raised_with_its_type_and_text():
    with pytest.raises(DataError, match=r"^cannot read image item2.png: broken$"):
        list(map_chunks(fail_on_three, None, [[0, 1], [2, 3], [4, 5]], workers=2))
