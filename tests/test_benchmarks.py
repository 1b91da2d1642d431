"""The benchmarks of the pipelines and the training step: their ``--quick`` runs finish and write what
PERFORMANCE.md asks of them (medians, ratios measured in the same run, data wait, target flags), and
the pipeline benchmark refuses batches that are not the recipe's two views with their matrices. The
RoIAlign tuning script's quick run too, and it refuses a configuration that changes the result."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.bench_pipelines import check_batch
from fastdense.geometry import crop_matrix
from fastdense.pipelines import ViewBatch

ROOT = Path(__file__).resolve().parents[1]


def run_quick(script: str, out: Path, *args: str, versions: bool = True) -> dict:
    env = dict(os.environ, FASTDENSE_BENCH_OUT=str(out), PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args], env=env, check=True, capture_output=True, timeout=300)
    (path,) = out.glob("*_quick_*.json")
    result = json.loads(path.read_text())
    for key in ("device", "torch", "triton", "commit"):
        assert result[key], key
    if versions:  # the data benchmarks record their image libraries
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


@pytest.mark.slow
def test_scrl_boxes_quick_writes_its_own_file_and_the_ratio_to_the_reference_loop(tmp_path):
    """A quick run must not overwrite the full run's JSON, which the README cites."""
    result = run_quick("bench_scrl_boxes.py", tmp_path, versions=False)
    assert result["benchmark"] == "scrl_boxes_quick" and result["target_speedup"] == 50
    assert {row["backend"] for row in result["rows"]} >= {"cpp"} and all(row["speedup"] > 0 for row in result["rows"])


def test_pipelines_quick_reports_per_core_ratios_and_targets(tmp_path):
    result = run_quick("bench_pipelines.py", tmp_path, "--backends", "torch", "--repeats", "2", "--threads", "1")
    assert (result["threads"], result["repeats"], result["view_sizes"]) == (1, 2, [224, 224])
    rows = {(row["backend"], row["mode"]): row for row in result["rows"]}
    modes = ("geometry", "full")
    assert set(rows) == {(backend, mode) for backend in ("pil-torchvision baseline", "torch") for mode in modes}
    on_cpu = not torch.cuda.is_available()
    for mode in modes:
        baseline, fast = rows[("pil-torchvision baseline", mode)], rows[("torch", mode)]
        assert fast["speedup"] == pytest.approx(fast["images_per_s"] / baseline["images_per_s"])
        assert fast["per_core_speedup"] == pytest.approx(fast["images_per_core_s"] / baseline["images_per_core_s"])
        target = fast["per_core_speedup"] >= result["target_per_core_speedup"] if on_cpu else None
        assert fast["meets_per_core_target"] == target
        for row in (baseline, fast):
            # This process and its workers only: never more cores than the machine has (clock-tick slack).
            assert 0 < row["cores_used"] <= os.cpu_count() + 0.5, row


def _two_view_batch(batch_size=4, size=224, views=None, x0=10.0):
    source = torch.tensor([[375, 500]] * batch_size)
    matrices = crop_matrix(torch.full((batch_size, 2), x0), 20.0, 300.0, 200.0, size, size)
    views = views if views is not None else [torch.randn(batch_size, 3, size, size) for _ in range(2)]
    return ViewBatch(views=views, matrices=matrices, source_size=source, index=torch.arange(batch_size))


def test_check_batch_accepts_the_recipe_views():
    check_batch(_two_view_batch(), 4, [224, 224])
    check_batch(([torch.randn(4, 3, 224, 224)] * 2, torch.zeros(4)), 4, [224, 224])  # the baseline's (views, labels)


@pytest.mark.parametrize("broken, message", [
    (lambda: _two_view_batch(batch_size=3), "shapes"),
    (lambda: _two_view_batch(size=112), "shapes"),
    (lambda: _two_view_batch(views=[torch.randn(4, 3, 224, 224), torch.zeros(4, 3, 224, 224)]), "constant"),
    (lambda: _two_view_batch(views=[torch.full((4, 3, 224, 224), float("nan"))] * 2), "not finite"),
    (lambda: _two_view_batch(x0=250.0), "outside"),  # the crop runs past the source's right edge
], ids=["smaller batch", "smaller views", "blank view", "NaN views", "crop outside the source"])
def test_check_batch_refuses_a_broken_batch(broken, message):
    with pytest.raises(ValueError, match=message):
        check_batch(broken(), 4, [224, 224])


