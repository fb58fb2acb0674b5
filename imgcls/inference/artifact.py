"""The portable model artifact (`model/best`, `model/last`, or any folder `imgcls-export` and `model.weights`
accept): `model.safetensors` (with the preprocessing in its metadata), `config.json` (architecture, class
names, preprocessing, calibration) and the resolved `recipe.toml`. Written to a temporary folder and swapped in
(`imgcls.atomic`); read by predict, eval and export, and by training as `model.weights`. An artifact may come
from anyone: its format and class names are checked, and only safetensors and JSON are read.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from imgcls.atomic import recover_dir, remove_stale_tmp_dirs, replace_dir, tmp_dir
from imgcls.data.classnames import check_class_names
from imgcls.models.weights_preprocess import PREPROCESS_METADATA
from imgcls.models.registry import build_model
from imgcls.models.spec import Spec

ARTIFACT_FORMAT = "imgcls-artifact/1"


def save_artifact(dest: Path, model: torch.nn.Module, config: dict, recipe_toml: str,
                  state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """`config` holds architecture, class names, preprocessing and calibration (see `load_artifact`). Class names
    that are not safe folder names are refused before anything is written. `state_dict`: the model's full
    tensors when the caller gathered them (sharded models: `accelerator.get_state_dict` on every rank)."""
    dest = Path(dest)
    check_class_names(config.get("class_names"), str(dest / "config.json"))
    remove_stale_tmp_dirs(dest)  # a killed save's folder (an artifact folder has one writer)
    tmp = tmp_dir(dest)
    state = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {"format": ARTIFACT_FORMAT}
    if "preprocess" in config:  # the file alone, copied elsewhere, still says how its inputs are prepared
        metadata[PREPROCESS_METADATA] = json.dumps({**config["preprocess"], "source": "an imgcls artifact"})
    save_file(tensors, str(tmp / "model.safetensors"), metadata=metadata)
    (tmp / "config.json").write_text(json.dumps({"format": ARTIFACT_FORMAT, **config}, indent=2))
    (tmp / "recipe.toml").write_text(recipe_toml)
    replace_dir(tmp, dest)


def artifact_path(path: str | Path) -> Path:
    """An artifact folder, or a run folder (-> its model/best)."""
    p = Path(path)
    recover_dir(p)
    recover_dir(p / "model" / "best")
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    if (p / "model" / "best" / "config.json").is_file():
        return p / "model" / "best"
    raise FileNotFoundError(f"{p}: not a model artifact (expected config.json + model.safetensors, or a run "
                            f"folder with model/best/)")


def read_artifact_config(path: str | Path) -> dict:
    """config.json of an artifact, its format and class names checked (an artifact may come from anyone)."""
    config_file = artifact_path(path) / "config.json"
    config = json.loads(config_file.read_text())
    if config.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{path}: artifact format {config.get('format')!r}, expected {ARTIFACT_FORMAT!r}")
    check_class_names(config.get("class_names"), str(config_file))
    return config


def load_artifact(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from its config.json and load its weights (strict). Returns (model in eval, config)."""
    folder = artifact_path(path)
    config = read_artifact_config(folder)
    arch = config["model"]
    model = build_model(Spec(name=arch["name"], args=arch["args"]), arch["num_classes"],
                        arch["in_channels"], tuple(config["preprocess"]["image_size"]))
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.eval(), config

