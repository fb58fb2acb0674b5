"""Exact classification metrics across processes: loss, top-1, top-5, confusion matrix, and from the confusion
matrix macro-F1 and balanced accuracy (mean per-class recall), the numbers that an imbalanced val split needs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from imgcls.inference.scores import balanced_accuracy, macro_f1


@torch.no_grad()
def evaluate(model, loader, accelerator, num_classes: int, keep_logits: bool = False, flip_tta: bool = False
             ) -> dict:
    """Full pass over `loader` of an `Images` dataset: (uint8 images, labels, positions) batches, normalized on
    the device. `gather_for_metrics` drops the samples that padding duplicated on the last batch, so 1 process
    and N processes give the same numbers. `flip_tta`: each image's prediction is the mean softmax of the image
    and its horizontal flip (as `imgcls-predict --tta`); its log stands for the logits."""
    model.eval()
    loss_sum, n = 0.0, 0
    correct1 = correct5 = 0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    all_logits, all_labels = [], []
    for images, labels, positions in loader:
        inputs = loader.dataset.model_input(images, positions)
        logits = model(inputs)
        if flip_tta:
            logits = ((logits.float().softmax(1) + model(inputs.flip(-1)).float().softmax(1)) / 2).log()
        logits, labels = accelerator.gather_for_metrics((logits.float().contiguous(), labels))
        logits, labels = logits.cpu(), labels.cpu()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        n += labels.numel()
        top = logits.topk(min(5, num_classes), dim=1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(dim=1).sum().item()
        confusion += torch.bincount(labels * num_classes + top[:, 0], minlength=num_classes ** 2).view(
            num_classes, num_classes)
        if keep_logits:
            all_logits.append(logits)
            all_labels.append(labels)
    out = {"loss": loss_sum / max(n, 1), "top1": correct1 / max(n, 1), "n": n, "confusion": confusion,
           "macro_f1": macro_f1(confusion.numpy()), "balanced_accuracy": balanced_accuracy(confusion.numpy())}
    if num_classes > 5:
        out["top5"] = correct5 / max(n, 1)
    if keep_logits:
        out["logits"] = torch.cat(all_logits) if all_logits else torch.empty(0, num_classes)
        out["labels"] = torch.cat(all_labels) if all_labels else torch.empty(0, dtype=torch.long)
    return out


def from_logits(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """`evaluate`'s numbers for logits already in hand (all of a split, on every process)."""
    logits, labels = logits.float(), labels.long()
    top = logits.topk(min(5, num_classes), dim=1).indices
    n = max(labels.numel(), 1)
    confusion = torch.bincount(labels * num_classes + top[:, 0], minlength=num_classes ** 2).view(
        num_classes, num_classes)
    out = {"loss": F.cross_entropy(logits, labels, reduction="sum").item() / n,
           "top1": (top[:, 0] == labels).sum().item() / n, "n": labels.numel(), "confusion": confusion,
           "macro_f1": macro_f1(confusion.numpy()), "balanced_accuracy": balanced_accuracy(confusion.numpy())}
    if num_classes > 5:
        out["top5"] = (top == labels[:, None]).any(dim=1).sum().item() / n
    return out


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    totals = confusion.sum(dim=1).clamp(min=1)
    return (confusion.diag().float() / totals).tolist()


def scalars(metrics: dict) -> dict:
    """The loggable numbers of an `evaluate` result."""
    keep = ("loss", "top1", "top5", "macro_f1", "balanced_accuracy", "n")
    return {k: v for k, v in metrics.items() if k in keep}
