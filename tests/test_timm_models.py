"""timm models as `model.name = "timm:<name>"`: forward and backward for 1 and 3 channels on tiny inputs, the
classifier found for freezing, argument checks with their exact texts, `imgcls-models --timm`, and the artifact
round trip (rebuilt from config.json, exported to ONNX and TorchScript with the parity check)."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

from conftest import write_class_folders
from imgcls.inference.artifact import load_artifact, save_artifact
from imgcls.inference.export import main as export_main
from imgcls.models.registry import accepted_args, build_model, check_model_args
from imgcls.models.parts import classifier_prefix, first_conv
from imgcls.models.registry import main as models_main
from imgcls.recipe import ModelConfig, load_recipe, recipe_to_toml
from imgcls.errors import RecipeError
from imgcls.data.transforms import Preprocess
from imgcls.models.weights import apply_freeze

NUM_CLASSES = 5

# (name, args, image side, classifier prefix): a CNN, an EfficientNet, a ConvNeXt head, a ViT built for the size
FAMILIES = [
    ("timm:resnet18", {}, 32, "fc"),
    ("timm:efficientnet_lite0", {"drop_rate": 0.1}, 32, "classifier"),
    ("timm:test_convnext", {}, 32, "head.fc"),
    ("timm:test_vit", {}, 32, "head"),
]
CASES = [(*f, c) for f in FAMILIES for c in (1, 3)]


def _cfg(name: str, **fields) -> ModelConfig:
    return ModelConfig(name=name, **fields)


@pytest.mark.parametrize("name,args,side,head,channels", CASES, ids=[f"{c[0][5:]}-{c[4]}ch" for c in CASES])
def test_forward_backward(name, args, side, head, channels):
    torch.manual_seed(0)
    model = build_model(_cfg(name, args=args), NUM_CLASSES, channels, (side, side))
    assert first_conv(model)[1].in_channels == channels
    assert classifier_prefix(model, NUM_CLASSES) == head
    model.train()
    logits = model(torch.randn(2, channels, side, side))
    assert logits.shape == (2, NUM_CLASSES)
    nn.functional.cross_entropy(logits, torch.tensor([1, 4])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: {pname}"


def test_args_reach_the_model_and_vits_are_built_for_the_image_size():
    model = build_model(_cfg("timm:efficientnet_lite0", args={"drop_rate": 0.3, "exportable": True}), 3, 3, (32, 32))
    assert model.drop_rate == 0.3
    vit = build_model(_cfg("timm:test_vit"), 3, 3, (32, 48))
    assert vit.patch_embed.img_size == (32, 48) and vit(torch.zeros(1, 3, 32, 48)).shape == (1, 3)


def test_freezing_the_backbone_leaves_the_timm_head():
    model = build_model(_cfg("timm:test_convnext"), NUM_CLASSES, 3, (32, 32))
    frozen = apply_freeze(model, "backbone")
    assert frozen == ["stem", "stages", "norm_pre", "head.global_pool", "head.norm", "head.flatten", "head.pre_logits",
                      "head.drop"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.fc.weight", "head.fc.bias"}


# ---------------------------------------------------------------- names and arguments
@pytest.mark.parametrize("cfg, expected", [
    (_cfg("timm:resnt18"),
     "model.name: unknown timm model 'resnt18'; did you mean 'timm:resnet18', 'timm:resnet18d' or "
     "'timm:skresnet18'? List timm's names with `imgcls-models --timm 'resn*'` (add --pretrained for those with "
     "pretrained weights)."),
    (_cfg("timm:zzqq"),
     "model.name: unknown timm model 'zzqq'. List timm's names with `imgcls-models --timm 'zzqq*'` (add "
     "--pretrained for those with pretrained weights)."),
    (_cfg("timm:test_resnet.in1k"),
     "model.name: timm's test_resnet has no pretrained tag 'in1k'; its tags: r160_in1k"),
    (_cfg("timm:resnet18", args={"drop_rat": 0.1}),
     "model.args.drop_rat: unexpected argument 'drop_rat' for timm:resnet18; did you mean 'drop_rate'? accepted: "
     "output_stride, global_pool, cardinality, base_width, stem_width, stem_type, replace_stem_pool, "
     "block_reduce_first, down_kernel_size, avg_down, channels, act_layer, norm_layer, aa_layer, drop_rate, "
     "drop_path_rate, drop_block_rate, zero_init_last, block_args, scriptable, exportable, no_jit"),
    (_cfg("timm:resnet18", args={"in_chans": 1}),
     "model.args.in_chans: set from the data and the recipe, not from [model] args"),
    (_cfg("timm:vit_small_patch16_224", args={"img_size": 32}),
     "model.args.img_size: set from the data and the recipe, not from [model] args"),
    (_cfg("timm:efficientnet_lite0", args={"stem_size": 16}),
     "model.args.stem_size: fixed by timm's efficientnet_lite0 itself; it cannot be set in [model] args"),
    (_cfg("timm:regnetx_002", args={"widht": 1}),  # RegNet takes **kwargs: timm's own TypeError names the key
     "model.args.widht: unexpected argument 'widht' for timm:regnetx_002 (RegNetCfg.__init__() got an unexpected "
     "keyword argument 'widht')"),
])
def test_bad_names_and_args(cfg, expected):
    with pytest.raises(RecipeError) as e:
        check_model_args(cfg)
    assert str(e.value) == expected


def test_the_build_names_a_refused_argument_too():
    with pytest.raises(RecipeError) as e:
        build_model(_cfg("timm:regnetx_002", args={"widht": 1}), NUM_CLASSES, 3, (32, 32))
    assert str(e.value).startswith("model.args.widht: unexpected argument 'widht' for timm:regnetx_002 (")
    with pytest.raises(RecipeError, match=r"^model.args.stem_size: fixed by timm's efficientnet_lite0 itself"):
        build_model(_cfg("timm:efficientnet_lite0", args={"stem_size": 16}), NUM_CLASSES, 3, (32, 32))


def test_accepted_args():
    args = accepted_args("timm:vit_small_patch16_224")
    assert {"drop_rate", "drop_path_rate", "global_pool", "class_token", "exportable"} <= set(args)
    assert not {"num_classes", "in_chans", "img_size", "device", "dtype", "pretrained"} & set(args)
    assert accepted_args("timm:regnetx_002") is None  # its class passes **kwargs on to RegNetCfg
    check_model_args(_cfg("timm:regnetx_002", args={"w0": 16}))
    check_model_args(_cfg("timm:vit_small_patch16_224.augreg_in1k", args={"drop_path_rate": 0.1}))


# ---------------------------------------------------------------- imgcls-models --timm
def test_cli_lists_timm_names_by_wildcard(capsys):
    assert models_main(["--timm", "convnext_t*"]) == 0
    assert capsys.readouterr().out.splitlines() == ["timm:convnext_tiny", "timm:convnext_tiny_hnf"]
    assert models_main(["--timm", "resnet18*", "--pretrained"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "timm:resnet18.a1_in1k" in out and "timm:resnet18.tv_in1k" in out
    assert all(n.startswith(("timm:resnet18.", "timm:resnet18d.")) for n in out)
    assert models_main(["--timm"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(timm.list_models())


def test_cli_timm_mistakes(capsys):
    assert models_main(["--timm", "zzqq*", "--pretrained"]) == 1
    assert capsys.readouterr().err == ("no timm model with pretrained weights matches 'zzqq*'; `imgcls-models --timm` "
                                       "lists them all\n")
    for argv, message in ((["--pretrained"], "--pretrained goes with --timm"),
                          (["res", "--timm"], "PART filters imgcls' own and torchvision's names; for timm's, use "
                                              "--timm '*res*'")):
        with pytest.raises(SystemExit) as e:
            models_main(argv)
        assert e.value.code == 2 and capsys.readouterr().err.endswith(f"imgcls-models: error: {message}\n")


# ---------------------------------------------------------------- the artifact round trip
def test_a_timm_artifact_is_rebuilt_from_its_config_and_exports(tmp_path):
    classes = ["a", "b", "c"]
    write_class_folders(tmp_path / "imgs" / "train", classes, 4, size=32, mode="RGB")
    write_class_folders(tmp_path / "imgs" / "val", classes, 4, size=32, seed=1, mode="RGB")
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(f'name = "r"\n[data]\nsource = "folder"\nroot = "{tmp_path / "imgs"}"\n'
                           'image_size = [32, 32]\n[model]\nname = "timm:test_resnet.r160_in1k"\n'
                           'args = { drop_rate = 0.1 }\n[export]\nparity_images = 6\n')
    recipe = load_recipe(recipe_file)
    torch.manual_seed(0)
    model = build_model(recipe.model, len(classes), 3, (32, 32)).eval()
    config = {"model": {"name": recipe.model.name, "args": dict(recipe.model.args), "num_classes": len(classes),
                        "in_channels": 3},
              "class_names": classes, "preprocess": Preprocess.from_data(recipe.data).to_dict(), "temperature": 1.0}
    artifact = tmp_path / "artifact"
    save_artifact(artifact, model, config, recipe_to_toml(recipe))
    rebuilt, saved = load_artifact(artifact)
    assert saved["model"]["name"] == "timm:test_resnet.r160_in1k"
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(rebuilt(x), model(x))
    assert export_main([str(artifact), "--format", "onnx", "torchscript"]) == 0
    report = json.loads((artifact / "export" / "export_report.json").read_text())
    assert report["passed"] is True and set(report["formats"]) == {"onnx", "torchscript"}
    assert report["images"]["n"] == 6
