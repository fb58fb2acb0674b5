"""`[model] weights`, `train_mode` and `freeze`: initial weights from a file, and which parts train.

    load_weights(model, cfg.model.weights, cfg.model.train_mode, in_channels=1)   # unless fromscratch
    frozen = apply_freeze(model, cfg.model.freeze)
    set_train_mode(model, frozen)   # at the start of every training epoch, instead of model.train()

Files: .safetensors, .pth/.pt (read with weights_only=True), an artifact folder's model.safetensors, or
`hf-hub:owner/repo[@revision]` (the repo's model.safetensors through the Hugging Face cache, see
`imgcls.models.pretrained`); DDP's `module.` and torch.compile's `_orig_mod.` prefixes are removed. `finetune` loads
what fits (a head of another size is re-initialised, RGB first-conv weights are adapted to the input's
channels); `update` loads strictly. `load_state` does the same for tensors already in memory (torchvision's
pretrained weights).
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Callable, Union

import safetensors.torch
import torch
from torch import nn

from imgcls.models.parts import adapt_input_conv, classifier_prefix, count_parameters, first_conv, info, unwrap
from imgcls.models.pretrained import weights_file
from imgcls.errors import RecipeError


def _under(name: str, prefixes: Union[str, list[str]]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in ([prefixes] if isinstance(prefixes, str) else prefixes))


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _listing(keys: list[str], limit: int = 5) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, a .pth/.pt file (weights_only), an artifact dir's model.safetensors or
    a hub repo's (`hf-hub:owner/repo`), with DDP `module.` and torch.compile `_orig_mod.` prefixes removed."""
    file = weights_file(path)
    if file.suffix == ".safetensors":
        try:
            state = safetensors.torch.load_file(file)
        except Exception as e:  # safetensors raises its own SafetensorError for a damaged file
            raise RecipeError(f"model.weights: {file}: not a readable safetensors file: {e}") from None
    elif file.suffix in (".pth", ".pt", ".bin"):
        state = _load_torch_file(file)
    else:
        raise RecipeError(f"model.weights: {file}: expected a .safetensors, .pth or .pt file, or a model artifact dir")
    return {_strip_prefixes(k): v for k, v in state.items()}


def _load_torch_file(file: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in several types
        raise RecipeError(f"model.weights: {file}: cannot be read as tensors only (weights_only=True): {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RecipeError(f"model.weights: {file}: expected a state_dict, or a dict holding one under "
                          "'state_dict' or 'model'")
    return obj


def _strip_prefixes(key: str) -> str:
    while key.startswith(("module.", "_orig_mod.")):
        key = key.partition(".")[2]
    return key


def load_weights(model: nn.Module, path: str, mode: str, in_channels: int) -> None:
    """Load initial weights. `update`: every key and shape must match. `finetune`: the head is re-initialised
    where the file's does not fit, a pretrained first conv is adapted to `in_channels`; anything else that does
    not fit is an error rather than a half-loaded model."""
    load_state(model, read_state_dict(path), mode, in_channels, path)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], mode: str, in_channels: int, source: str,
               key: str = "model.weights") -> None:
    """`load_weights` for tensors in hand; `source` names them in messages, after the recipe `key`."""
    model = unwrap(model)
    own = model.state_dict()
    where = f"{key}: {source}"
    _check_values(state, own, where)
    if mode == "update":
        _raise_on_mismatch(state, own, where, "does not fit the model exactly (train_mode = 'update'; "
                           "'finetune' replaces a classifier that does not fit)")
        model.load_state_dict(state, strict=True)
    elif mode == "finetune":
        model.load_state_dict(_finetune_subset(model, state, own, where, in_channels), strict=False)
    else:
        raise ValueError(f"load_weights: mode must be 'finetune' or 'update', got {mode!r}")
    info("model weights loaded from %s (%s)", source, mode)


def _check_values(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], where: str) -> None:
    """A file may come from anyone: every tensor meant for the model is of its kind (floating point where the
    model's is, integer where it counts) and finite; else nothing is loaded."""
    bad = []
    for k in sorted(k for k in state if k in own):
        v, mine = state[k], own[k]
        if v.is_complex() or v.dtype == torch.bool or v.is_floating_point() != mine.is_floating_point():
            bad.append(f"{k} ({v.dtype} for {mine.dtype})")
        elif v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad.append(f"{k} (not finite)")
    if bad:
        raise RecipeError(f"{where}: tensors that cannot be weights: {_listing(bad)}")