def test_roi_align_tuning_spent_budget_lists_configurations_untried(tmp_path):
    """A run past --budget-s still writes its JSON: the breakdown, and each configuration left untried."""
    result = run_quick("tune_roi_align.py", tmp_path, "--budget-s", "0.001", versions=False)
    entries = [e for row in result["rows"] for which in ("forward", "backward") for e in row[f"{which}_sweep"]]
    entries += result["grouping_sweep"] + [e for d in result["detection_backward"] for e in d["sweep"]]
    assert entries and all(e["ms"] is None and e["error"].startswith("not tried") for e in entries)
    assert all(row["forward_ms"] > 0 for row in result["rows"])


def test_roi_align_tuning_quick_reports_the_breakdown_and_the_sweep(tmp_path):
    result = run_quick("tune_roi_align.py", tmp_path, versions=False)
    assert [(row["dtype"], row["layout"]) for row in result["rows"]] == [
        ("float32", "nchw"), ("float32", "channels_last"), ("bfloat16", "nchw"), ("bfloat16", "channels_last")]
    for row in result["rows"]:
        assert all(row[f"{launch}_ms"] > 0 for launch in ("plan", "forward", "backward"))
        for which in ("forward", "backward"):
            # the third and fourth configurations, a CHUNK of the forward's pixel loop (the fourth the
            # whole map, with two channel blocks a program), are the forward's alone
            expected = [(32, None, None), (16, None, 2), (None, 16, None), (None, 64, 2)] if which == "forward" else [(32, None, None), (16, None, 2)]
            assert [(entry["BLOCK_C"], entry["CHUNK"], entry["CHANNEL_BLOCKS"]) for entry in row[f"{which}_sweep"]] == expected
            assert all(entry["error"] is None and entry["ms"] > 0 for entry in row[f"{which}_sweep"])
            assert row[f"{which}_best"]["BLOCK_C"] in (32, 16, None) and row[f"{which}_best_speedup"] > 0
        assert row["forward_package"]["CHUNK"] == 32
    assert [(entry["BLOCK"], entry["SCAN"], entry["error"]) for entry in result["grouping_sweep"]] == [(32, 128, None), (16, 256, None)]
    # the large-map backward: the package's tiles (8 x 16) and one other, the same gradient exactly
    assert [(entry["dtype"], entry["layout"]) for entry in result["detection_backward"]] == [("float32", "nchw"), ("bfloat16", "channels_last")]
    for entry in result["detection_backward"]:
        assert (entry["package"]["TILE_H"], entry["package"]["TILE_W"]) == (8, 16) and entry["package_ms"] > 0
        assert [(s["BLOCK_C"], s["TILE_H"], s["error"]) for s in entry["sweep"]] == [(16, 16, None)] and entry["sweep"][0]["ms"] > 0
    assert result["grouping_best"]["ms"] > 0 and result["grouping_package"]["BLOCK"] == 32


def test_roi_align_benchmark_runs_a_tuning_result_and_records_its_settings(tmp_path):
    """``bench_roi_align.py --tuned`` applies a tuning result's settings before it checks and times,
    and every result records the settings it ran with; a missing result is named, not a traceback."""
    import fastdense.kernels.roi_align as kernels

    tuned = {"POOLED_FORWARD_CHANNEL_BLOCKS": 2, "POOLED_BACKWARD_BLOCK_C": 16, "GROUP_BLOCK": 16, "LARGE_TILE": [16, 16]}
    (tmp_path / "tuning.json").write_text(json.dumps({"settings": tuned}))
    result = run_quick("bench_roi_align.py", tmp_path, "--repeats", "1", "--tuned", str(tmp_path / "tuning.json"), versions=False)
    assert result["tuned_from"] == "tuning.json" and result["tuned"] == tuned
    assert result["settings"] == dict(json.loads(json.dumps(kernels.current_settings())), **tuned)
    assert [row["case"] for row in result["rows"]] == ["scrl", "scrl", "detection"]  # each checked against torchvision first
    env = dict(os.environ, FASTDENSE_BENCH_OUT=str(tmp_path / "empty"), PYTHONPATH=str(ROOT))
    missing = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_roi_align.py"), "--quick", "--tuned"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode != 0 and "--tuned: no tuning result at" in missing.stderr and "roi_align_tuning_quick_" in missing.stderr


