"""train.test_tta: the test split also evaluated on the mean softmax of each image and its horizontal flip."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from conftest import write_recipe
from helpers import metrics_rows, only_run, train_inprocess
from imgcls.training.metrics import evaluate


class _Images:
    def model_input(self, images, positions):
        return images.float()


class _Loader(list):
    dataset = _Images()


def test_flip_tta_is_the_mean_softmax_of_the_image_and_its_flip():
    torch.manual_seed(0)
    images, labels = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    loader = _Loader([(images[:4], labels[:4], torch.arange(4)), (images[4:], labels[4:], torch.arange(4, 6))])
    accelerator = Accelerator(cpu=True)
    tta = evaluate(model, loader, accelerator, 3, keep_logits=True, flip_tta=True)
    with torch.no_grad():
        probs = (model(images).softmax(1) + model(images.flip(-1)).softmax(1)) / 2
        plain_logits = model(images)
    torch.testing.assert_close(tta["logits"], probs.log())
    assert tta["top1"] == (probs.argmax(1) == labels).sum().item() / 6
    assert tta["loss"] == pytest.approx(F.nll_loss(probs.log(), labels).item(), rel=1e-5)
    plain = evaluate(model, loader, accelerator, 3, keep_logits=True)
    torch.testing.assert_close(plain["logits"], plain_logits)
    assert not torch.allclose(plain["logits"].softmax(1), probs)  # the flip changed this model's answers


def test_a_run_with_test_tta_logs_both_test_rows_and_results(tmp_path, image_folder):
    recipe = write_recipe(tmp_path / "tiny.toml", f'source = "folder"\nroot = "{image_folder}"')
    assert train_inprocess(recipe, "train.test_tta=true") == 0
    run = only_run(tmp_path / "runs")
    rows = metrics_rows(run)
    test = [r for r in rows if r["event"] == "test"]
    tta = [r for r in rows if r["event"] == "test_tta"]
    assert len(test) == 1 and len(tta) == 1 and tta[0]["n"] == test[0]["n"] == 40
    results = json.loads((run / "results.json").read_text())
    assert results["test_tta"]["top1"] == tta[0]["top1"] and results["test"]["top1"] == test[0]["top1"]
    assert "test_tta top1" in (run / "train.log").read_text()
