"""Probes trained on frozen, cached features."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastdense.evaluation.metrics import confusion_matrix, mean_iou


def _check_split(name: str, features: torch.Tensor, labels: torch.Tensor, num_classes: int, feature_dims: int) -> None:
    """Refuse what would otherwise fail deep inside a probe or score silently: no rows, a row count
    that labels do not match, or labels outside ``[0, num_classes)``."""
    if features.ndim != feature_dims or len(features) == 0:
        raise ValueError(f"{name}_features must be a non-empty {feature_dims}-D tensor, got shape {list(features.shape)}")
    if len(labels) != len(features):
        raise ValueError(f"{name}_labels must have one entry per row of {name}_features ({len(features)}), got {len(labels)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name}_labels must lie in [0, num_classes={num_classes}), got [{int(labels.min())}, {int(labels.max())}]")


def standardiser(train: torch.Tensor, dim) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` over ``dim`` of the training split, so that ``(x - mean) / std`` has unit
    variance per channel. A channel constant on the training split gets ``std = inf``, so it reads
    0: the probe cannot learn a weight for it, and dividing by its (near-)zero spread would blow
    any test value that differs from the constant up into the logits."""
    train = train.float()
    mean = train.mean(dim=dim, keepdim=True)
    std = train.std(dim=dim, keepdim=True)
    informative = std > 1e-6 * train.abs().amax(dim=dim, keepdim=True)
    return mean, torch.where(informative, std, torch.full_like(std, float("inf")))


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
    """Top-1 accuracy (%) of a linear classifier, trained where the features are, with AdamW and cross-entropy on
    standardised features (statistics of the training split only, see :func:`standardiser`),
    cosine learning-rate decay, mini-batches shuffled by ``seed``. The result is a function of the
    inputs and ``seed``; the global RNG is left as it was.

    >>> x = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).repeat(8, 1)
    >>> y = torch.tensor([0, 1]).repeat(8)
    >>> linear_probe_accuracy(x, y, x[:2], y[:2], num_classes=2, epochs=5)
    100.0
    """
    _check_split("train", train_features, train_labels, num_classes, 2)
    _check_split("test", test_features, test_labels, num_classes, 2)
    device = train_features.device
    mean, std = standardiser(train_features, 0)
    x_train, x_test = (train_features.float() - mean) / std, (test_features.to(device).float() - mean) / std
    train_labels, test_labels = train_labels.long().to(device), test_labels.to(device)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = nn.Linear(x_train.shape[1], num_classes).to(device)
    optimiser = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-len(x_train) // batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs * steps_per_epoch)
    for _ in range(epochs):
        for rows in torch.randperm(len(x_train), generator=generator).to(device).split(batch_size):
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
    each of the ``k`` nearest training samples votes for its class with weight ``exp(sim / T)``.

    Runs on the features' device. Features are L2-normalised and compared in float32 whatever their dtype (``exp(1 / 0.07)`` is
    beyond float16's range). With fewer than ``k`` training samples all of them vote. Ties are
    broken the same way on every device: among training samples equally similar at the ``k``-th
    place, those that come first in ``train_features`` are taken; equal votes go to the lower class.

    >>> train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    >>> knn_accuracy(train, torch.tensor([0, 0, 1]), torch.tensor([[0.1, 1.0]]), torch.tensor([1]), 2, k=1)
    100.0
    """
    _check_split("train", train_features, train_labels, num_classes, 2)
    _check_split("test", test_features, test_labels, num_classes, 2)
    if k < 1 or not temperature > 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    k = min(k, len(train_features))
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    test_features = test_features.to(device)
    train_labels, test_labels = train_labels.long().to(device), test_labels.to(device)
    correct = 0
    for rows in torch.arange(len(test_features), device=device).split(1024):
        sim = F.normalize(test_features[rows].float(), dim=1) @ train.T
        top_sim, top_index = nearest_first(sim, k)
        votes = torch.zeros(len(rows), num_classes, dtype=sim.dtype, device=device)
        votes.scatter_add_(1, train_labels[top_index], (top_sim / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[rows]).sum())
    return 100.0 * correct / len(test_features)


def nearest_first(similarity: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``similarity.topk(k, dim=1)`` with ties at the ``k``-th place going to the lower column.

    ``topk`` leaves the choice among equal values to the device; the rows where that choice
    matters (an equal value left out) are redone with a stable sort, the others kept as they are.
    """
    top_sim, top_index = similarity.topk(k, dim=1)
    kth = top_sim[:, -1:]
    ambiguous = ((similarity == kth).sum(1) > (top_sim == kth).sum(1)).nonzero().flatten()
    if len(ambiguous):
        order = similarity[ambiguous].sort(dim=1, descending=True, stable=True).indices[:, :k]
        top_index[ambiguous] = order
        top_sim[ambiguous] = similarity[ambiguous].gather(1, order)
    return top_sim, top_index


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
    """Dense linear probe, trained where ``train_maps`` are: a 1x1 convolution on frozen maps ``[N, C, h, w]``, its logits bilinearly
    upsampled to the masks ``[N, H, W]`` (``align_corners=False``: cell ``(i, j)`` is centred at
    ``((j + 0.5) W / w, (i + 0.5) H / h)``, the cell centre of CONVENTIONS.md when the maps tile the
    images exactly, i.e. the image side is a multiple of the backbone's stride) and trained with
    cross-entropy (``ignore_index`` skipped), AdamW, ``seed`` fixing the initialisation and the
    batch order. Channels are standardised with training-split statistics (:func:`standardiser`).
    The confusion matrix is summed over the whole test split before the IoUs are taken
    (:func:`~fastdense.evaluation.metrics.mean_iou`).
    Returns ``{"miou": %, "per_class_iou": [...], "pixel_accuracy": %}`` on the test split."""
    for name, maps, masks in (("train", train_maps, train_masks), ("test", test_maps, test_masks)):
        if maps.ndim != 4 or masks.ndim != 3 or len(maps) != len(masks) or len(maps) == 0:
            raise ValueError(f"{name}_maps must be [N, C, h, w] and {name}_masks [N, H, W] with the same N > 0, got {list(maps.shape)} and {list(masks.shape)}")
    device = train_maps.device
    train_masks = train_masks.to(device)
    mean, std = standardiser(train_maps, (0, 2, 3))
    norm_train, norm_test = (train_maps.float() - mean) / std, (test_maps.to(device).float() - mean) / std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.Conv2d(train_maps.shape[1], num_classes, kernel_size=1).to(device)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    size = train_masks.shape[-2:]
    for _ in range(epochs):
        for rows in torch.randperm(len(norm_train), generator=generator).to(device).split(batch_size):
            logits = F.interpolate(probe(norm_train[rows]), size=size, mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, train_masks[rows].long(), ignore_index=ignore_index)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for rows in torch.arange(len(norm_test)).split(batch_size):
            logits = F.interpolate(probe(norm_test[rows.to(device)]), size=test_masks.shape[-2:], mode="bilinear", align_corners=False)
            confusion += confusion_matrix(logits.argmax(1).cpu(), test_masks[rows].cpu(), num_classes, ignore_index)
    miou, per_class = mean_iou(confusion)
    pixel_accuracy = float(confusion.diag().sum()) / max(1, int(confusion.sum()))
    return {"miou": 100.0 * miou, "per_class_iou": [None if v != v else 100.0 * float(v) for v in per_class], "pixel_accuracy": 100.0 * pixel_accuracy}
