"""fast_cnn (imgcls.models.fast_cnn): the architecture it promises, its Dirac start, and its errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from imgcls.models.registry import build_model
from imgcls.models.parts import count_parameters
from imgcls.recipe import ModelConfig
from imgcls.errors import RecipeError


def _build(channels: int = 3, side: tuple[int, int] = (32, 32), **args) -> nn.Module:
    return build_model(ModelConfig(name="fast_cnn", args=args), 10, channels, side)


def test_default_architecture_and_parameter_count():
    model = _build()
    # stem 2x2 conv 3->24 + BN; groups (24->32, 32->128, 128->128) of two 3x3 convs + two BNs; head 128->10
    stem = 3 * 24 * 4 + 2 * 24
    groups = sum(9 * cin * cout + 9 * cout * cout + 4 * cout for cin, cout in ((24, 32), (32, 128), (128, 128)))
    assert count_parameters(model) == (stem + groups + 128 * 10,) * 2 == (498128, 498128)
    assert [g[0].out_channels for g in model.groups] == [32, 128, 128]
    assert model.head.bias is None and model.head_scale == pytest.approx(1 / 9)
    assert all(m.momentum == 0.4 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_feature_map_sides_for_cifar_and_mnist_sizes():
    for channels, side, sides in ((3, 32, [15, 7, 3]), (1, 28, [13, 6, 3])):
        model = _build(channels, (side, side)).eval()
        x, seen = model.stem(torch.zeros(1, channels, side, side)), []
        assert x.shape[-1] == side - 1
        for group in model.groups:
            x = group(x)
            seen.append(x.shape[-1])
        assert seen == sides


def test_each_3x3_conv_starts_as_identity_on_its_first_input_count_channels():
    model = _build(widths=[16, 32])  # 24 -> 16: fewer outputs than inputs, then more
    for group in model.groups:
        for conv in (group[0], group[4]):
            w, n = conv.weight.detach(), min(conv.in_channels, conv.out_channels)
            identity = torch.zeros(n, conv.in_channels, 3, 3)
            identity[range(n), range(n), 1, 1] = 1
            assert torch.equal(w[:n], identity)
            if n < conv.out_channels:
                assert w[n:].abs().sum() > 0  # the other channels keep their random start


def test_widths_and_head_scale_are_taken_and_logits_are_scaled():
    torch.manual_seed(0)
    model = _build(1, (28, 28), widths=[8, 16], stem=6, head_scale=0.5).eval()
    assert model.stem[0].out_channels == 6 and model.head.in_features == 16
    x = torch.randn(3, 1, 28, 28)
    features = model.pool(model.groups(model.stem(x))).flatten(1)
    torch.testing.assert_close(model(x), model.head(features) * 0.5)


def test_errors_name_the_argument_and_the_fix():
    with pytest.raises(RecipeError) as e:
        _build(3, (8, 12))
    assert str(e.value) == ("model.args.widths: 3 groups halve the image 3 times, which 8x12 cannot take; "
                            "use at most 2 widths")
    with pytest.raises(RecipeError) as e:
        _build(widths=[])
    assert str(e.value) == ("model.args.widths: [] (stem 24): give one positive width per group, "
                            "e.g. [32, 128, 128]")
    with pytest.raises(RecipeError) as e:
        _build(bn_momentum=0.0)
    assert str(e.value).startswith("model.args.bn_momentum: 0.0 is outside (0, 1]")
