"""benchmarks/gpu_run.sh under a lent machine's limits: what travels (≤ 64 MiB), installs from the carried wheels
alone, the command's length, the names taken from transformers and accelerate, and the --smoke run of the whole
call on the CPU (≤ 8 files back, none too deep; its archive rebuilds its tables)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT

from benchmarks import compare_masking, gpu_run, lent_prepare
from benchmarks.lent_machine import (
    CARRY_LIMIT,
    COMMAND_CHARACTERS,
    FILES_BACK,
    MiB,
    code_files,
    files_coming_back,
    folder_bytes,
    listed_names,
    pinned_names,
    tracked_bytes,
)

SCRIPT = str(REPO_ROOT / "benchmarks" / "gpu_run.sh")
IMAGENETTE = REPO_ROOT.parent / "shared" / "data" / "imagenette"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_non_zero(tmp_path) -> None:
    result = subprocess.run(["bash", SCRIPT, "--output", str(tmp_path / "out"), "--data", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: no CUDA GPU is visible; gpu_run.sh measures a GPU (--smoke runs the same path on the CPU)"
    ]
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not (IMAGENETTE / "112px").is_dir(), reason="needs ../shared/data/imagenette beside the checkout")
def test_what_travels_fits_and_installs_from_the_carried_wheels_alone(tmp_path) -> None:
    """--prepare (offline: this environment's distributions repacked) builds .data and .whl; tree plus carry fit in
    64 MiB, the command in 2,000 characters, and the wheels install with no index into a fresh folder and import
    from there."""
    result = subprocess.run(["bash", SCRIPT, "--prepare", "--offline", "--into", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    carried = {folder: folder_bytes(tmp_path / folder) for folder in lent_prepare.CARRY}
    assert carried[".data"] > 40 * MiB and (tmp_path / ".data/imagenette/112px").is_dir()
    assert tracked_bytes() + sum(carried.values()) <= CARRY_LIMIT
    command = re.search(r"^command \((\d+) characters.*?: (.*)$", result.stdout, re.M)
    assert command and len(command[2]) == int(command[1]) <= COMMAND_CHARACTERS
    assert "carry: ['.data', '.whl']" in result.stdout

    manifest = (tmp_path / ".whl/manifest.txt").read_text().split()
    names = [line.partition("==")[0] for line in manifest]
    assert {"datasets", "evaluate"} <= set(names) and not {"torch", "transformers", "numpy"} & set(names)
    fresh = tmp_path / "fresh"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--find-links",
               str(tmp_path / ".whl"), "--target", str(fresh), *manifest]  # fmt: skip
    subprocess.run(install, check=True, timeout=300)
    modules = "import datasets, evaluate, dill, multiprocess, xxhash; print(datasets.__file__, evaluate.__file__, "
    modules += "dill.__file__, multiprocess.__file__, xxhash.__file__)"
    env = dict(os.environ, PYTHONPATH=str(fresh), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    found = subprocess.run([sys.executable, "-c", modules], env=env, capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr[-2000:]
    assert all(path.startswith(str(fresh)) for path in found.stdout.split())


def test_the_code_takes_from_transformers_and_accelerate_only_names_checked_against_the_lent_releases(
    tmp_path,
) -> None:
    unlisted = pinned_names(code_files()) - listed_names()
    assert not unlisted, f"check these against transformers 5.17 / accelerate 1.15, then list them: {unlisted}"
    # the scanner sees both import forms
    (tmp_path / "example.py").write_text(
        "import transformers\nfrom transformers.utils import NewHelper\nfrom accelerate import Accelerator\n"
        "transformers.logging.set_verbosity_error()\n"
    )
    assert pinned_names([tmp_path / "example.py"]) == {
        "transformers.utils.NewHelper", "accelerate.Accelerator", "transformers.logging"
    }  # fmt: skip


def test_smoke_runs_the_whole_call_and_what_comes_back_fits_and_reads_back(
    image_dataset_dir, tmp_path, monkeypatch
) -> None:
    output = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = ["bash", SCRIPT, "--smoke", "--data", str(image_dataset_dir), "--output", str(output),
               "--measure_after", "0", "--minutes", "20"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.splitlines()[0].split("] ")[1].startswith("versions: ")  # versions first
    assert sorted(path.name for path in output.iterdir()) == [
        "compare_masking.md", "compare_masking.png", "gpu_run.json", "gpu_run.log", "records.tar.gz",
    ]  # fmt: skip
    assert len(list(output.iterdir())) < FILES_BACK and not files_coming_back(output)

    written = json.loads((output / "gpu_run.json").read_text())
    assert written["device"] == "cpu" and written["commit"] and written["seeds_run"] == "0"
    assert written["versions"]["transformers"] and written["vit_b_step"]["speedup"]["sgmae_random"] > 0
    runs = written["speed"]["runs"]
    assert set(runs) == {"mae-seed0", "sgmae-seed0"} and all(run["images_per_s"] > 0 for run in runs.values())
    assert written["speed"]["mfu_together"] > 0 and written["comparison"]["evaluations"] == 2
    assert written["decisions"] and written["decisions"][0]["fits"]

    unpacked = tmp_path / "unpacked"
    with tarfile.open(output / "records.tar.gz") as packed:
        packed.extractall(unpacked, filter="data")
    assert not list(unpacked.rglob("*.safetensors")) and (unpacked / "comparison/compare_masking.json").is_file()
    collect = shlex.split(written["collect_command"].replace("UNPACKED", str(unpacked)))
    assert collect[:3] == ["python", "-m", "benchmarks.compare_masking"] and "--collect_only" in collect
    monkeypatch.setattr("sys.argv", ["compare_masking", *collect[3:]])
    compare_masking.main()  # in this process: its imports are paid already
    tables = (unpacked / "comparison/compare_masking.md").read_text()
    assert tables == (output / "compare_masking.md").read_text() and "| sgmae | 1 |" in tables


def comparison_in(tmp_path: Path, stop_in: float) -> gpu_run.Comparison:
    """A Comparison of the vits preset whose budget ends in `stop_in` seconds, logging into tmp_path."""
    args = argparse.Namespace(data=str(tmp_path), evaluation_minutes=0.5)
    log = gpu_run.Log(tmp_path / "gpu_run.log", started=time.time())
    return gpu_run.Comparison(args, gpu_run.PRESETS["vits"], tmp_path, log, stop_at=time.time() + stop_in)


def test_the_budget_end_stops_the_comparison_keeping_what_it_wrote(tmp_path) -> None:
    comparison = comparison_in(tmp_path, stop_in=1.0)
    comparison.process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    comparison.started, started = time.time(), time.time()
    comparison.supervise(measure_after=1e9)
    assert comparison.process.poll() is not None and time.time() - started < 10
    assert "the budget's end: stopping the comparison" in (tmp_path / "gpu_run.log").read_text()


def test_runs_too_slow_for_every_seed_go_on_with_seed_0(tmp_path, monkeypatch) -> None:
    """Four runs at 100 s an epoch cannot finish 100 epochs in 10 minutes: the comparison restarts with seed 0."""
    for name in ("mae-seed0", "sgmae-seed0", "mae-seed1", "sgmae-seed1"):
        (tmp_path / "runs" / name / "checkpoint-73").mkdir(parents=True)
        state = {"epoch": 1, "step": 73, "samples_seen": 9344, "train_seconds": 100.0}
        (tmp_path / "runs" / name / "checkpoint-73/trainer_state.json").write_text(json.dumps(state))
    comparison = comparison_in(tmp_path, stop_in=600)
    restarted = []

    def start(seeds: str) -> None:
        restarted.append(seeds)
        comparison.seeds, comparison.started = seeds, time.time()
        comparison.process = subprocess.Popen(["true"])

    monkeypatch.setattr(comparison, "start", start)
    comparison.seeds, comparison.started = "0,1", time.time()
    comparison.process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    comparison.supervise(measure_after=0)
    assert restarted == ["0"] and comparison.decisions[0]["seeds"] == "0,1" and not comparison.decisions[0]["fits"]
    speed = gpu_run.speed(tmp_path, gpu_run.PRESETS["vits"], device_flops=1e12)
    assert speed["runs"]["mae-seed0"]["images_per_s"] == pytest.approx(93.44)
    assert speed["gflop_per_image"] == pytest.approx(10.79, abs=0.01)  # the ViT-S step of the cost model


def test_no_comparison_starts_without_time_for_its_evaluations(tmp_path) -> None:
    comparison = comparison_in(tmp_path, stop_in=30)  # 0.5 min left, 0.5 min of evaluations
    comparison.start("0")
    comparison.supervise(measure_after=0)
    assert comparison.process is None and "too little for the comparison" in (tmp_path / "gpu_run.log").read_text()
