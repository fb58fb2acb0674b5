"""Tests for imgcls.models.registry: every family forward and backward, weights loading, freezing. CPU only,
small inputs."""
from __future__ import annotations

import logging

import pytest
import safetensors.torch
import torch
import torchvision
from accelerate import init_empty_weights
from torch import nn

from imgcls.models.gem import GeM
from imgcls.models.parts import classifier_prefix, count_parameters, first_conv
from imgcls.models.registry import (accepted_args, available_models, build_model, check_model_args)
from imgcls.models.weights import apply_freeze, load_weights, set_train_mode
from imgcls.recipe import ModelConfig
from imgcls.errors import RecipeError

NUM_CLASSES = 10

# (name, args, image side, expected classifier prefix): our models and one of each torchvision family
FAMILIES = [
    ("small_cnn", {"norm": "batch"}, 28, "head"),
    ("small_cnn", {"norm": "group"}, 28, "head"),
    ("small_cnn", {"norm": "none"}, 28, "head"),
    ("small_cnn", {"blocks": 3}, 28, "head"),
    ("fast_cnn", {}, 32, "head"),
    ("gem_resnet", {}, 32, "fc"),
    ("resnet18", {}, 32, "fc"),
    ("vgg11", {}, 32, "classifier"),
    ("mobilenet_v3_small", {}, 32, "classifier"),
    ("efficientnet_b0", {}, 32, "classifier"),
    ("convnext_tiny", {}, 32, "classifier"),
    ("vit_b_16", {}, 32, "heads"),
    ("swin_t", {}, 32, "head"),
    ("regnet_y_400mf", {}, 32, "fc"),
    ("densenet121", {}, 32, "classifier"),
    ("shufflenet_v2_x0_5", {}, 32, "fc"),
    ("squeezenet1_0", {}, 32, "classifier"),
    ("mnasnet0_5", {}, 32, "classifier"),
]
# the rest of the families, and the two whose auxiliary heads we switch off: one channel count is enough
EXTRAS = [("alexnet", {}, 64, "classifier"), ("googlenet", {}, 32, "fc"), ("inception_v3", {}, 75, "fc")]
CASES = [(*f, c) for f in FAMILIES for c in (1, 3)] + [(*f, 1) for f in EXTRAS]


def _cfg(name: str, **fields) -> ModelConfig:
    return ModelConfig(name=name, **fields)


@pytest.mark.parametrize("name,args,side,head,channels", CASES,
                         ids=[f"{c[0]}-{c[1].get('norm', 'default')}-{c[4]}ch" for c in CASES])
def test_forward_backward(name, args, side, head, channels):
    torch.manual_seed(0)
    model = build_model(_cfg(name, args=args), NUM_CLASSES, channels, (side, side))
    assert first_conv(model)[1].in_channels == channels
    assert classifier_prefix(model, NUM_CLASSES) == head
    model.train()
    logits = model(torch.randn(2, channels, side, side))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, NUM_CLASSES)
    nn.functional.cross_entropy(logits, torch.tensor([1, 7])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"


def test_every_registered_model_builds_for_one_channel_with_a_findable_head():
    names = available_models()
    assert {"small_cnn", "gem_resnet", "resnet18", "vit_b_16", "swin_t", "maxvit_t"} <= set(names)
    assert not {"fasterrcnn_resnet50_fpn", "fcn_resnet50", "r3d_18", "raft_small", "quantized_resnet18"} & set(names)
    for name in names:
        with init_empty_weights():  # parameters on the meta device: structure only, no memory
            model = build_model(_cfg(name), 7, 1, (224, 224))
        assert first_conv(model)[1].in_channels == 1, name
        head = model.get_submodule(classifier_prefix(model, 7))
        outputs = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
        assert getattr(outputs, "out_features", getattr(outputs, "out_channels", None)) == 7, name


def test_small_cnn_takes_any_input_its_blocks_can_halve():
    model = build_model(_cfg("small_cnn", args={"width": 8}), 3, 1, (4, 12)).eval()
    assert model(torch.zeros(4, 1, 4, 12)).shape == (4, 3)
    assert model.head.in_features == 16
    deeper = build_model(_cfg("small_cnn", args={"width": 8, "blocks": 3}), 3, 1, (8, 8)).eval()
    assert deeper(torch.zeros(2, 1, 8, 8)).shape == (2, 3) and deeper.head.in_features == 32
    with pytest.raises(RecipeError) as e:
        build_model(_cfg("small_cnn", args={"blocks": 4}), 3, 1, (8, 12))
    assert str(e.value) == ("model.args.blocks: 4 blocks halve the image 4 times, which 8x12 cannot take; "
                            "use 1 to 3")
    no_norm = build_model(_cfg("small_cnn", args={"norm": "none"}), 3, 1, (8, 8))
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in no_norm.modules())


