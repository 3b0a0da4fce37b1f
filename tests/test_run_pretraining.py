"""End-to-end tests of run_pretraining.py through real `accelerate launch` subprocesses on a small image slice."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, check_folder_in_fresh_process, tiny_config
from PIL import Image
from safetensors.torch import load_file

SCRIPT = str(REPO_ROOT / "run_pretraining.py")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    tiny_config().to_json_file(path)
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(num_processes: int) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
    if num_processes > 1:  # see HF_NOTES.md: --cpu --num_processes N silently starts one process
        command += ["--multi_gpu", "--main_process_port", str(free_port())]
    return [*command, "--num_processes", str(num_processes), "--dynamo_backend", "no", SCRIPT]


def script_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def pretraining_args(dataset: Path | str, output_dir: Path, config_file: str, *extra: str) -> list[str]:
    return [
        "--dataset_name", str(dataset), "--config_name", config_file, "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "8", "--max_train_samples", "64", "--max_eval_samples", "8",
        "--dataloader_num_workers", "0", "--logging_steps", "2", "--seed", "3", *extra,
    ]  # fmt: skip


def run(args: list[str], num_processes: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        launch_command(num_processes) + args, env=script_env(), capture_output=True, text=True, timeout=timeout
    )
    return result


def check_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def test_two_processes_cross_into_informed_masking_and_publish(image_dataset_dir, config_file, tmp_path):
    output = tmp_path / "out"
    result = run(
        pretraining_args(
            image_dataset_dir, output, config_file,
            "--num_train_epochs", "3", "--informed_masking_start", "0.5", "--visualization_steps", "4",
            "--checkpointing_steps", "4", "--save_total_limit", "1",
        ),
        num_processes=2,
    )  # fmt: skip
    check_ok(result)
    summary = json.loads((output / "train_results.json").read_text())
    # 64 images, global batch 2 x 8 = 16: 4 steps an epoch, every image of each epoch used once across both ranks
    assert summary["num_processes"] == 2
    assert summary["total_steps"] == 12 and summary["step"] == 12
    assert summary["samples_seen"] == 3 * 64
    log = result.stderr + result.stdout
    assert "informed from step 6" in log
    assert "phase=random" in log and "phase=informed" in log
    assert [path.name for path in output.glob("checkpoint-*")] == ["checkpoint-12"]
    assert (output / "masks-step4.png").is_file() and (output / "masks.png").is_file()
    # one row per probe image; columns: input, random mask, bi-partition, informed mask, with hints, reconstruction
    assert Image.open(output / "masks.png").size == (6 * 32, 8 * 32)
    card = (output / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-feature-extraction")
    assert str(image_dataset_dir) in card and "| optimiser steps | 12 of 12" in card
    assert "final training loss | " in card and "n/a" not in card.split("final training loss")[1]
    state = load_file(output / "model.safetensors")
    assert int(state["training_step"]) == 12 and int(state["total_training_steps"]) == 12

    report = check_folder_in_fresh_process(output, tmp_path)
    assert report["features"] == [1, 65, 32] and report["pooled"] == [1, 32]


def test_killed_run_resumes_to_the_same_weights(image_dataset_dir, config_file, tmp_path):
    common = ("--max_train_steps", "12", "--checkpointing_steps", "3", "--informed_masking_start_step", "5")
    straight = tmp_path / "straight"
    check_ok(run(pretraining_args(image_dataset_dir, straight, config_file, *common)))

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        launch_command(1) + pretraining_args(image_dataset_dir, interrupted, config_file, *common),
        env=script_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the launcher's child must die with it
    )
    deadline = time.time() + 240
    while not (interrupted / "checkpoint-3" / "trainer_state.json").exists() and process.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (interrupted / "checkpoint-12").exists(), "the run finished before it could be killed"
    resumed = run(
        pretraining_args(image_dataset_dir, interrupted, config_file, *common, "--resume_from_checkpoint", "latest")
    )
    check_ok(resumed)
    assert "resumed from" in resumed.stderr

    expected, actual = load_file(straight / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
    for name in ("straight", "interrupted"):
        summary = json.loads((tmp_path / name / "train_results.json").read_text())
        assert summary["step"] == 12 and summary["samples_seen"] == 12 * 8


def test_streaming_and_in_memory_epochs_see_the_same_images(image_dataset_dir, config_file, tmp_path):
    seen = {}
    for mode, extra in (("memory", ()), ("stream", ("--streaming",))):
        output = tmp_path / mode
        check_ok(run(pretraining_args(image_dataset_dir, output, config_file, "--num_train_epochs", "1", *extra)))
        seen[mode] = json.loads((output / "train_results.json").read_text())["samples_seen"]
    assert seen["memory"] == seen["stream"] == 64


def write_dataset(root: Path, images: list[dict]) -> Path:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    data = datasets.Dataset.from_dict(
        {"image": images, "label": [i % 2 for i in range(len(images))]}, features=features
    )
    for split in ("train", "test"):
        (root / "data").mkdir(parents=True, exist_ok=True)
        data.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def png_bytes(image: Image.Image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def test_corrupt_and_grayscale_images_are_handled(config_file, tmp_path):
    rng = np.random.default_rng(0)
    images = [png_bytes(Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))) for _ in range(14)]
    images.append(png_bytes(Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8))))  # 1 channel
    images.append({"bytes": b"this is not an image", "path": None})
    dataset = write_dataset(tmp_path / "data", images)
    output = tmp_path / "out"
    result = run(
        pretraining_args(dataset, output, config_file, "--num_train_epochs", "1", "--max_train_samples", "16")
    )
    check_ok(result)
    summary = json.loads((output / "train_results.json").read_text())
    assert summary["skipped_images"] == 1 and summary["samples_seen"] == 15
    assert "skipping a corrupt image" in result.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--image_column", "photo"), "image column 'photo' not in the dataset"),
        (("--mask_strategy", "clever"), "mask_strategy must be one of"),
    ],
)
def test_bad_arguments_give_clear_errors(image_dataset_dir, config_file, tmp_path, extra, message):
    result = run(pretraining_args(image_dataset_dir, tmp_path / "out", config_file, *extra))
    assert result.returncode != 0
    assert message in result.stderr


def test_missing_dataset_gives_a_clear_error(config_file, tmp_path):
    result = run(pretraining_args(tmp_path / "nowhere", tmp_path / "out", config_file))
    assert result.returncode != 0
    assert "error: cannot load split 'train'" in result.stderr


def test_nan_loss_stops_the_run_and_keeps_checkpoints(image_dataset_dir, config_file, tmp_path):
    output = tmp_path / "out"
    args = pretraining_args(
        image_dataset_dir, output, config_file, "--max_train_steps", "8", "--checkpointing_steps", "1",
        "--base_learning_rate", "1e30", "--warmup_ratio", "0",
    )  # fmt: skip
    result = run(args)
    assert result.returncode != 0
    assert "the loss became nan" in result.stderr or "the loss became inf" in result.stderr
    checkpoints = sorted(output.glob("checkpoint-*"))
    assert checkpoints, "the steps before the NaN should have been checkpointed"
    assert "the last good checkpoint is" in result.stderr
    assert not (output / "model.safetensors").exists()
    assert not list(output.glob(".tmp-checkpoint-*"))


def test_checkpoint_objects_round_trip_and_pickled_code_in_them_is_refused(tmp_path):
    from accelerate import Accelerator

    from sgmae_training.checkpoints import OBJECTS_FILE, load_checkpoint, save_checkpoint

    accelerator = Accelerator()  # as the scripts build it: one process here
    layer = torch.nn.Linear(2, 2)
    _, optimizer = accelerator.prepare(layer, torch.optim.SGD(layer.parameters(), lr=1.0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    path = save_checkpoint(accelerator, str(tmp_path), {"step": 3}, None, {"scheduler": scheduler})
    assert not list(path.glob("custom_checkpoint_*")), "Accelerate unpickles these without weights_only"

    restored = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    assert load_checkpoint(accelerator, path, {"scheduler": restored}) == {"step": 3}
    assert restored.last_epoch == 3 and restored.get_last_lr() == scheduler.get_last_lr()

    marker = tmp_path / "code-ran"

    class Payload:  # what a tampered checkpoint could hold: unpickling it would create `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"scheduler": Payload()}, path / OBJECTS_FILE)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(accelerator, path, {"scheduler": restored})
    assert not marker.exists()

    (path / OBJECTS_FILE).unlink()  # a checkpoint written before OBJECTS_FILE existed
    with pytest.raises(SystemExit, match="written by an older version"):
        load_checkpoint(accelerator, path, {"scheduler": restored})


def test_demo_runs_without_a_dataset(tmp_path):
    output = tmp_path / "demo"
    args = ["--output_dir", str(output), "--max_train_steps", "2", "--per_device_train_batch_size", "8"]
    result = run([*args, "--dataloader_num_workers", "0", "--config_overrides", "num_hidden_layers=1"])
    check_ok(result)
    assert (output / "masks.png").is_file() and (output / "model.safetensors").is_file()
    assert "scikit-image sample photographs" in (output / "README.md").read_text()
