"""What already held when #20 was filed, kept by a test each: nothing imgcls reads is unpickled (torch.load reads
tensors only, np.load no objects, TorchScript / torch.export only from bytes written in this process), predict
reads safetensors and ONNX only, timm cannot be handed a file through [model] args, hub ids cannot climb out of
the cache, concurrent --sort-into runs never overwrite each other, and no command goes through a shell."""
from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest
import torch

from conftest import REPO
from imgcls.errors import RecipeError
from imgcls.inference.export import main as export_main
from imgcls.inference.predict import main as predict_main, sort_into
from imgcls.models.registry import build_model
from imgcls.models.weights import load_weights
from imgcls.recipe import ModelConfig
from test_security_artifacts import untrained_artifact

SOURCES = sorted([*(REPO / "imgcls").rglob("*.py"), *(REPO / "launcher").rglob("*.py")])


def calls(name: str) -> list[tuple[Path, ast.Call]]:
    """Every call of a dotted name (`torch.load`, `np.load`) in imgcls/ and launcher/, with its file."""
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
                found.append((path.relative_to(REPO), node))
    return found


def keyword(call: ast.Call, name: str):
    """The literal value of a keyword argument, or the string 'absent'."""
    kw = next((k for k in call.keywords if k.arg == name), None)
    return "absent" if kw is None else ast.literal_eval(kw.value) if isinstance(kw.value, ast.Constant) else "dynamic"


class _Payload:
    """Unpickling this writes a marker file: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------- nothing is unpickled
def test_every_torch_load_reads_tensors_only():
    found = calls("torch.load")
    assert {str(p) for p, _ in found} == {"imgcls/models/weights.py", "imgcls/models/convert.py"}  # not vacuous
    assert [(str(p), c.lineno) for p, c in found if keyword(c, "weights_only") is not True] == []


def test_np_load_never_allows_pickles():
    found = calls("np.load") + calls("numpy.load")
    assert found  # the disk store reads its labels with np.load
    assert [(str(p), c.lineno) for p, c in found if keyword(c, "allow_pickle") not in ("absent", False)] == []


def test_no_module_imports_a_pickle_reader():
    readers = {"pickle", "dill", "joblib", "cloudpickle", "shelve"}
    imported = [(str(p.relative_to(REPO)), n.lineno) for p in SOURCES for n in ast.walk(ast.parse(p.read_text()))
                if isinstance(n, (ast.Import, ast.ImportFrom))
                and ({a.name.split(".")[0] for a in n.names} | {(getattr(n, "module", None) or "").split(".")[0]})
                & readers]
    assert imported == []


def test_torchscript_and_torch_export_are_loaded_only_from_bytes_in_memory():
    found = calls("torch.jit.load") + calls("torch.export.load")
    assert [str(p) for p, _ in found] == ["imgcls/inference/exporters.py"] * 2
    assert [ast.unparse(c.args[0]) for _, c in found] == ["io.BytesIO(written)"] * 2


def test_predict_reads_safetensors_and_onnx_only(tmp_path, capsys):
    """An artifact whose weights are a pickle (torch.save) instead of safetensors: refused, the payload never runs."""
    artifact = untrained_artifact(tmp_path / "a")
    marker = tmp_path / "payload_ran"
    torch.save({"conv.weight": _Payload(marker)}, artifact / "model.safetensors")
    assert predict_main([str(artifact), str(tmp_path / "a" / "imgs" / "val")]) == 2
    assert not marker.exists()
    refusal = f"error: {artifact / 'model.safetensors'}: not the weights of the model its config.json describes ("
    assert capsys.readouterr().err.startswith(refusal)  # then safetensors' own words (its header cannot be read)
    assert export_main([str(artifact), "--format", "onnx", "--out", str(tmp_path / "export")]) == 2
    assert capsys.readouterr().err.startswith(refusal) and not marker.exists()
    torch.save(_Payload(marker), tmp_path / "model.pt")
    assert predict_main([str(tmp_path / "model.pt"), str(tmp_path / "a" / "imgs" / "val")]) == 2
    assert not marker.exists()


# ---------------------------------------------------------------- model files named in a recipe
@pytest.mark.parametrize("arg", ["checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay"])
def test_timm_cannot_be_handed_a_file_through_model_args(arg):
    with pytest.raises(RecipeError) as e:
        build_model(ModelConfig(name="timm:resnet18", args={arg: "/tmp/planted.pth"}), 2, 3, (32, 32))
    assert str(e.value) == f"model.args.{arg}: set from the data and the recipe, not from [model] args"


@pytest.mark.parametrize("repo", ["../../etc", "someone/../../x"])
def test_a_hub_id_that_climbs_out_of_the_cache_is_refused(repo):
    model = build_model(ModelConfig(name="small_cnn", args={"width": 8}), 2, 1, (16, 16))
    with pytest.raises(RecipeError) as e:
        load_weights(model, f"hf-hub:{repo}", "finetune", in_channels=1)
    assert str(e.value).startswith(f"model.weights: hf-hub:{repo}: not a hub repo 'hf-hub:owner/name[@revision]' "
                                   f"(Repo id must be in the form 'repo_name' or 'namespace/repo_name'")


# ---------------------------------------------------------------- --sort-into and commands
def test_concurrent_sorts_into_one_folder_never_overwrite(tmp_path):
    images = []
    for i in range(20):
        path = tmp_path / "in" / f"{i % 4}.png"  # four names, each taken five times per run
        path.parent.mkdir(exist_ok=True)
        images.append(str(path))
        path.write_bytes(bytes([i % 4]) * 16)
    rows = [{"path": p, "prediction": "a"} for p in images]
    dest, errors = tmp_path / "sorted", []

    def run():
        try:
            sort_into(rows, dest)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    copies = sorted((dest / "a").iterdir())
    assert len(copies) == 80
    for copy in copies:
        assert copy.read_bytes() == bytes([int(copy.name[0])]) * 16  # each copy is whole and of its own image


def test_no_command_goes_through_a_shell():
    shell = [(str(p), c.lineno) for name in ("subprocess.run", "subprocess.Popen", "subprocess.call",
                                             "subprocess.check_call", "subprocess.check_output")
             for p, c in calls(name) if keyword(c, "shell") not in ("absent", False)]
    system = [(str(p), c.lineno) for name in ("os.system", "os.popen") for p, c in calls(name)]
    assert shell == [] and system == []


def test_printed_commands_are_quoted_with_shlex_join():
    """The commands imgcls prints for the user to run again (launch, resume) are built with shlex.join."""
    joined = {str(p) for p, _ in calls("shlex.join")}
    assert {"launcher/launch.py", "imgcls/training/signals.py"} <= joined
    assert [(str(p), c.lineno) for p, c in calls('" ".join') if "cmd" in ast.unparse(c)] == []
