"""The benchmarks of the pipelines and the training step: their ``--quick`` runs finish and write what
PERFORMANCE.md asks of them (medians, ratios measured in the same run, data wait, target flags)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_quick(script: str, out: Path, *args: str) -> dict:
    env = dict(os.environ, FASTDENSE_BENCH_OUT=str(out), PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args], env=env, check=True, capture_output=True, timeout=300)
    (path,) = out.glob("*_quick_*.json")
    result = json.loads(path.read_text())
    for key in ("device", "torch", "triton", "commit"):
        assert result[key], key
    assert result["versions"]["torchvision"] and result["versions"]["pillow"]
    return result


@pytest.mark.slow
def test_train_step_quick_reports_medians_data_wait_and_targets(tmp_path):
    result = run_quick("bench_train_step.py", tmp_path, "--threads", "1", "--steps", "3", "--warmup", "1")
    (row,) = result["rows"]
    assert (row["threads"], row["steps"], row["warmup"], row["batch"]) == (1, 3, 1, 8)
    assert row["backend"] and row["workers"] >= 0
    for side in ("reference", "fastdense"):
        assert row[f"{side}_images_per_s"] == pytest.approx(row["batch"] / row[f"{side}_median_step_s"])
        assert 0 < row[f"{side}_data_wait_fraction"] < 1
    assert row["speedup"] == pytest.approx(row["fastdense_images_per_s"] / row["reference_images_per_s"])
    assert row["meets_data_wait_target"] == (row["fastdense_data_wait_fraction"] < result["target_data_wait_fraction"])
    # The speedup target is the GPU configuration's (ResNet-50, 224 px, 256 images); quick is not it.
    assert result["target_speedup"] is None and row["meets_speedup_target"] is None
