"""Probes trained on frozen, cached features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdense.evaluation.metrics import confusion_matrix, mean_iou


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Top-1 accuracy (%) of a linear classifier trained with AdamW and cross-entropy on
    standardised features (statistics of the training split), cosine learning-rate decay."""
    mean = train_features.mean(0, keepdim=True)
    std = train_features.std(0, keepdim=True).clamp(min=1e-6)
    x_train, x_test = (train_features - mean) / std, (test_features - mean) / std
    generator = torch.Generator().manual_seed(seed)
    classifier = nn.Linear(x_train.shape[1], num_classes)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        classifier.reset_parameters()
    optimiser = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-len(x_train) // batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs * steps_per_epoch)
    for _ in range(epochs):
        for rows in torch.randperm(len(x_train), generator=generator).split(batch_size):
            loss = F.cross_entropy(classifier(x_train[rows]), train_labels[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    with torch.no_grad():
        return 100.0 * float((classifier(x_test).argmax(1) == test_labels).double().mean())


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy (%) of weighted k-NN on cosine similarity (Wu et al. 2018, as DINO runs it):
    each of the ``k`` nearest training samples votes for its class with weight ``exp(sim / T)``."""
    k = min(k, len(train_features))
    train = F.normalize(train_features, dim=1)
    correct = 0
    for rows in torch.arange(len(test_features)).split(1024):
        sim = F.normalize(test_features[rows], dim=1) @ train.T
        top_sim, top_index = sim.topk(k, dim=1)
        votes = torch.zeros(len(rows), num_classes, dtype=sim.dtype)
        votes.scatter_add_(1, train_labels[top_index], (top_sim / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[rows]).sum())
    return 100.0 * correct / len(test_features)


def train_dense_probe(
    train_maps: torch.Tensor,
    train_masks: torch.Tensor,
    test_maps: torch.Tensor,
    test_masks: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    epochs: int = 30,
    lr: float = 1e-2,
    batch_size: int = 32,
    seed: int = 0,
) -> dict:
    """Dense linear probe: a 1x1 convolution on frozen maps ``[N, C, h, w]``, its logits bilinearly
    upsampled to the masks ``[N, H, W]`` and trained with cross-entropy (``ignore_index`` skipped).
    Returns ``{"miou": %, "per_class_iou": [...], "pixel_accuracy": %}`` on the test split."""
    mean = train_maps.mean(dim=(0, 2, 3), keepdim=True)
    std = train_maps.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-6)
    norm_train, norm_test = (train_maps - mean) / std, (test_maps - mean) / std
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = nn.Conv2d(train_maps.shape[1], num_classes, kernel_size=1)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    size = train_masks.shape[-2:]
    for _ in range(epochs):
        for rows in torch.randperm(len(norm_train), generator=generator).split(batch_size):
            logits = F.interpolate(probe(norm_train[rows]), size=size, mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, train_masks[rows].long(), ignore_index=ignore_index)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for rows in torch.arange(len(norm_test)).split(batch_size):
            logits = F.interpolate(probe(norm_test[rows]), size=test_masks.shape[-2:], mode="bilinear", align_corners=False)
            confusion += confusion_matrix(logits.argmax(1), test_masks[rows], num_classes, ignore_index)
    miou, per_class = mean_iou(confusion)
    pixel_accuracy = float(confusion.diag().sum()) / max(1, int(confusion.sum()))
    return {"miou": 100.0 * miou, "per_class_iou": [None if v != v else 100.0 * float(v) for v in per_class], "pixel_accuracy": 100.0 * pixel_accuracy}
