"""`[optim]` and `[schedule]`: the optimizer and its per-optimizer-step learning-rate schedule."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from imgcls.models.parts import classifier_prefix
from imgcls.recipe import OptimConfig, ScheduleConfig
from imgcls.errors import RecipeError

_NO_DECAY_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool,
                 within: Callable[[str], bool] = lambda name: True) -> list[dict]:
    """Weight decay on weights of conv/linear layers only (norm layers, biases, embeddings-like 1-D params
    are left alone), as timm and torchvision's references do. `within(module name)` picks the modules."""
    decay, no_decay = [], []
    for module_name, module in model.named_modules():
        if not within(module_name):
            continue
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            skip = isinstance(module, _NO_DECAY_TYPES) or name.endswith("bias") or p.ndim <= 1
            (no_decay if skip and not decay_norm_and_bias else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """One lr for the whole model, or with `backbone_lr_scale` != 1 the classifier head's groups first at `lr`
    (the lr that is logged) and the backbone's at `lr x backbone_lr_scale` (the fine-tuning split)."""
    if cfg.layer_decay != 1.0:
        groups = layer_decay_groups(cfg, model)
    elif cfg.backbone_lr_scale == 1.0:
        groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias)
    else:
        head = classifier_prefix(model)
        in_head = lambda name: name == head or name.startswith(head + ".")  # noqa: E731
        groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias, in_head)
        backbone = param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias, lambda name: not in_head(name))
        groups += [{**g, "lr": cfg.lr * cfg.backbone_lr_scale} for g in backbone if g["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def layer_decay_groups(cfg: OptimConfig, model: nn.Module) -> list[dict]:
    """`optim.layer_decay`: the head at lr; a parameter in layer i of L (timm's `group_matcher`, fine-grained,
    as timm's `param_groups_layer_decay` counts them, the head in the top one) at lr x backbone_lr_scale x
    layer_decay^(L - i). Weight decay split as `param_groups`. Head groups first: their lr is the logged one."""
    from timm.models import group_parameters

    core = getattr(model, "_orig_mod", model)  # torch.compile's wrapper, if any
    if not hasattr(core, "group_matcher"):
        raise RecipeError(f"optim.layer_decay = {cfg.layer_decay}: {type(core).__name__} does not say how its layers "
                          "are ordered (timm models do, through group_matcher); use a timm: model, or set "
                          "optim.layer_decay = 1.0 (optim.backbone_lr_scale still scales the whole backbone)")
    layer_of = group_parameters(core, core.group_matcher(coarse=False), reverse=True)
    top = max(layer_of.values())
    head = classifier_prefix(model)
    in_head = lambda name: name == head or name.startswith(head + ".")  # noqa: E731
    buckets: dict[tuple[float, bool], list] = {}
    for module_name, module in core.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = f"{module_name}.{name}" if module_name else name
            scale = 1.0 if in_head(full) else cfg.backbone_lr_scale * cfg.layer_decay ** (top - layer_of[full])
            no_decay = isinstance(module, _NO_DECAY_TYPES) or name.endswith("bias") or p.ndim <= 1
            buckets.setdefault((scale, no_decay and not cfg.decay_norm_and_bias), []).append(p)
    return [{"params": params, "lr": cfg.lr * scale, "weight_decay": 0.0 if skip else cfg.weight_decay}
            for (scale, skip), params in sorted(buckets.items(), key=lambda kv: (-kv[0][0], kv[0][1]))]


def lr_factor(cfg: ScheduleConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the base lr after `step` optimizer steps (linear warmup, then the schedule)."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":  # the original tool: lr x decay every N epochs
        return cfg.decay ** (step // (cfg.decay_every_epochs * steps_per_epoch))
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch, total_steps))
