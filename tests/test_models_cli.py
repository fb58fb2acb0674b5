"""`imgcls-models` / `python -m imgcls.models`: the model names a recipe's `model.name` accepts, from the shell."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from imgcls.models.registry import available_models
from imgcls.models.registry import main as models_main
from imgcls.recipe import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_lists_every_registered_name_one_per_line(capsys):
    """Our three networks and torchvision's classification models (not its detection, segmentation, video or
    quantized ones), sorted; the expectation from torchvision itself, not from the registry."""
    import torchvision

    assert models_main([]) == 0
    listed = capsys.readouterr().out.splitlines()
    classification = set(torchvision.models.list_models(module=torchvision.models))
    assert listed == sorted({"small_cnn", "fast_cnn", "gem_resnet"} | classification)
    assert {"resnet18", "vit_b_16", "convnext_tiny"} <= set(listed)
    assert not {"fasterrcnn_resnet50_fpn", "fcn_resnet50", "r3d_18", "quantized_resnet18"} & set(listed)
    assert listed == available_models()


def test_a_part_of_the_name_filters_case_insensitively(capsys):
    assert models_main(["ResNet1"]) == 0
    assert capsys.readouterr().out.splitlines() == ["resnet101", "resnet152", "resnet18", "wide_resnet101_2"]


def test_a_filter_that_matches_nothing_says_so(capsys):
    assert models_main(["zzqq"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"no model name contains 'zzqq'; `imgcls-models` lists all {len(available_models())} names\n")


def test_runs_as_a_module_and_is_a_console_script():
    run = subprocess.run([sys.executable, "-m", "imgcls.models", "small_"], capture_output=True, text=True,
                         timeout=120)
    assert (run.returncode, run.stdout) == (0, "small_cnn\n"), run.stderr
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["imgcls-models"] == "imgcls.models.registry:main"