def test_static_roi_align_reports_the_sm90_code_of_each_launch(tmp_path):
    result = run_quick("static_roi_align.py", tmp_path, versions=False)
    assert result["device"] == "sm_90"
    assert [(row["launch"], row["dtype"], row["layout"]) for row in result["rows"]] == [
        ("plan", "-", "-"), ("forward", "bfloat16", "channels_last"), ("backward", "bfloat16", "channels_last")]
    for row in result["rows"]:
        assert row["registers"] > 0 and row["spill_bytes"] == 0 and row["instructions"] > 0, row
        assert 1 <= row["programs_per_sm"] <= 32 and row["num_warps"] >= 1, row
        assert any(op.startswith("LDG") for op in row["global_loads"]), row
    assert all(row["tensor_core_instructions"] > 0 for row in result["rows"][1:])


def test_programs_per_sm_takes_the_tightest_limit():
    from benchmarks.sm90 import programs_per_sm

    assert programs_per_sm(96, 28672, 4) == 5  # registers: 96 x 32 x 4 a program of 65536
    assert programs_per_sm(48, 73728, 4) == 3  # shared memory: 228 KiB over 72 + 1 KiB
    assert programs_per_sm(16, 0, 8) == 8  # warps: 64 over 8
    assert programs_per_sm(16, 0, 1) == 32  # programs
    assert programs_per_sm(93, 0, 4) == 5  # 93 registers are allocated as 96


def pooled_config(block_c, num_warps, num_stages, channel_blocks, chunk, precision=None):
    return {"BLOCK_C": block_c, "num_warps": num_warps, "num_stages": num_stages, "CHANNEL_BLOCKS": channel_blocks, "CHUNK": chunk, "PRECISION": precision}


def test_roi_align_tuning_refuses_a_configuration_that_changes_the_result():
    from benchmarks.tune_roi_align import PooledCase, sweep_pooled

    case = PooledCase((2, 16, 7, 7), 2, torch.float32, "nchw", torch.device("cpu"), torch.Generator().manual_seed(0))
    honest = case.forward
    case.forward = lambda x, block_c=None, *rest: honest(x, block_c, *rest) * (1.5 if block_c == 16 else 1.0)
    configs = [("forward", pooled_config(32, 4, None, None, None)), ("forward", pooled_config(16, 4, None, 2, None))]
    (kept, refused) = sweep_pooled([case], configs, [1e-5])[0, "forward"]
    assert kept[1] > 0 and kept[2] is None
    assert refused[1] is None and "differs from the package's configuration" in refused[2]


