"""imgcls-data mnist: IDX files -> train/val/test class folders (+ list files), on small IDX files written here
and on the real MNIST (skipped without ../shared/data)."""
from __future__ import annotations

import contextlib
import gzip
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA, needs_real_data
from imgcls.data.loaders import build_splits
from imgcls.data.tools import mnist
from imgcls.data.tools.cli import main
from imgcls.recipe import DataConfig

NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
TRAIN_LABELS = [(i // 2) % 3 for i in range(30)]  # val (first 5): 0 0 1 1 2; train: 8 x 0, 8 x 1, 9 x 2
TEST_LABELS = [2, 0, 1, 2, 2, 0, 1, 1, 0, 2]
VAL_SIZE = 5
TINY_TABLE = """\
split       0      1      2      3      4      5      6      7      8      9   total
train       8      8      9      0      0      0      0      0      0      0      25
val         2      2      1      0      0      0      0      0      0      0       5
test        3      3      4      0      0      0      0      0      0      0      10
total      13     13     14      0      0      0      0      0      0      0      40
"""
MNIST_TABLE = """\
split       0      1      2      3      4      5      6      7      8      9   total
train    5444   6179   5470   5638   5307   4987   5417   5715   5389   5454   55000
val       479    563    488    493    535    434    501    550    462    495    5000
test      980   1135   1032   1010    982    892    958   1028    974   1009   10000
total    6903   7877   6990   7141   6824   6313   6876   7293   6825   6958   70000
"""


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int, gz: bool) -> Path:
    data = idx_bytes(array, magic)
    target = path.with_name(path.name + ".gz") if gz else path
    target.write_bytes(gzip.compress(data) if gz else data)
    return target


def write_tiny_mnist(folder: Path, gz: dict[str, bool]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Four IDX files of 4x5 noise images; `gz[part]` says whether that part's two files are gzip'd."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    parts = {}
    for part, labels in (("train", TRAIN_LABELS), ("t10k", TEST_LABELS)):
        images = rng.integers(0, 256, (len(labels), 4, 5), dtype=np.uint8)
        write_idx(folder / NAMES[part][0], images, 0x0803, gz[part])
        write_idx(folder / NAMES[part][1], np.array(labels, dtype=np.uint8), 0x0801, gz[part])
        parts[part] = images, np.array(labels)
    return parts


def expected_files(parts: dict, ext: str) -> dict[str, np.ndarray]:
    """Relative path -> the IDX pixels that file must hold."""
    files = {}
    for part, (images, labels) in parts.items():
        for i, label in enumerate(labels):
            split = "test" if part == "t10k" else "val" if i < VAL_SIZE else "train"
            files[f"{split}/{label}/{i:05d}.{ext}"] = images[i]
    return files


def image_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.*") if p.suffix in (".png", ".jpg")}


def convert(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["mnist", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("gz", [{"train": True, "t10k": True}, {"train": False, "t10k": False},
                                {"train": True, "t10k": False}], ids=["gz", "plain", "mixed"])
def test_tiny_idx_gives_exact_files_pixels_and_table(tmp_path, capsys, gz):
    parts = write_tiny_mnist(tmp_path / "idx", gz)
    out = tmp_path / "out"
    code, stdout, _ = convert(capsys, tmp_path / "idx", out, "--val-size", VAL_SIZE)
    assert code == 0
    files = expected_files(parts, "png")
    assert image_files(out) == set(files)
    for rel, pixels in files.items():
        with Image.open(out / rel) as im:
            assert im.format == "PNG" and im.mode == "L"
            assert np.array_equal(np.asarray(im), pixels), rel
    assert stdout == TINY_TABLE + f"wrote 40 images (PNG, lossless) to {out}\n"
    assert not (out / "train.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "out"]  # the temporary folder is gone


def test_lists_are_exact_and_train_through_the_listfile_source(tmp_path, capsys):
    parts = write_tiny_mnist(tmp_path / "idx", {"train": True, "t10k": False})
    out = tmp_path / "out"
    code, stdout, _ = convert(capsys, tmp_path / "idx", out, "--val-size", VAL_SIZE, "--lists")
    assert code == 0 and stdout.endswith(", lists train.txt, val.txt, test.txt\n")
    files = expected_files(parts, "png")
    for split in ("train", "val", "test"):
        rows = [f"{rel}----{rel.split('/')[1]}" for rel in files if rel.startswith(f"{split}/")]
        assert (out / f"{split}.txt").read_text(encoding="utf-8") == "".join(r + "\n" for r in rows)
    cfg = DataConfig(source="listfile", root=str(out), train_list="train.txt", val_list="val.txt",
                     test_list="test.txt", separator="----", channels=1, mean=[0.1307], std=[0.3081],
                     image_size=(28, 28))
    splits = build_splits(cfg)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (25, 5, 10)
    assert splits.class_names == ["0", "1", "2"]
    assert [splits.train.label(k) for k in range(25)] == TRAIN_LABELS[VAL_SIZE:]
    assert [splits.val.label(k) for k in range(5)] == TRAIN_LABELS[:VAL_SIZE]
    assert [splits.test.label(k) for k in range(10)] == TEST_LABELS
    assert np.array_equal(np.asarray(splits.test.open(3)), parts["t10k"][0][3])


def test_jpg_and_custom_separator(tmp_path, capsys):
    parts = write_tiny_mnist(tmp_path / "idx", {"train": False, "t10k": False})
    out = tmp_path / "out"
    code, stdout, _ = convert(capsys, tmp_path / "idx", out, "--val-size", VAL_SIZE, "--format", "jpg",
                              "--lists", "--separator", " ")
    assert code == 0 and f"wrote 40 images (JPEG quality 95, lossy) to {out}" in stdout
    assert image_files(out) == set(expected_files(parts, "jpg"))
    with Image.open(out / "test/2/00000.jpg") as im:
        assert im.format == "JPEG" and im.size == (5, 4)
    assert (out / "val.txt").read_text().splitlines()[:2] == ["val/0/00000.jpg 0", "val/0/00001.jpg 0"]


def test_existing_empty_out_is_used(tmp_path, capsys):
    write_tiny_mnist(tmp_path / "idx", {"train": False, "t10k": False})
    (tmp_path / "out").mkdir()
    code, _, _ = convert(capsys, tmp_path / "idx", tmp_path / "out", "--val-size", VAL_SIZE)
    assert code == 0 and len(image_files(tmp_path / "out")) == 40


def _idx_error(tmp_path: Path, capsys) -> str:
    code, stdout, err = convert(capsys, tmp_path / "idx", tmp_path / "out", "--val-size", VAL_SIZE)
    assert code == 2 and stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no OUT, no temporary folder
    return err


def test_missing_file_is_named(tmp_path, capsys):
    write_tiny_mnist(tmp_path / "idx", {"train": True, "t10k": True})
    (tmp_path / "idx" / "t10k-labels-idx1-ubyte.gz").unlink()
    assert _idx_error(tmp_path, capsys) == (
        f"error: {tmp_path / 'idx'}: t10k-labels-idx1-ubyte (or t10k-labels-idx1-ubyte.gz) not found; IDX_DIR "
        f"must hold train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        f"t10k-labels-idx1-ubyte, gzip'd or not\n")


def test_wrong_magic_number_is_named(tmp_path, capsys):
    write_tiny_mnist(tmp_path / "idx", {"train": True, "t10k": False})
    labels = tmp_path / "idx" / "t10k-labels-idx1-ubyte"
    (tmp_path / "idx" / "t10k-images-idx3-ubyte").write_bytes(labels.read_bytes())  # a labels file by mistake
    assert _idx_error(tmp_path, capsys) == (
        f"error: {tmp_path / 'idx' / 't10k-images-idx3-ubyte'}: magic number 0x00000801, expected 0x00000803 "
        f"(MNIST images); is it the right file?\n")


def test_mismatched_counts_are_named(tmp_path, capsys):
    write_tiny_mnist(tmp_path / "idx", {"train": True, "t10k": True})
    short = write_idx(tmp_path / "idx" / "train-labels-idx1-ubyte", np.array(TRAIN_LABELS[:-1]), 0x0801, True)
    assert _idx_error(tmp_path, capsys) == (
        f"error: {tmp_path / 'idx' / 'train-images-idx3-ubyte.gz'} has 30 images but {short} has 29 labels; "
        f"they must come from the same download\n")


def test_truncated_file_is_named(tmp_path, capsys):
    write_tiny_mnist(tmp_path / "idx", {"train": False, "t10k": False})
    path = tmp_path / "idx" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    assert _idx_error(tmp_path, capsys) == (
        f"error: {path}: header says 30 x 4 x 5 = 616 bytes with the header, the file has 609; it is truncated "
        f"or damaged: download it again\n")


def test_non_empty_out_is_refused_and_kept(tmp_path, capsys):
    write_tiny_mnist(tmp_path / "idx", {"train": False, "t10k": False})
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    code, stdout, err = convert(capsys, tmp_path / "idx", out, "--val-size", VAL_SIZE)
    assert code == 2 and stdout == ""
    assert err == (f"error: OUT {out} is not empty; nothing was written. Give a new or empty folder (or remove "
                   f"{out} first)\n")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if "idx" not in p.parts) == \
        ["out", "out/notes.txt", "out/train"]
    assert (out / "notes.txt").read_text() == "mine"


def test_interrupted_conversion_leaves_nothing(tmp_path, capsys, monkeypatch):
    write_tiny_mnist(tmp_path / "idx", {"train": False, "t10k": False})

    def interrupted(*args):
        raise KeyboardInterrupt  # Ctrl-C after every image is written, before the rename

    monkeypatch.setattr(mnist, "write_lists", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["mnist", str(tmp_path / "idx"), str(tmp_path / "out"), "--val-size", str(VAL_SIZE), "--lists"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


# ---------------------------------------------------------------- the real MNIST
@pytest.fixture(scope="module")
def real_mnist(tmp_path_factory) -> tuple[Path, str]:
    """The real conversion, once per test session: (OUT, its stdout)."""
    if not (SHARED_DATA / "mnist-idx").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    out = tmp_path_factory.mktemp("mnist") / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["mnist", str(SHARED_DATA / "mnist-idx"), str(out), "--lists"]) == 0
    return out, stdout.getvalue()


def hub_rows(split: str) -> tuple[list[bytes], np.ndarray]:
    """(PNG bytes, labels) of the hub-layout copy, its shards in name order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(p) for p in sorted((SHARED_DATA / "mnist/mnist").glob(f"{split}-*"))])
    return [cell["bytes"] for cell in table.column("image").to_pylist()], np.array(table.column("label"))


@needs_real_data
def test_real_mnist_gives_the_original_table(real_mnist):
    out, stdout = real_mnist
    lists = "lists train.txt, val.txt, test.txt"
    assert stdout == MNIST_TABLE + f"wrote 70,000 images (PNG, lossless) to {out}, {lists}\n"
    for row in MNIST_TABLE.splitlines()[1:4]:
        split, *counts = row.split()
        found = [len(list((out / split / str(d)).iterdir())) for d in range(10)]
        assert found == [int(c) for c in counts[:10]], split


@needs_real_data
def test_real_mnist_equals_the_hub_copy(real_mnist):
    out, _ = real_mnist
    found = {}  # (IDX part, index) -> label, from the written tree alone
    for path in out.glob("*/*/*.png"):
        found[("t10k" if path.parts[-3] == "test" else "train", int(path.stem))] = int(path.parts[-2])
    rng = np.random.default_rng(0)
    for part, hub_split, picks in (("train", "train", [*rng.choice(5000, 7, replace=False),
                                                       *rng.choice(np.arange(5000, 60000), 7, replace=False)]),
                                   ("t10k", "test", rng.choice(10000, 6, replace=False))):
        png, labels = hub_rows(hub_split)
        # the assumption behind the pixel check: row i of the hub copy is image i of the IDX file
        assert labels.tolist() == [found[(part, i)] for i in range(len(labels))]
        for i in map(int, picks):
            split = "test" if part == "t10k" else "val" if i < 5000 else "train"
            mine, hub = out / split / str(labels[i]) / f"{i:05d}.png", io.BytesIO(png[i])
            with Image.open(mine) as mine, Image.open(hub) as hub:
                assert np.array_equal(np.asarray(mine), np.asarray(hub)), (split, i)


@needs_real_data
def test_real_mnist_lists_train_through_the_listfile_source(real_mnist):
    out, _ = real_mnist
    splits = build_splits(DataConfig(source="listfile", root=str(out), train_list="train.txt", val_list="val.txt",
                                     test_list="test.txt", separator="----", channels=1, mean=[0.1307],
                                     std=[0.3081], image_size=(28, 28)))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (55000, 5000, 10000)
    assert splits.class_names == [str(d) for d in range(10)]
