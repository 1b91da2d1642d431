"""Downstream protocols on frozen backbones: linear probe, k-NN, dense linear probe (mIoU), export."""

from fastdense.evaluation.metrics import confusion_matrix, mean_iou
from fastdense.evaluation.probes import knn_accuracy, linear_probe_accuracy, train_dense_probe

__all__ = ["confusion_matrix", "mean_iou", "knn_accuracy", "linear_probe_accuracy", "train_dense_probe"]