def test_gem_pooling():
    x = torch.rand(2, 3, 5, 4) + 0.1
    assert torch.allclose(GeM(p=1.0)(x), x.mean(dim=(2, 3), keepdim=True), atol=1e-6)
    assert torch.allclose(GeM(p=60.0)(x), x.amax(dim=(2, 3), keepdim=True), rtol=0.05)
    gem = GeM()
    assert gem.p.item() == 3.0 and gem.eps == 1e-6 and gem.p.requires_grad


def test_unknown_name():
    with pytest.raises(RecipeError) as e:
        check_model_args(_cfg("resnet81"))
    assert str(e.value) == ("model.name: unknown model 'resnet81'; did you mean 'resnet18', 'resnet152' or "
                            "'resnet101'? List the model names with `imgcls-models` (`imgcls-models resnet` for "
                            "those containing 'resnet').")
    with pytest.raises(RecipeError) as e:
        build_model(_cfg("zzqq"), NUM_CLASSES, 1, (28, 28))
    assert str(e.value) == "model.name: unknown model 'zzqq'. List the model names with `imgcls-models`."


def test_bad_args():
    with pytest.raises(RecipeError) as e:
        check_model_args(_cfg("small_cnn", args={"widht": 16}))
    assert str(e.value) == ("model.args.widht: unexpected argument 'widht' for small_cnn; did you mean 'width'? "
                            "accepted: width, dropout, norm, blocks")
    with pytest.raises(RecipeError) as e:
        check_model_args(_cfg("small_cnn", args={"widht": 16, "depth": 3}))
    assert "model.args.widht" in str(e.value) and "model.args.depth" in str(e.value)
    with pytest.raises(RecipeError, match=r"^model.args.norm: 'layer' is not one of batch, group, none$"):
        check_model_args(_cfg("small_cnn", args={"norm": "layer"}))
    with pytest.raises(RecipeError, match=r"^model.args.num_classes: set from the data"):
        check_model_args(_cfg("resnet18", args={"num_classes": 5}))
    with pytest.raises(RecipeError, match=r"^model.args.stochastic_depth_prob: fixed by torchvision's swin_t"):
        check_model_args(_cfg("swin_t", args={"stochastic_depth_prob": 0.1}))
    with pytest.raises(RecipeError, match=r"^model: cannot build gem_resnet .*'vgg11' is not a torchvision ResNet"):
        check_model_args(_cfg("gem_resnet", args={"backbone": "vgg11"}))
    check_model_args(_cfg("vit_b_16", args={"dropout": 0.1}))
    assert accepted_args("gem_resnet") == ["backbone", "p"]


def test_size_errors_name_the_model_and_the_size():
    with pytest.raises(RecipeError, match=r"vit_b_16 needs a square image, got image_size \[32, 48\]"):
        build_model(_cfg("vit_b_16"), NUM_CLASSES, 3, (32, 48))
    with pytest.raises(RecipeError, match=r"cannot build vit_b_16 with args \{\} for 3-channel 30x30 images"):
        build_model(_cfg("vit_b_16"), NUM_CLASSES, 3, (30, 30))
    with pytest.raises(RecipeError, match=r"cannot build maxvit_t .* 64x64 images: .*not divisible by partition size"):
        build_model(_cfg("maxvit_t"), NUM_CLASSES, 1, (64, 64))


def test_args_are_passed_through():
    model = build_model(_cfg("small_cnn", args={"width": 4, "dropout": 0.5}), NUM_CLASSES, 1, (28, 28))
    assert model.head.in_features == 8 and model.dropout.p == 0.5
    gem = build_model(_cfg("gem_resnet", args={"backbone": "resnet18", "p": 2.0}), NUM_CLASSES, 3, (32, 32))
    assert gem.fc[0].p.item() == 2.0 and gem.fc[2].in_features == 512


