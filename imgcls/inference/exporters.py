"""The exporters of imgcls-export: the files (ONNX, fp16 ONNX, TorchScript, torch.export), each carrying class
names, preprocessing and temperature, written atomically, and read back as a `Predictor` for the parity check.
TorchScript and torch.export files hold pickles: they are read back only from the bytes this process has just
written (`load_exported`), never from a file on disk (SECURITY.md).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from pathlib import Path
from typing import Callable

import torch

from imgcls.atomic import atomic_path, write_bytes
from imgcls.inference.predictor import META_KEY, Predictor, load_onnx, torch_predictor

FILES = {"onnx": "model.onnx", "onnx_fp16": "model.fp16.onnx", "torchscript": "model.torchscript.pt",
         "torch_export": "model.pt2"}


WRITTEN_HERE_ONLY = ("torchscript", "torch_export")  # pickles inside: loaded only from bytes this process wrote


EXTRA_FILE = f"{META_KEY}.json"


DYNAMO_MIN_OPSET = 18  # the torch.export-based ONNX exporter emits opset >= 18; older opsets use the legacy one


# ---------------------------------------------------------------- writers
@contextlib.contextmanager
def _quiet():
    """torch's exporters warn about their own deprecations (TorchScript, the legacy ONNX exporter)."""
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning, torch.jit.TracerWarning):
            warnings.simplefilter("ignore", category)
        yield


def onnx_proto(model: torch.nn.Module, example: torch.Tensor, opset: int):
    """The ONNX graph at exactly `opset`, batch axis dynamic. Returns (ModelProto, exporter name)."""
    import onnx

    with _quiet():
        if opset >= DYNAMO_MIN_OPSET:
            program = torch.onnx.export(model, (example,), input_names=["image"], output_names=["logits"],
                                        opset_version=opset, dynamo=True, verbose=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
            proto, exporter = program.model_proto, "torch.onnx (dynamo)"
        else:
            buffer = io.BytesIO()
            torch.onnx.export(model, (example,), buffer, input_names=["image"], output_names=["logits"],
                              opset_version=opset, dynamo=False,
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
            proto, exporter = onnx.load_from_string(buffer.getvalue()), "torch.onnx (legacy TorchScript)"
    got = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if got != opset:
        raise RuntimeError(f"asked for ONNX opset {opset}, the exporter produced {got}")
    return proto, exporter


def write_onnx(proto, meta: dict, path: Path, fp16: bool = False) -> None:
    import onnx

    proto = copy.deepcopy(proto)
    if fp16:  # float16 weights and compute; float32 in and out, so callers do not change
        from onnxruntime.transformers.float16 import convert_float_to_float16
        from onnxruntime.transformers.onnx_model import OnnxModel

        fp16_model = OnnxModel(convert_float_to_float16(proto, keep_io_types=True))
        fp16_model.topological_sort()  # the converter appends its input casts at the end of the graph
        proto = fp16_model.model
    proto.metadata_props.add(key=META_KEY, value=json.dumps(meta))
    proto.producer_name = "imgcls"
    proto.doc_string = f"{meta['model'].get('name', '')}, classes {meta['class_names']}"
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))


def _write_bytes(path: Path, save: Callable[[io.BytesIO], None]) -> bytes:
    """The file's bytes, serialised in memory and then written atomically: the check loads these very bytes."""
    buffer = io.BytesIO()
    save(buffer)
    data = buffer.getvalue()
    write_bytes(path, data)
    return data


def write_torchscript(model: torch.nn.Module, example: torch.Tensor, meta: dict, path: Path) -> bytes:
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(model, example)
        return _write_bytes(path, lambda f: torch.jit.save(traced, f, _extra_files={EXTRA_FILE: json.dumps(meta)}))


def write_program(model: torch.nn.Module, example: torch.Tensor, meta: dict, path: Path) -> bytes:
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    return _write_bytes(path, lambda f: torch.export.save(program, f, extra_files={EXTRA_FILE: json.dumps(meta)}))


def check_only_refusal(formats: list[str], out: Path) -> str | None:
    """Why --check-only will not check these formats, or None. TorchScript and torch.export files are pickles
    inside (torch.jit.load and torch.export.load can run code stored in them), so imgcls loads them only from
    the bytes this process has just written, never from a file found in a folder."""
    refused = [fmt for fmt in formats if fmt in WRITTEN_HERE_ONLY]
    if not refused:
        return None
    files = ", ".join(str(out / FILES[fmt]) for fmt in refused)
    return (f"--check-only does not load {files}: loading a TorchScript or torch.export file can run code stored "
            f"in it, so imgcls checks those formats only right after writing them; run imgcls-export without "
            f"--check-only to write and check them anew, or re-check the ONNX files only (--format onnx)")


def load_exported(fmt: str, path: Path, written: bytes | None = None) -> Predictor:
    """An exported file as a Predictor, with the metadata read back from the file itself. TorchScript and
    torch.export are read from `written`, the bytes this process serialised, never from the file on disk."""
    if fmt.startswith("onnx"):
        return load_onnx(path)
    if written is None:
        raise ValueError(check_only_refusal([fmt], path.parent))
    extra = {EXTRA_FILE: ""}
    with _quiet():
        module = torch.jit.load(io.BytesIO(written), _extra_files=extra) if fmt == "torchscript" else \
            torch.export.load(io.BytesIO(written), extra_files=extra).module()
    return torch_predictor(module, json.loads(extra[EXTRA_FILE]), str(path))


def export_one(fmt: str, model, example, opset: int, meta: dict, out: Path,
               onnx_cache: dict) -> tuple[dict, bytes | None]:
    """Write one format; `onnx_cache` keeps the fp32 ONNX graph so that fp16 does not export it again.
    Returns (report info, the bytes written for TorchScript / torch.export, else None)."""
    path = out / FILES[fmt]
    info: dict = {"file": path.name}
    written = None
    if fmt.startswith("onnx"):
        if "proto" not in onnx_cache:
            onnx_cache["proto"], onnx_cache["exporter"] = onnx_proto(model, example, opset)
        write_onnx(onnx_cache["proto"], meta, path, fp16=fmt == "onnx_fp16")
        info.update(exporter=onnx_cache["exporter"], opset=opset)
    elif fmt == "torchscript":
        written = write_torchscript(model, example, meta, path)
    else:
        written = write_program(model, example, meta, path)
    info["bytes"] = path.stat().st_size
    return info, written
