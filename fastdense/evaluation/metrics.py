"""Segmentation metrics with the usual conventions: an ignore label, and classes absent from both
prediction and ground truth left out of the mean."""

from __future__ import annotations

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """``[num_classes, num_classes]`` int64 counts, rows = ground truth, columns = prediction.

    Pixels whose target is ``ignore_index`` are not counted. ``pred`` and ``target`` are integer
    tensors of the same shape.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {list(pred.shape)} and {list(target.shape)}")
    keep = target != ignore_index
    target = target[keep].long()
    pred = pred[keep].long()
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"target labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}")
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"pred labels must lie in [0, {num_classes})")
    return torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou(confusion: torch.Tensor) -> tuple:
    """``(miou, per_class_iou)`` from a confusion matrix. A class with no ground-truth and no
    predicted pixel has an undefined IoU (NaN) and is left out of the mean."""
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, float("nan")))
    present = ~torch.isnan(iou)
    miou = float(iou[present].mean()) if bool(present.any()) else float("nan")
    return miou, iou
