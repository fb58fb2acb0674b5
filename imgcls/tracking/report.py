"""The end-of-run gallery of misclassified validation images, and the final report's figures for TensorBoard
(W&B's are in `imgcls.tracking.wandb_run`)."""
from __future__ import annotations

import itertools

import torch

GALLERY_SIZE = 16
GALLERY_SCAN = 1024  # validation images looked at, at most, to find the gallery


@torch.no_grad()
def misclassified(model, dataset, mean, std, limit: int = GALLERY_SIZE) -> list[dict]:
    """Up to `limit` validation images the model gets wrong, as displayable arrays in 0..1. Looks at most
    GALLERY_SCAN images spread over the whole split (folders are often sorted by class), and takes the mistakes
    round-robin over the true classes, so the gallery is not one confusion sixteen times."""
    device = next(model.parameters()).device
    was_training, by_class = model.training, {}
    model.eval()
    mean, std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    picks = torch.linspace(0, len(dataset) - 1, min(len(dataset), GALLERY_SCAN)).round().long().unique().tolist()
    for start in range(0, len(picks), 64):
        items = [dataset[k] for k in picks[start:start + 64]]
        images, labels = torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
        confidence, pred = model(images.to(device)).float().softmax(dim=1).cpu().max(dim=1)
        for k in (pred != labels).nonzero().flatten().tolist():
            kept = by_class.setdefault(int(labels[k]), [])
            if len(kept) < limit:
                shown = (images[k] * std + mean).clamp(0, 1).permute(1, 2, 0).squeeze(-1).numpy()
                kept.append({"image": shown, "true": int(labels[k]), "pred": int(pred[k]),
                             "confidence": float(confidence[k])})
    model.train(was_training)
    rounds = itertools.zip_longest(*(by_class[c] for c in sorted(by_class)))
    return [item for row in rounds for item in row if item is not None][:limit]


def send_tensorboard_report(tracker, report: dict, step: int) -> None:
    """The final report's figures (confusion matrix, misclassified gallery) as TensorBoard images."""
    for tag, image in report["figures"].items():
        tracker.tracker.add_image(tag, image, step, dataformats="HWC")
    tracker.tracker.flush()

