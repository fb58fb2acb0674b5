"""The preprocessing initial weights were trained with (`data.image_size`, `mean`, `std`, `interpolation`,
`crop_pct`): carried in a weights file's safetensors metadata (`imgcls.preprocess`, written by `imgcls.convert`
and by every artifact) or an artifact's config.json, else timm's pretrained_cfg or torchvision's weights
transforms for the model's name.

    label, values = weights_preprocess(cfg.model, 3)  # whose it is (for messages), and the data.* values
"""
from __future__ import annotations

import json
import math
from typing import Any

from safetensors import safe_open

from imgcls.errors import RecipeError
from imgcls.models import timm_models
from imgcls.models.pretrained import _info, _torchvision_arch, torchvision_weights, weights_file
from imgcls.models.spec import ModelSpec

PREPROCESS_METADATA = "imgcls.preprocess"  # safetensors metadata: JSON of PREPROCESS_KEYS and "source"
PREPROCESS_KEYS = ("image_size", "mean", "std", "interpolation", "crop_pct")


# torchvision's builder sets transform_input for these weights: inputs normalised with ImageNet's mean/std are
# turned into (x - 0.5) / 0.5. Normalising with 0.5 directly gives the same numbers and keeps the model plain.
_HALF_NORMALISED = {"googlenet", "inception_v3"}


def timm_preprocess(name: str) -> dict[str, Any]:
    """The data.* values timm's pretrained_cfg gives for a timm model name (its default tag without one)."""
    dc = timm_models.data_config(name)
    return {"image_size": list(dc["input_size"][1:]), "mean": list(dc["mean"]), "std": list(dc["std"]),
            "interpolation": dc["interpolation"], "crop_pct": float(dc["crop_pct"])}


def carried_preprocess(spec: str) -> dict[str, Any] | None:
    """The preprocessing a weights file carries: its safetensors metadata `imgcls.preprocess` (written by
    `imgcls.convert` and by every artifact), else an artifact folder's config.json; None when it carries none.
    The result holds PREPROCESS_KEYS and "source" (where the values came from)."""
    file = weights_file(spec)
    carried = None
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), "pt") as f:
                text = (f.metadata() or {}).get(PREPROCESS_METADATA)
        except Exception as e:  # safetensors raises its own SafetensorError for a damaged file
            raise RecipeError(f"model.weights: {file}: not a readable safetensors file: {e}") from None
        if text is not None:
            carried = _parse_carried(text, f"{file} metadata {PREPROCESS_METADATA!r}")
    config = file.parent / "config.json"
    if carried is None and file.name == "model.safetensors" and config.is_file():
        try:
            pre = json.loads(config.read_text()).get("preprocess")
        except (OSError, ValueError) as e:
            raise RecipeError(f"model.weights: {config}: unreadable artifact config ({e})") from None
        if isinstance(pre, dict):
            carried = _parse_carried(json.dumps({**pre, "source": f"artifact {config}"}), str(config))
    return carried


def _parse_carried(text: str, where: str) -> dict[str, Any]:
    """Preprocessing from a file that may come from anyone: every key present, of the right type and range."""
    try:
        d = json.loads(text)
        values = {"image_size": [int(v) for v in d["image_size"]], "mean": [float(v) for v in d["mean"]],
                  "std": [float(v) for v in d["std"]], "interpolation": str(d["interpolation"]),
                  "crop_pct": float(d["crop_pct"]), "source": str(d.get("source", "")) or where}
    except (ValueError, TypeError, KeyError) as e:
        raise RecipeError(f"model.weights: {where}: not a preprocessing record ({type(e).__name__}: {e}); expected "
                          f"JSON with {', '.join(PREPROCESS_KEYS)}") from None
    bad = (len(values["image_size"]) != 2 or min(values["image_size"]) < 1 or len(values["mean"]) not in (1, 3)
           or len(values["std"]) != len(values["mean"]) or not all(map(math.isfinite, values["mean"]))
           or not all(math.isfinite(v) and v > 0 for v in values["std"]))
    if bad:
        raise RecipeError(f"model.weights: {where}: preprocessing out of range: {text[:300]}")
    return values


def weights_preprocess(cfg: ModelSpec, channels: int) -> tuple[str, dict[str, Any]] | None:
    """Whose preprocessing it is (a possessive phrase for messages), and the data.* values the initial weights
    were trained with; None when nothing says (a file without preprocessing, for a model timm has no
    pretrained_cfg for)."""
    if cfg.weights:
        carried = carried_preprocess(cfg.weights)
        if carried is not None:
            label, values = f"model.weights {cfg.weights}'s ({carried.pop('source')})", carried
        elif timm_models.is_timm(cfg.name) and timm_models.pretrained_cfg(cfg.name):
            label, values = f"timm's pretrained_cfg for {cfg.name}:", timm_preprocess(cfg.name)
            _info(f"model.weights {cfg.weights} carries no preprocessing: using timm's pretrained_cfg for "
                  f"{cfg.name}")
        else:
            _info(f"model.weights {cfg.weights} carries no preprocessing: data.image_size, mean, std, "
                  "interpolation and crop_pct are the recipe's (or their defaults)")
            return None
    elif timm_models.is_timm(cfg.name):
        label, values = f"{cfg.name}'s pretrained", timm_preprocess(cfg.name)
    else:
        weights = torchvision_weights(cfg)
        t = weights.transforms()
        label = f"{_torchvision_arch(cfg)} {weights.name}'s pretrained"
        crop, resize = t.crop_size[0], t.resize_size[0]
        half = _torchvision_arch(cfg) in _HALF_NORMALISED
        values = {"image_size": [crop, crop], "mean": [0.5] * 3 if half else list(t.mean),
                  "std": [0.5] * 3 if half else list(t.std), "interpolation": t.interpolation.value,
                  "crop_pct": crop / resize}
    if channels == 1 and len(values["mean"]) == 3:  # the first conv sums the RGB kernels: gray stands for all 3
        values["mean"], values["std"] = [round(sum(values["mean"]) / 3, 6)], [round(sum(values["std"]) / 3, 6)]
    return label, values