# ---- weights --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def imagenet_like() -> dict[str, torch.Tensor]:
    """A 1000-class 3-channel resnet18 state_dict, as a DDP-saved checkpoint would hold it."""
    torch.manual_seed(1)
    net = torchvision.models.resnet18(num_classes=1000)
    with torch.no_grad():  # make BN running stats distinct from a fresh model's
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return {k: v.clone() for k, v in net.state_dict().items()}


def _save(state: dict[str, torch.Tensor], path, fmt: str):
    prefixed = {f"module.{k}": v for k, v in state.items()}
    if fmt == "pth":
        torch.save(prefixed, path / "w.pth")
        return path / "w.pth"
    if fmt == "pth-wrapped":
        torch.save({"state_dict": prefixed, "epoch": 3}, path / "w.pt")
        return path / "w.pt"
    if fmt == "artifact":
        safetensors.torch.save_file(state, path / "model.safetensors")
        return path
    safetensors.torch.save_file(prefixed, path / "w.safetensors")
    return path / "w.safetensors"


def _resnet18(in_channels: int = 3) -> nn.Module:
    torch.manual_seed(2)
    return build_model(_cfg("resnet18"), NUM_CLASSES, in_channels, (32, 32))


@pytest.mark.parametrize("fmt", ["pth", "pth-wrapped", "safetensors", "artifact"])
def test_finetune_keeps_backbone_and_reinitialises_head(imagenet_like, tmp_path, fmt, caplog):
    path = _save(imagenet_like, tmp_path, fmt)
    model = _resnet18()
    fresh_head = model.fc.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="imgcls.models"):
        load_weights(model, str(path), "finetune", in_channels=3)
    loaded = model.state_dict()
    for key, tensor in imagenet_like.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], tensor), key
    assert loaded["fc.weight"].shape == (10, 512)
    assert torch.equal(loaded["fc.weight"], fresh_head)
    assert not torch.equal(loaded["fc.weight"], imagenet_like["fc.weight"][:10])
    assert "head fc.weight [1000, 512] -> [10, 512] re-initialised" in caplog.text


def test_update_needs_an_exact_match(imagenet_like, tmp_path):
    path = _save(imagenet_like, tmp_path, "pth")
    with pytest.raises(RecipeError) as e:
        load_weights(_resnet18(), str(path), "update", in_channels=3)
    assert str(e.value).startswith(f"model.weights: {path} does not fit the model exactly")
    assert "shape mismatch: fc.weight (file [1000, 512], model [10, 512]), fc.bias (file [1000], model [10])" \
        in str(e.value)
    same = {k: v for k, v in imagenet_like.items() if not k.startswith("fc.")}
    same |= {"fc.weight": torch.randn(10, 512), "fc.bias": torch.randn(10)}
    model = _resnet18()
    load_weights(model, str(_save(same, tmp_path, "safetensors")), "update", in_channels=3)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in same.items())


def test_finetune_refuses_a_checkpoint_of_another_architecture(tmp_path):
    state = torchvision.models.resnet34(num_classes=1000).state_dict()
    path = _save(state, tmp_path, "safetensors")
    with pytest.raises(RecipeError) as e:
        load_weights(_resnet18(), str(path), "finetune", in_channels=3)
    assert str(e.value).startswith(f"model.weights: {path} does not fit the model outside its classifier 'fc'; "
                                   "not in model: layer1.2.bn1.bias, layer1.2.bn1.num_batches_tracked, ")
    assert "shape mismatch" not in str(e.value) and "missing from file" not in str(e.value)


def test_rgb_weights_into_a_one_channel_model(imagenet_like, tmp_path, caplog):
    model = _resnet18(in_channels=1)
    with caplog.at_level(logging.INFO, logger="imgcls.models"):
        load_weights(model, str(_save(imagenet_like, tmp_path, "pth")), "finetune", in_channels=1)
    expected = imagenet_like["conv1.weight"].sum(dim=1, keepdim=True)
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    assert torch.equal(model.conv1.weight.detach(), expected)
    assert torch.equal(model.layer4[1].bn2.running_var, imagenet_like["layer4.1.bn2.running_var"])
    assert "first conv conv1.weight [64, 3, 7, 7] -> [64, 1, 7, 7] adapted from 3 to 1 channels" in caplog.text


