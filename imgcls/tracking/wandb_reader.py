"""Read a W&B run back from the files wandb writes locally, with no server and no login.

    python -m imgcls.wandb_reader runs/mnist/<run>           # every W&B run file under the run dir, summarised
    python -m imgcls.wandb_reader path/to/run-<id>.wandb --history

Useful to check an offline run before `wandb sync`, and what the tests use to prove what was logged. wandb 0.31
ships no reader for its transaction log (`wandb.sdk.internal.datastore` is gone since the Go core took over the
writing), so this is one. The file is LevelDB's log format: a 7-byte file header (`:W&B`, magic 0xBEE1, version
0), then 32 KiB blocks of records. Each record has a 7-byte header (crc32 of the type byte + payload, payload
length, type FULL / FIRST / MIDDLE / LAST); a payload longer than a block's room is split into FIRST, MIDDLE...,
LAST pieces, and a block tail too short for a header is padding. Each payload is a `wandb_internal_pb2.Record`.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from imgcls.errors import CorruptLog

log = logging.getLogger(__name__)

FILE_HEADER = struct.Struct("<4sHB")
FILE_IDENT, FILE_MAGIC, FILE_VERSION = b":W&B", 0xBEE1, 0
RECORD_HEADER = struct.Struct("<IHB")
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_payloads(path: str | Path, warn: bool = True) -> Iterator[bytes]:
    """The reassembled record payloads of one `.wandb` file, checksums verified. A record cut off at the end of
    the file (the writer was killed mid-write) ends the iteration with a warning; damage elsewhere raises."""
    data = Path(path).read_bytes()
    if len(data) < FILE_HEADER.size or FILE_HEADER.unpack_from(data) != (FILE_IDENT, FILE_MAGIC, FILE_VERSION):
        raise CorruptLog(f"{path}: not a W&B run file (expected the ':W&B' header, magic 0xBEE1, version 0)")
    yield from _payloads(path, data, FILE_HEADER.size, 0, warn)


def _payloads(path, data: bytes, pos: int, base: int, warn: bool, resync: bool = False) -> Iterator[bytes]:
    """Payloads from data[pos:], where data starts at file offset `base` (a block boundary). `resync`: the
    data starts inside the file, so pieces of a record that began before it are skipped."""
    parts = None
    while pos < len(data):
        room = BLOCK - (base + pos) % BLOCK
        if room < RECORD_HEADER.size:  # block trailer: padding
            pos += room
            continue
        if pos + RECORD_HEADER.size > len(data):
            if warn:
                log.warning("%s: ends inside a record header at byte %d (writer stopped mid-write)", path, base + pos)
            return
        crc, length, kind = RECORD_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero-filled space the writer reserved but never used
            return
        start, end = pos + RECORD_HEADER.size, pos + RECORD_HEADER.size + length
        if end > len(data):
            if warn:
                log.warning("%s: last record cut off at byte %d (writer stopped mid-write)", path, base + pos)
            return
        payload = data[start:end]
        if zlib.crc32(bytes([kind]) + payload) != crc:
            raise CorruptLog(f"{path}: checksum mismatch in the record at byte {base + pos}")
        pos = end
        if kind == FULL and parts is None:
            yield payload
        elif kind == FIRST and parts is None:
            parts = [payload]
        elif kind in (MIDDLE, LAST) and parts is not None:
            parts.append(payload)
            if kind == LAST:
                yield b"".join(parts)
                parts = None
        elif kind in (MIDDLE, LAST) and resync:
            continue
        else:
            raise CorruptLog(f"{path}: record of type {kind} out of sequence at byte {base + pos - length - 7}")


def has_exit_record(path: str | Path) -> bool:
    """Whether the run file holds its run's exit record yet, which wandb-core writes after every history row.
    `wandb.finish()` returns before wandb-core has closed the run's stream, and the records since its last
    periodic flush (`x_transaction_log_flush_interval`, 15 s by default) reach the file only then; a reader
    that needs the whole run waits for this. Reads the last two blocks only, so it is cheap on a long run."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    with path.open("rb") as f:
        start = max(0, (f.seek(0, 2) - 2 * BLOCK) // BLOCK * BLOCK)
        if start == 0:
            payloads = iter_payloads(path, warn=False)
        else:
            f.seek(start)
            payloads = _payloads(path, f.read(), 0, start, warn=False, resync=True)
        for payload in payloads:
            record = pb.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "exit":
                return True
    return False


def read_records(path: str | Path) -> Iterator[Any]:
    """`wandb_internal_pb2.Record` messages, in the order they were written."""
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in iter_payloads(path):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


@dataclass
class WandbRun:
    """What one `.wandb` file says about its run."""

    path: Path
    id: str = ""
    project: str = ""
    name: str = ""
    resumed: bool = False
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one dict per step, with `_step`
    summary: dict = field(default_factory=dict)
    artifacts: list[dict] = field(default_factory=list)

    @property
    def steps(self) -> list[int]:
        return [row["_step"] for row in self.history if "_step" in row]

    def series(self, key: str) -> list[tuple[int, Any]]:
        """(step, value) for every history row that has `key`."""
        return [(row["_step"], row[key]) for row in self.history if key in row]


def _parts(item) -> list[str]:
    return list(item.nested_key) or [item.key]


def _set(tree: dict, parts: list[str], value: Any) -> None:
    """A nested key (["val/misclassified", "_type"]) becomes nested dicts, as W&B shows it."""
    *parents, last = parts
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _drop(tree: dict, parts: list[str]) -> None:
    *parents, last = parts
    for part in parents:
        tree = tree.get(part, {})
    tree.pop(last, None)


def _history_value(item) -> Any:
    which = item.WhichOneof("value")
    if which is None:
        return json.loads(item.value_json)
    if which == "none":
        return None
    value = getattr(item, which)
    return json.loads(value) if which == "json" else value


def _apply(tree: dict, record) -> None:
    """A config or summary record: updates, then removals."""
    for item in record.update:
        _set(tree, _parts(item), json.loads(item.value_json))
    for item in record.remove:
        _drop(tree, _parts(item))


def read_run(path: str | Path) -> WandbRun:
    run = WandbRun(Path(path))
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.id, run.project, run.name, run.resumed = r.run_id, r.project, r.display_name, r.resumed
            _apply(run.config, r.config)
        elif kind == "config":
            _apply(run.config, record.config)
        elif kind == "history":
            row: dict = {}
            for item in record.history.item:
                _set(row, _parts(item), _history_value(item))
            run.history.append(row)
        elif kind == "summary":
            _apply(run.summary, record.summary)
        elif kind == "artifact":
            a = record.artifact
            run.artifacts.append({"name": a.name, "type": a.type, "aliases": sorted(a.aliases),
                                  "files": sorted(c.path for c in a.manifest.contents)})
    return run


def _started(path: Path) -> str:
    found = re.search(r"\d{8}_\d{6}", path.parent.name)
    return found.group(0) if found else ""


def find_run_files(root: str | Path) -> list[Path]:
    """`run-*.wandb` files under `root` (an imgcls run dir, its `wandb/` dir, one wandb run dir, or the file
    itself), oldest first. A resumed imgcls run has one file per attempt, all with the same run id."""
    root = Path(root)
    if root.is_file():
        return [root]
    files = {p.resolve() for p in root.rglob("run-*.wandb") if "latest-run" not in p.parts}
    return sorted(files, key=lambda p: (_started(p), str(p)))


def _summary_text(run: WandbRun, with_history: bool) -> dict:
    steps = run.steps
    out = {"file": str(run.path), "id": run.id, "project": run.project, "name": run.name,
           "resumed": run.resumed, "config_keys": sorted(k for k in run.config if not k.startswith("_")),
           "history_rows": len(run.history), "steps": [steps[0], steps[-1]] if steps else [],
           "summary": {k: v.get("_type", "object") if isinstance(v, dict) else v
                       for k, v in sorted(run.summary.items()) if not k.startswith("_")},
           "artifacts": run.artifacts}
    if with_history:
        out["history"] = run.history
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m imgcls.wandb_reader", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", type=Path, help="run dir, wandb dir or run-*.wandb file")
    p.add_argument("--history", action="store_true", help="include every history row")
    args = p.parse_args(argv)
    files = [f for path in args.paths for f in find_run_files(path)]
    if not files:
        print(f"error: no run-*.wandb file under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    for f in files:
        try:
            print(json.dumps(_summary_text(read_run(f), args.history), indent=1, default=str))
        except CorruptLog as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