def test_roi_align_tuning_settings_launch_what_was_timed():
    """The settings a tuning run writes (the fastest total over the cases swept, only where it beats
    the package's by more than noise), once applied, make the package launch exactly the
    configuration that was timed: channel block, channel blocks, chunk and launch options."""
    import fastdense.kernels.roi_align as kernels
    from benchmarks.tune_roi_align import MARGIN, PooledCase, fastest, pooled_configs, pooled_settings

    configs = pooled_configs(64, (1, None))
    assert len(configs) == len({(which, tuple(c.items())) for which, c in configs})
    assert all(which == "forward" for which, c in configs if c["CHUNK"] is not None)
    assert configs[0][1] == pooled_config(None, None, None, None, None, "ieee")  # the package's on CUDA cores first
    assert configs[2][1]["CHANNEL_BLOCKS"] and configs[-1][1]["num_stages"] == 1  # then streaming; the other stages last
    a, b, c = pooled_config(64, 4, None, 4, None), pooled_config(32, 4, None, None, None), pooled_config(16, 2, 1, None, None)
    sweeps = [[(a, 1.0, None), (b, 0.5, None), (c, None, "not tried")], [(a, 1.0, None), (b, 0.6, None), (c, 0.1, None)]]
    assert fastest(sweeps, package_ms=2.0) == (b, 1.1)  # c is not timed on every case
    assert fastest(sweeps, package_ms=1.1 / MARGIN) is None and fastest(sweeps, package_ms=1.1 / MARGIN + 1e-9) == (b, 1.1)

    case = PooledCase((2, 100, 7, 7), 2, torch.float32, "channels_last", torch.device("cpu"), torch.Generator().manual_seed(0))
    package = kernels.current_settings()
    for which, config in [("forward", pooled_config(16, 2, 3, 2, 16, "ieee")), ("backward", pooled_config(64, 8, 1, 3, None)),
                          ("forward", pooled_config(None, None, 2, None, 64)), ("backward", pooled_config(None, 8, None, None, None, "ieee"))]:
        timed = case._launch(which, config["BLOCK_C"], config["num_warps"], config["num_stages"], config["CHANNEL_BLOCKS"], config["PRECISION"])
        if config["CHUNK"]:
            timed[1]["CHUNK"] = kernels.pooled_forward_chunk(7, 7, config["CHUNK"])
        kernels.apply_settings(pooled_settings(which, config, case))
        try:
            grid_channels, constexprs, options = kernels._pooled_config(100, 7, 7, which == "backward", torch.float32)
            assert ((2, grid_channels), constexprs, options) == timed, (which, config)
        finally:
            kernels.apply_settings(package)


@pytest.mark.parametrize("full", [False, True], ids=["array", "full"])
def test_roi_align_benchmark_times_scrl_own_call(full):
    from benchmarks.bench_roi_align import SCRL_AXES, SCRL_RECIPE, scrl_settings

    settings = scrl_settings(SCRL_AXES, full)
    assert len(settings) == len(set(settings)) == (64 if full else 8 + len(SCRL_RECIPE))
    assert (256, "1x1-pooled", -1, False, torch.float32, "channels_last") in SCRL_RECIPE
    assert all(setting in settings for setting in SCRL_RECIPE)
    if not full:  # the array's pairs: every value of any two axes meets twice
        for i in range(6):
            for j in range(i + 1, 6):
                for a in SCRL_AXES[i]:
                    for b in SCRL_AXES[j]:
                        assert sum(s[i] == a and s[j] == b for s in settings[:8]) == 2


@pytest.mark.parametrize("script", ["bench_ffcv_resize.py", "bench_pipelines.py", "bench_scrl_boxes.py", "bench_vicreg.py"])
def test_help_describes_the_benchmark_in_whole_sentences(script, tmp_path):
    """``--help`` gives the docstring's first paragraph, not its first line cut mid-sentence
    (``bench_pipelines.py`` said "each pipeline backend against the naive"). The script runs as the
    README runs it, ``python3 benchmarks/<script>.py`` without PYTHONPATH (here from another
    directory): these four stopped with "No module named 'benchmarks'"."""
    path = ROOT / "benchmarks" / script
    first = " ".join(ast.get_docstring(ast.parse(path.read_text())).split("\n\n")[0].split())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    shown = subprocess.run([sys.executable, str(path), "--help"], env=env, cwd=tmp_path, check=True,
                           capture_output=True, text=True, timeout=60).stdout
    assert first.endswith(".") and first in " ".join(shown.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what run_gpu.sh does on a machine without a GPU")
def test_run_gpu_stops_at_once_without_a_gpu_or_on_an_unknown_step(tmp_path):
    """Without a GPU, run_gpu.sh went on past 'nvidia-smi: command not found' to run its GPU steps on
    the CPU (writing their figures into --out); an unknown step's message left out the steps that
    run only when named (bench_pipelines)."""
    def run(*steps):
        env = dict(os.environ, FASTDENSE_BENCH_OUT=str(tmp_path / "out"))
        return subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh"), *steps], env=env, capture_output=True, text=True, timeout=60)

    unknown = run("bench_nowhere")
    assert unknown.returncode == 2 and "unknown step bench_nowhere" in unknown.stderr and "bench_pipelines" in unknown.stderr
    no_gpu = run("bench_vicreg")
    assert no_gpu.returncode == 2 and "no CUDA device" in no_gpu.stderr and "== bench_vicreg" not in no_gpu.stdout
    assert not (tmp_path / "out").exists()