def _raise_on_mismatch(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], where: str, why: str,
                       ignore_missing: Callable[[str], bool] = lambda key: False) -> None:
    shapes = [f"{k} (file {_shape(v)}, model {_shape(own[k])})"
              for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state and not ignore_missing(k)]
    unexpected = sorted(k for k in state if k not in own)
    problems = [f"{what}: {_listing(keys)}" for what, keys in
                (("shape mismatch", shapes), ("missing from file", missing), ("not in model", unexpected)) if keys]
    if problems:
        raise RecipeError(f"{where} {why}; " + "; ".join(problems))


def _finetune_subset(model: nn.Module, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                     where: str, in_channels: int) -> dict[str, torch.Tensor]:
    head = classifier_prefix(model)
    conv_key = first_conv(model)[0] + ".weight"
    if own[conv_key].shape[1] != in_channels:
        raise ValueError(f"load_weights: the model takes {own[conv_key].shape[1]} channels, not {in_channels}")
    pretrained, target = state.get(conv_key), own[conv_key]
    if pretrained is not None and pretrained.shape[1] != in_channels \
            and pretrained.shape[:1] + pretrained.shape[2:] == target.shape[:1] + target.shape[2:]:
        state = {**state, conv_key: adapt_input_conv(pretrained, in_channels)}
        info("first conv %s %s -> %s adapted from %d to %d channels", conv_key, _shape(pretrained),
              _shape(target), pretrained.shape[1], in_channels)
    unfit = [k for k in state if _under(k, head) and (k not in own or state[k].shape != own[k].shape)]
    for key in unfit:
        info("head %s %s -> %s re-initialised", key, _shape(state[key]),
              _shape(own[key]) if key in own else "(not in model)")
    state = {k: v for k, v in state.items() if k not in unfit}
    _raise_on_mismatch(state, own, where, f"does not fit the model outside its classifier {head!r}",
                       ignore_missing=lambda key: _under(key, head))
    absent = [k for k in own if _under(k, head) and k not in state and k not in unfit]
    if absent:
        info("head %s not in %s: freshly initialised", _listing(absent), where.partition(": ")[2])
    return state


def apply_freeze(model: nn.Module, freeze: Union[str, list[str]]) -> list[str]:
    """Set requires_grad=False under "backbone" (all but the classifier) or the given module-name prefixes.
    Returns the frozen prefixes (module or parameter names), for `set_train_mode`."""
    model = unwrap(model)
    if freeze == "none":
        return []
    prefixes = _backbone(model, classifier_prefix(model)) if freeze == "backbone" else list(freeze)
    names = [n for n, _ in model.named_modules() if n] + [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(_under(n, prefix) for n in names):
            close = difflib.get_close_matches(prefix, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            top = [n for n, _ in model.named_children()]
            raise RecipeError(f"model.freeze: {prefix!r} matches no module of {type(model).__name__}{hint} "
                              f"(top-level modules: {_listing(top, 12)})")
    params = [p for n, p in model.named_parameters() if _under(n, prefixes)]
    if len(params) == len(list(model.parameters())):
        raise RecipeError(f"model.freeze: {freeze!r} freezes every parameter; nothing is left to train")
    for param in params:
        param.requires_grad_(False)
    trainable, total = count_parameters(model)
    info("frozen: %s; %s of %s parameters trainable", ", ".join(prefixes), f"{trainable:,}", f"{total:,}")
    return prefixes


def _backbone(module: nn.Module, head: str, prefix: str = "") -> list[str]:
    """Names covering everything outside `head`: whole children, descending only into the head's ancestors."""
    out = [prefix + n for n, _ in module.named_parameters(recurse=False)]
    for name, child in module.named_children():
        full = prefix + name
        if full == head:
            continue
        out += _backbone(child, head, full + ".") if head.startswith(full + ".") else [full]
    return out


def set_train_mode(model: nn.Module, frozen: list[str], freeze_bn: bool = False) -> None:
    """`model.train()`, but BatchNorm inside frozen parts stays in eval so its running statistics stay put;
    with `freeze_bn` (`model.freeze_bn`), every BatchNorm does (normalising with its running statistics, which
    no longer update; its weight and bias still train)."""
    model.train()
    for name, module in unwrap(model).named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (freeze_bn or _under(name, frozen)):
            module.eval()
