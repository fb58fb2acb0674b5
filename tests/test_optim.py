"""Optimizer groups and learning-rate schedules: exact values."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from imgcls.training.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from imgcls.recipe import OptimConfig, ScheduleConfig
from imgcls.errors import RecipeError


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(4 * 6 * 6),
                         nn.Linear(4 * 6 * 6, 3))


def test_weight_decay_skips_norm_layers_and_biases():
    net = _net()
    decay, no_decay = param_groups(net, 0.05, decay_norm_and_bias=False)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[4].weight)}
    expected = [net[0].bias, net[1].weight, net[1].bias, net[3].weight, net[3].bias, net[4].bias]
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in expected}


def test_weight_decay_everywhere_when_asked_and_frozen_params_left_out():
    net = _net()
    net[0].weight.requires_grad_(False)
    groups = param_groups(net, 0.05, decay_norm_and_bias=True)
    assert len(groups) == 1 and len(groups[0]["params"]) == 7


@pytest.mark.parametrize("name,kind", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_build_optimizer(name, kind):
    opt = build_optimizer(OptimConfig(name=name, lr=0.01, weight_decay=0.1), _net())
    assert isinstance(opt, kind) and opt.defaults["lr"] == 0.01
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_cosine_with_warmup_values():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=1, min_lr_ratio=0.1)
    f = [lr_factor(cfg, s, steps_per_epoch=10, total_steps=30) for s in range(31)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert f[10] == pytest.approx(1.0)
    assert f[20] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[30] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_step_decay_is_lr_times_decay_every_n_epochs():
    cfg = ScheduleConfig(name="step", decay=0.5, decay_every_epochs=2)
    f = [lr_factor(cfg, s, steps_per_epoch=5, total_steps=50) for s in (0, 9, 10, 19, 20, 35)]
    assert f == [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]


def test_scheduler_drives_the_optimizer_lr():
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.2), _net())
    sched = build_scheduler(ScheduleConfig(name="constant", warmup_epochs=0.5), opt, steps_per_epoch=4,
                            total_steps=8)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1, 0.2, 0.2, 0.2])


def test_backbone_lr_scale_puts_the_head_first_at_lr_and_the_backbone_at_the_scaled_lr():
    net = _net()  # the head is the last Linear, net[4]
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.2, weight_decay=0.1, backbone_lr_scale=0.1), net)
    ids = [{id(p) for p in g["params"]} for g in opt.param_groups]
    assert ids == [{id(net[4].weight)}, {id(net[4].bias)}, {id(net[0].weight)},
                   {id(p) for p in (net[0].bias, net[1].weight, net[1].bias, net[3].weight, net[3].bias)}]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2, 0.2, 0.02, 0.02])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.1, 0.0]
    sched = build_scheduler(ScheduleConfig(name="cosine", warmup_epochs=1), opt, steps_per_epoch=4, total_steps=8)
    opt.step()
    sched.step()  # warm-up step 2 of 4: every group at half its own lr
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    assert sched.get_last_lr()[0] == pytest.approx(0.1)  # what the trainer logs: the head's (the recipe's) lr


def test_backbone_lr_scale_of_one_keeps_the_single_lr_groups():
    opt = build_optimizer(OptimConfig(name="adamw", lr=0.01, weight_decay=0.1, backbone_lr_scale=1.0), _net())
    assert len(opt.param_groups) == 2 and {g["lr"] for g in opt.param_groups} == {0.01}


def test_layer_decay_scales_each_timm_layer_below_the_head():
    """timm's group_matcher orders tf_efficientnet_lite0's parameters into layers 0 (stem) .. 17 (classifier);
    layer i trains at lr x backbone_lr_scale x decay^(17 - i), the head at lr, weight decay split as usual."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("tf_efficientnet_lite0", num_classes=5)
    cfg = OptimConfig(lr=0.01, layer_decay=0.8, backbone_lr_scale=0.5, weight_decay=1e-4)
    groups = build_optimizer(cfg, model).param_groups
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["classifier.weight"])] == groups[0]["lr"] == 0.01
    assert lr_of[id(named["conv_head.weight"])] == pytest.approx(0.01 * 0.5 * 0.8)  # layer 16
    assert lr_of[id(named["conv_stem.weight"])] == pytest.approx(0.01 * 0.5 * 0.8 ** 17)  # layer 0
    assert decay_of[id(named["conv_stem.weight"])] == 1e-4 and decay_of[id(named["bn1.weight"])] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_layer_decay_needs_a_model_that_orders_its_layers():
    with pytest.raises(RecipeError) as e:
        build_optimizer(OptimConfig(layer_decay=0.7), _net())
    assert str(e.value) == ("optim.layer_decay = 0.7: Sequential does not say how its layers are ordered (timm "
                            "models do, through group_matcher); use a timm: model, or set optim.layer_decay = 1.0 "
                            "(optim.backbone_lr_scale still scales the whole backbone)")
