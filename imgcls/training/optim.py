"""`[optim]` and `[schedule]`: the optimizer and its per-optimizer-step learning-rate schedule."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from imgcls.models.registry import classifier_prefix
from imgcls.recipe import OptimConfig, ScheduleConfig

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
    if cfg.backbone_lr_scale == 1.0:
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
