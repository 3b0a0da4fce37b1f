"""benchmarks/gpu_run.sh: it refuses to run without a GPU, and its --smoke setting runs every step on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

SCRIPT = str(REPO_ROOT / "benchmarks" / "gpu_run.sh")
spec = importlib.util.spec_from_file_location("gpu_plan", REPO_ROOT / "benchmarks/gpu_plan.py")
gpu_plan = sys.modules["gpu_plan"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(gpu_plan)


def test_the_plan_fits_the_runs_into_the_time_left() -> None:
    # 6 runs x 1.4 x 73 steps x 128 images at 12,800 img/s: 6.132 s per epoch of all runs
    epochs, evaluations, epoch_seconds = gpu_plan.plan(12_800, 90 + 400, 6, 73, 128, 100)
    assert epoch_seconds == pytest.approx(6.132)
    assert (epochs, evaluations) == (60, [6, 15, 30, 45, 60])  # 65 fit; rounded down to tens
    assert gpu_plan.plan(1e6, 1e6, 6, 73, 128, 100)[0] == 100  # never past the schedule asked for
    assert gpu_plan.plan(12_800, 90 + 40, 6, 73, 128, 100)[:2] == (6, [1, 2, 3, 4, 6])
    assert gpu_plan.plan(10, 100, 6, 73, 128, 100)[:2] == (1, [1])  # at least one epoch


def test_the_plan_charges_the_self_guided_cost_measured_on_the_device(tmp_path) -> None:
    measured = {"self_guided": {"self_guided": {"self_guided_last": {"ratio_vs_random": 1.9}}}}
    report = tmp_path / "bench_model_gpu.json"
    report.write_text(json.dumps({"results": [{"config": "cifar"}, {"config": "imagenette196", **measured}]}))
    assert gpu_plan.self_guided_cost(str(report), "imagenette196") == (1.9, "measured for imagenette196")
    # bench_model.py cut short before the config, or not run at all: the documented prior
    for path, config in ((report, "vitb"), (report, "cifar"), (tmp_path / "missing.json", "imagenette196")):
        assert gpu_plan.self_guided_cost(str(path), config)[0] == gpu_plan.SELF_GUIDED_COST
    # cached masks (the default): the cached step's ratio plus the refresh passes spread over the epochs
    cached = {"cached_ratio_vs_random": 1.02, "random_median_step_s": 0.1, "refresh": {"lanczos": {"median_s": 0.05}}}
    report.write_text(json.dumps({"results": [{"config": "imagenette196", **measured, "cached": cached}]}))
    cost, source = gpu_plan.self_guided_cost(str(report), "imagenette196", epochs=100)
    assert cost == pytest.approx(1.02 + gpu_plan.REFRESHES * 0.5 / 100) and "cached masks" in source
    epoch_seconds = gpu_plan.plan(12_800, 90 + 400, 6, 73, 128, 100, cost=1.9)[2]
    assert epoch_seconds == pytest.approx(6.132 / 1.4 * 1.9)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_non_zero(tmp_path) -> None:
    result = subprocess.run(["bash", SCRIPT, "--output", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: no CUDA GPU is visible; gpu_run.sh measures a GPU (--smoke runs the same path on the CPU)"
    ]
    assert not list(tmp_path.iterdir())


def test_smoke_runs_every_step_and_writes_results_with_device_commit_and_command(image_dataset_dir, tmp_path) -> None:
    output = tmp_path / "results"
    # a budget that a loaded machine cannot exhaust: this test is about the path, the plan is tested above
    env = dict(os.environ, RUNS_DIR=str(tmp_path / "runs"), OMP_NUM_THREADS="1", GPU_RUN_MINUTES="30")
    command = ["bash", SCRIPT, "--smoke", "--data", str(image_dataset_dir), "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "plan: model step" in result.stderr and "gpu_run.sh: done" in result.stdout
    assert "x (measured for cifar, cached masks" in result.stderr  # the plan read bench_model.py's measured ratio

    model = json.loads((output / "bench_model_gpu.json").read_text())
    assert model["commit"] and "bench_model.py" in model["command"] and model["results"][0]["config"] == "cifar"
    script = json.loads((output / "bench_script_gpu.json").read_text())
    assert script["device"] == "cpu" and script["commit"] and script["medians"]["model"] > 0
    comparison = json.loads((output / "imagenette196_gpu/compare_masking.json").read_text())
    assert comparison["device"].startswith("cpu") and comparison["commit"]
    assert "compare_masking.py" in comparison["command"] and "--stop_after_minutes" in comparison["command"]
    epochs = int(comparison["args"]["epochs"])
    assert epochs == 1  # the smoke setting plans one epoch
    assert {(record["variant"], record["epoch"]) for record in comparison["records"]} == {
        (variant, epoch) for variant in ("mae", "sgmae") for epoch in range(1, epochs + 1)
    }
    assert all(record["linear_probe_mean"] is not None for record in comparison["records"])
