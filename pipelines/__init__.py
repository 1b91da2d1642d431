"""Data pipelines that emit augmented views with one 3x3 transform matrix per view
(installed as ``fastdense.pipelines``). Pipelines know nothing of methods."""

from fastdense.pipelines.batch import ViewBatch

__all__ = ["ViewBatch"]
