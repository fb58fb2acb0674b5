"""The frozen backbone's features, computed once in eval mode and cached on disk: stage 1 of probe-then-fine-tune.

    cache = FeatureCache(cache_root(data.cache_dir), model_identity(model, head, name, args), precision)
    x, y = cache.features(model, linear, loader, accelerator, split, frame, view, augment)

A feature is the input of the model's last Linear (timm's pre-logits, torchvision's pooled features), grabbed
by a forward pre-hook while the whole model runs in eval mode under the run's autocast. View 0 of a split is
its eval framing; view v >= 1 of the train split is `data.augment` applied with the augmentation's epoch
`VIEW_EPOCH + v - 1`: a pure function of (seed, view, sample index), as every augmented pixel is, and never
the pixels of a training epoch.

One file per (split, view), `<cache>/features/<key>.safetensors`, written whole under a temporary name and
renamed into place. The key is a sha256 of everything the numbers depend on, so a stale file is never found:
the backbone's tensors (every one outside the classifier), the model's name and arguments, the preprocessing,
the split's images (`fingerprint.source_fingerprint`: each file's path, size and mtime, the labels), the frame,
the view with the augmentation and seed that made it, the precision, the library versions and the source of
the imgcls modules that produce the pixels and the features (code identity: an edit there is a new key).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import PIL
import safetensors
import timm
import torch
import torchvision
from accelerate.logging import get_logger
from safetensors.torch import load_file, save_file
from torch import nn

from imgcls.data import augment, autoaugment, images, store, transforms
from imgcls.data import fingerprint
from imgcls.data.fingerprint import source_fingerprint

log = get_logger(__name__)

FORMAT_VERSION = 1
VIEW_EPOCH = 2 ** 31  # augmentation epochs of probe views: far above any training epoch
_CODE = (augment, autoaugment, images, store, transforms)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def code_identity() -> dict:
    """sha256 of the source of this module and of each module that makes the pixels it reads (the one scheme
    of every cache: `fingerprint.code_identity`)."""
    return fingerprint.code_identity([sys.modules[__name__], *_CODE])


def model_identity(model: nn.Module, head: str, name: str, args: dict) -> dict:
    """The model name and arguments, and a sha256 of every tensor outside the classifier `head` (names,
    dtypes, shapes and bytes): the backbone that makes the features. The head does not change them."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        if key == head or key.startswith(head + "."):
            continue
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {"name": name, "args": args, "backbone_sha256": h.hexdigest()}


class FeatureCache:
    """Features of each (split, view) under `root/features/`, keyed by what they depend on."""

    def __init__(self, root: Path, model_id: dict, precision: str):
        self.dir = Path(root) / "features"
        self.common = {"format": FORMAT_VERSION, "model": model_id, "precision": precision,
                       "code": code_identity(), "torch": torch.__version__, "torchvision": torchvision.__version__,
                       "timm": timm.__version__, "pillow": PIL.__version__, "safetensors": safetensors.__version__}

    def key(self, split, frame: dict, view: int, augment_cfg: dict | None, seed: int | None) -> str:
        parts = {**self.common, "source": source_fingerprint(split), "frame": frame, "view": view,
                 "augment": augment_cfg, "seed": seed}
        return _sha(json.dumps(parts, sort_keys=True).encode())

    def features(self, model: nn.Module, linear: nn.Linear, loader, accelerator, key: str
                 ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(features float32 [N, D], labels int64 [N], whether the cache had them)."""
        path = self.dir / f"{key}.safetensors"
        if path.is_file():
            try:
                saved = load_file(str(path))
                return saved["features"], saved["labels"], True
            except Exception as e:  # a damaged file is a miss; it is replaced below
                log.warning("feature cache %s unreadable (%s): computing the features again", path, e)
        x, y = extract(model, linear, loader, accelerator)
        if accelerator.is_main_process:
            _write(path, {"features": x, "labels": y})
        return x, y, False


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@torch.no_grad()
def extract(model: nn.Module, linear: nn.Linear, loader, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `model` in eval mode over `loader` (an `Images` dataset's); the input of `linear` for each sample,
    gathered from every process (padding dropped), in float32 on the CPU, with the labels."""
    model.eval()
    grabbed: list[torch.Tensor] = []
    hook = linear.register_forward_pre_hook(lambda module, args: grabbed.append(args[0]))
    feats, labels = [], []
    try:
        for images_, y, positions in loader:
            with accelerator.autocast():
                model(loader.dataset.model_input(images_, positions))
            x = grabbed.pop().float().flatten(1).contiguous()
            x, y = accelerator.gather_for_metrics((x, y))
            feats.append(x.cpu())
            labels.append(y.cpu())
    finally:
        hook.remove()
    return torch.cat(feats), torch.cat(labels).long()