def test_torchvision_resnet_weights_finetune_into_gem_resnet(imagenet_like, tmp_path):
    model = build_model(_cfg("gem_resnet", args={"backbone": "resnet18"}), NUM_CLASSES, 1, (32, 32))
    fresh_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("fc.")}
    load_weights(model, str(_save(imagenet_like, tmp_path, "pth")), "finetune", in_channels=1)
    loaded = model.state_dict()
    assert torch.equal(loaded["layer3.0.downsample.0.weight"], imagenet_like["layer3.0.downsample.0.weight"])
    assert all(torch.equal(loaded[k], v) for k, v in fresh_head.items())


def test_unreadable_weights(tmp_path):
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # a pickled module, not tensors
    (tmp_path / "weights.h5").write_bytes(b"\0")
    for path, text in [(tmp_path / "pickled.pth", "cannot be read as tensors only (weights_only=True)"),
                       (tmp_path / "none.pth", "file not found"),
                       (tmp_path, "is a directory without model.safetensors"),
                       (tmp_path / "weights.h5", "expected a .safetensors, .pth or .pt file")]:
        with pytest.raises(RecipeError, match=r"^model.weights: ") as e:
            load_weights(_resnet18(), str(path), "finetune", in_channels=3)
        assert text in str(e.value) and str(path) in str(e.value)


# ---- freezing -------------------------------------------------------------------------------------------

def test_frozen_backbone_stays_put_while_the_head_learns():
    model = _resnet18()
    frozen = apply_freeze(model, "backbone")
    assert frozen == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    assert count_parameters(model) == (512 * 10 + 10, sum(p.numel() for p in model.parameters()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1, momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(3)
    for _ in range(3):
        set_train_mode(model, frozen)
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.training and model.fc.training and not model.layer2[0].bn1.training
    after = model.state_dict()
    for key, tensor in before.items():
        if key.startswith("fc."):
            assert not torch.equal(after[key], tensor), key
        else:
            assert torch.equal(after[key], tensor), key


def test_backbone_of_models_with_nested_heads_and_loose_parameters():
    with init_empty_weights():
        vit = build_model(_cfg("vit_b_16"), NUM_CLASSES, 3, (32, 32))
        vgg = build_model(_cfg("vgg11"), NUM_CLASSES, 3, (32, 32))
    assert apply_freeze(vit, "backbone") == ["class_token", "conv_proj", "encoder"]
    assert {n for n, p in vit.named_parameters() if p.requires_grad} == {"heads.head.weight", "heads.head.bias"}
    assert apply_freeze(vgg, "backbone") == ["features", "avgpool"]
    assert all(p.requires_grad == n.startswith("classifier.") for n, p in vgg.named_parameters())


def test_freeze_by_prefix_and_bad_prefix():
    model = _resnet18()
    assert apply_freeze(model, "none") == [] and count_parameters(model)[0] == count_parameters(model)[1]
    assert apply_freeze(model, ["conv1", "layer1.0"]) == ["conv1", "layer1.0"]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1.weight"} | {n for n, _ in model.named_parameters() if n.startswith("layer1.0.")}
    with pytest.raises(RecipeError) as e:
        apply_freeze(_resnet18(), ["layr1"])
    assert str(e.value) == ("model.freeze: 'layr1' matches no module of ResNet; did you mean 'layer1'? (top-level "
                            "modules: conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4, avgpool, fc)")
    with pytest.raises(RecipeError, match="'layer1.0.conv' matches no module"):  # prefixes end at a dot
        apply_freeze(_resnet18(), ["layer1.0.conv"])
    with pytest.raises(RecipeError, match="freezes every parameter"):
        apply_freeze(_resnet18(), ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"])


def test_count_parameters():
    model = build_model(_cfg("small_cnn", args={"width": 4, "norm": "none"}), 3, 1, (28, 28))
    convs = (1 * 4 * 9 + 4) + (4 * 4 * 9 + 4) + (4 * 8 * 9 + 8) + (8 * 8 * 9 + 8)
    assert count_parameters(model) == (convs + 8 * 3 + 3, convs + 8 * 3 + 3)
    assert count_parameters(_resnet18())[1] == 11_689_512 - 990 * 513  # torchvision's 1000-class count
