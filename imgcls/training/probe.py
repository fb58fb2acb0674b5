"""`[probe]`: stage 1 of probe-then-fine-tune, a new linear head fitted on the frozen backbone's cached features.

    fit, row, val = probe_stage(model, datasets, splits, recipe, accelerator)   # the head is set in `model`

`probe_stage` gets the features of the train views and of val (`features.py`: computed once, cached), fits,
sets the model's last Linear on every process (the main process fits, the others receive its tensors) and
returns the fit, a `probe` row for metrics.jsonl and val's metrics from the features.

An L2-regularised multinomial logistic regression, solved to convergence by L-BFGS in float64 on standardised
features (Kumar et al., "Fine-Tuning can Distort Pretrained Features", ICLR 2022, fit the LP stage of LP-FT
this way). Each strength in `probe.l2` is fitted from zero; the one with the lowest validation cross-entropy
is kept (a proper score: it also picks the best-calibrated head, which is the start stage 2 wants; the issue's
over-confident heads came from fitting for accuracy alone). The standardisation is folded into the returned
weight and bias, so the head takes the raw features: `logits = x @ weight.T + bias`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import time

import torch
import torch.nn.functional as F
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import broadcast
from torch import nn

from imgcls.data.fingerprint import cache_root, frame_inputs
from imgcls.data.loaders import DataSplits, Images, make_loader
from imgcls.data.store import working_size
from imgcls.data.store_disk import open_store
from imgcls.data.transforms import Preprocess
from imgcls.models.parts import classifier_prefix
from imgcls.recipe import Recipe
from imgcls.errors import RecipeError
from imgcls.training.features import VIEW_EPOCH, FeatureCache, model_identity
from imgcls.training.metrics import from_logits


@dataclass
class ProbeFit:
    weight: torch.Tensor  # float32 [classes, features]
    bias: torch.Tensor  # float32 [classes]
    l2: float
    train_loss: float  # cross-entropy of the chosen head on the train features (without the penalty)
    val_loss: float
    val_top1: float
    tried: list[dict] = field(default_factory=list)  # every l2 with its train/val loss and val top-1


def _fit_one(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int,
             class_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y, weight=class_weight) + l2 * (w * w).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach(), b.detach()


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
              num_classes: int, l2_grid: list[float], max_iter: int,
              class_weight: torch.Tensor | None = None) -> ProbeFit:
    """Fit one head per strength in `l2_grid`; keep the one with the lowest val cross-entropy (ties: the
    stronger penalty). Deterministic: float64, full batch, every fit from zero."""
    x = train_x.double()
    mean, std = x.mean(0), x.std(0)
    # a feature (nearly) constant over the train set carries nothing: it is left out (weight 0), rather than
    # divided by its tiny spread into weights that overflow once stage 2 moves the backbone
    constant = std <= 1e-6 * std.max().clamp_min(1e-12)
    std = torch.where(constant, torch.ones_like(std), std)
    z = torch.where(constant, torch.zeros_like(x), (x - mean) / std)
    cw = class_weight.double() if class_weight is not None else None
    vx, tried, best = val_x.double(), [], None
    for l2 in sorted(l2_grid, reverse=True):
        w, b = _fit_one(z, train_y, num_classes, l2, max_iter, cw)
        weight = (w / std[:, None]).T.contiguous()  # standardisation folded in: raw features in
        bias = b - weight @ mean
        val_logits = vx @ weight.T + bias
        row = {"l2": l2, "train_loss": F.cross_entropy(z @ w + b, train_y).item(),
               "val_loss": F.cross_entropy(val_logits, val_y).item(),
               "val_top1": (val_logits.argmax(1) == val_y).double().mean().item()}
        tried.append(row)
        if best is None or row["val_loss"] < best[0]["val_loss"]:
            best = (row, weight, bias)
    row, weight, bias = best
    return ProbeFit(weight.float(), bias.float(), row["l2"], row["train_loss"], row["val_loss"], row["val_top1"],
                    sorted(tried, key=lambda r: r["l2"]))


def head_linear(model: nn.Module, head: str) -> nn.Linear:
    """The Linear that makes the logits: the head itself, or the last Linear inside it (a Sequential head)."""
    module = model.get_submodule(head)
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise RecipeError(f"probe.enabled: the classifier {head!r} of {type(model).__name__} has no Linear layer "
                          f"to fit (a convolutional classifier such as squeezenet's): set probe.enabled = false "
                          f"for this model")
    return linears[-1]


@torch.no_grad()
def set_head(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    if linear.bias is None:
        raise RecipeError("probe.enabled: the classifier's Linear has no bias, which a probe head needs: set "
                          "probe.enabled = false for this model")
    linear.weight.copy_(weight.to(linear.weight))
    linear.bias.copy_(bias.to(linear.bias))


def _jobs(datasets: dict[str, Images], splits: DataSplits, recipe: Recipe) -> list[tuple]:
    """(split name, Split, dataset, frame, view, augment epoch) for each feature set stage 1 needs."""
    data, pre = recipe.data, Preprocess.from_data(recipe.data)
    framing = lambda frame, size: frame_inputs(frame, working_size(pre, frame, size), pre.channels,  # noqa: E731
                                               pre.interpolation, pre.crop_pct)
    train_eval = Images(open_store(splits.train, pre, data.cache, "eval", None, data.cache_dir), pre)
    jobs = [("train", splits.train, train_eval, framing("eval", None), 0, None)]
    size = tuple(data.working_size) if data.working_size else None
    for view in range(1, recipe.probe.views):
        jobs.append(("train", splits.train, datasets["train"], framing("train", size), view, VIEW_EPOCH + view - 1))
    jobs.append(("val", splits.val, datasets["val"], framing("eval", None), 0, None))
    return jobs


def probe_stage(model: nn.Module, datasets: dict[str, Images], splits: DataSplits, recipe: Recipe, accelerator,
                class_weight: torch.Tensor | None = None) -> tuple[ProbeFit, dict, dict]:
    t0 = time.perf_counter()
    core = accelerator.unwrap_model(model)
    head = classifier_prefix(core)
    linear = head_linear(core, head)
    cache = FeatureCache(cache_root(recipe.data.cache_dir),
                         model_identity(core, head, recipe.model.name, dict(recipe.model.args)),
                         accelerator.mixed_precision)
    feats: dict[str, list] = {"train": [], "val": []}
    hits = 0
    for name, split, ds, frame, view, epoch in _jobs(datasets, splits, recipe):
        augment = recipe.data.augment.model_dump(mode="json") if epoch is not None else None
        key = cache.key(split, frame, view, augment, recipe.seed if epoch is not None else None)
        if epoch is not None:
            ds.set_augment_epoch(epoch)
        # not `accelerator.prepare`: a loader it keeps would change what every later checkpoint holds
        loader = prepare_data_loader(make_loader(ds, recipe.train.eval_batch_size, recipe.data, False, recipe.seed),
                                     accelerator.device, accelerator.num_processes, accelerator.process_index,
                                     put_on_device=True)
        x, y, hit = cache.features(model, linear, loader, accelerator, key)
        feats[name].append((x, y))
        hits += hit
    (vx, vy), = feats["val"]
    tx, ty = torch.cat([x for x, _ in feats["train"]]), torch.cat([y for _, y in feats["train"]])
    t1 = time.perf_counter()
    weight = torch.zeros_like(linear.weight, dtype=torch.float32, device=accelerator.device)
    bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=accelerator.device)
    fit = None
    if accelerator.is_main_process:
        cw = class_weight.cpu() if class_weight is not None else None
        fit = fit_probe(tx, ty, vx, vy, weight.shape[0], recipe.probe.l2, recipe.probe.max_iter, cw)
        weight.copy_(fit.weight)
        bias.copy_(fit.bias)
    if accelerator.num_processes > 1:  # one fit, the same head everywhere (floats may differ between machines)
        weight, bias = broadcast(weight), broadcast(bias)
    set_head(linear, weight, bias)
    if fit is None:  # other processes: the head they received; the numbers are the main process's to log
        fit = ProbeFit(weight.cpu(), bias.cpu(), 0.0, 0.0, 0.0, 0.0)
    val = from_logits(vx @ weight.cpu().T + bias.cpu(), vy, weight.shape[0])
    row = {"views": recipe.probe.views, "train_features": len(tx), "feature_dim": tx.shape[1],
           "feature_sets_cached": hits, "feature_sets": len(feats["train"]) + 1, "features_s": round(t1 - t0, 3),
           "fit_s": round(time.perf_counter() - t1, 3), "l2": fit.l2, "train_loss": fit.train_loss,
           "val_loss": fit.val_loss, "val_top1": fit.val_top1, "tried": fit.tried}
    return fit, row, val
