"""End-to-end tests of run_pretraining.py through real `accelerate launch` subprocesses on a small image slice."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import REPO_ROOT, check_folder_in_fresh_process, free_port, script_env, tiny_config
from PIL import Image
from safetensors.torch import load_file

from modeling_sgmae import SGMAEForPreTraining

sys.path.insert(0, str(REPO_ROOT))
import run_pretraining

SCRIPT = str(REPO_ROOT / "run_pretraining.py")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    tiny_config().to_json_file(path)
    return str(path)


def launch_command(num_processes: int) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
    if num_processes > 1:  # see HF_NOTES.md: --cpu --num_processes N silently starts one process
        command += ["--multi_gpu", "--main_process_port", str(free_port())]
    return [*command, "--num_processes", str(num_processes), "--dynamo_backend", "no", SCRIPT]


def pretraining_args(dataset: Path | str, output_dir: Path, config_file: str, *extra: str) -> list[str]:
    return [
        "--dataset_name", str(dataset), "--config_name", config_file, "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "8", "--max_train_samples", "64", "--max_eval_samples", "8",
        "--dataloader_num_workers", "0", "--logging_steps", "2", "--seed", "3", *extra,
    ]  # fmt: skip


def run(
    args: list[str], num_processes: int = 1, timeout: int = 300, plain_python: bool = False
) -> subprocess.CompletedProcess:
    """The script through `accelerate launch` (or plain python, quicker, for runs that fail before training)."""
    command = [sys.executable, SCRIPT] if plain_python else launch_command(num_processes)
    return subprocess.run(command + args, env=script_env(), capture_output=True, text=True, timeout=timeout)


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
    # the analysis panel (titled columns) under a 44-pixel header: run name, step, masking phase, colour legend
    assert Image.open(output / "masks.png").size == (6 * 150, 8 * 150 + 30 + 44)
    card = (output / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-feature-extraction")
    assert f"datasets:\n- {image_dataset_dir.name}\n" in card and str(image_dataset_dir) not in card  # no local path
    assert "| optimiser steps | 12 of 12" in card and "| global batch | 16 (2 processes) |" in card
    assert "| masking | self-guided, informed from step 6 |" in card
    assert "final training loss | " in card and "n/a" not in card.split("final training loss")[1]
    state = load_file(output / "model.safetensors")
    assert int(state["schedule.training_step"]) == 12 and int(state["schedule.total_training_steps"]) == 12

    report = check_folder_in_fresh_process(output, tmp_path)
    assert report["features"] == [1, 65, 32] and report["pooled"] == [1, 32]


def test_killed_or_stopped_run_resumes_to_the_same_weights(image_dataset_dir, config_file, tmp_path):
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

    # a sitting out of time stops cleanly at its first checkpoint; the same command with resume continues it
    stopped = tmp_path / "stopped"
    sitting = run(pretraining_args(image_dataset_dir, stopped, config_file, *common, "--stop_after_minutes", "1e-5"))
    check_ok(sitting)
    assert "stopped at step 3 of 12 (--stop_after_minutes)" in sitting.stderr
    assert [path.name for path in stopped.glob("checkpoint-*")] == ["checkpoint-3"]
    assert not (stopped / "train_results.json").exists() and not (stopped / "model.safetensors").exists()
    check_ok(
        run(pretraining_args(image_dataset_dir, stopped, config_file, *common, "--resume_from_checkpoint", "latest"))
    )

    expected = load_file(straight / "model.safetensors")
    for name in ("interrupted", "stopped"):
        actual = load_file(tmp_path / name / "model.safetensors")
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=f"{name}: {key}")
    for name in ("straight", "interrupted", "stopped"):
        summary = json.loads((tmp_path / name / "train_results.json").read_text())
        assert summary["step"] == 12 and summary["samples_seen"] == 12 * 8


def test_decode_once_resumes_exactly_with_two_processes(image_dataset_dir, config_file, tmp_path):
    """Decoded once, augmented on the device: a run resumed from its checkpoint ends with the same weights."""
    common = ("--max_train_steps", "8", "--checkpointing_steps", "4", "--input_path", "decode_once")
    common += ("--informed_masking_start_step", "3", "--per_device_train_batch_size", "4")
    straight = tmp_path / "straight"
    check_ok(run(pretraining_args(image_dataset_dir, straight, config_file, *common), num_processes=2))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-4", resumed / "checkpoint-4")
    args = pretraining_args(image_dataset_dir, resumed, config_file, *common, "--resume_from_checkpoint", "latest")
    result = run(args, num_processes=2)
    check_ok(result)
    assert "decoded 64 images once" in result.stderr and "resumed from" in result.stderr
    expected, actual = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
    summary = json.loads((resumed / "train_results.json").read_text())
    assert summary["num_processes"] == 2 and summary["samples_seen"] == 8 * 2 * 4


def test_streaming_and_in_memory_epochs_see_the_same_images(image_dataset_dir, config_file, tmp_path):
    seen = {}
    common = ("--num_train_epochs", "1", "--informed_mask_source", "step")  # parquet streams have no sample ids
    for mode, extra in (("memory", ()), ("stream", ("--streaming",))):
        output = tmp_path / mode
        check_ok(run(pretraining_args(image_dataset_dir, output, config_file, *common, *extra)))
        seen[mode] = json.loads((output / "train_results.json").read_text())["samples_seen"]
    assert seen["memory"] == seen["stream"] == 64


def write_dataset(root: Path, images: list[dict], splits: tuple[str, ...] = ("train", "test")) -> Path:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    data = datasets.Dataset.from_dict(
        {"image": images, "label": [i % 2 for i in range(len(images))]}, features=features
    )
    for split in splits:
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
    images.append({"bytes": b"this is not an image", "path": "broken-photo.jpg"})
    dataset = write_dataset(tmp_path / "data", images)
    output = tmp_path / "out"
    result = run(
        pretraining_args(dataset, output, config_file, "--num_train_epochs", "1", "--max_train_samples", "16")
    )
    check_ok(result)
    summary = json.loads((output / "train_results.json").read_text())
    assert summary["skipped_images"] == 1 and summary["samples_seen"] == 15
    assert "skipping a corrupt image (broken-photo.jpg)" in result.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--image_column", "label"), "column 'label' holds ClassLabel values, not images"),
        (("--config_overrides", "mask_ratio=0.99"), "masks 64 of the 64 patches"),
        (("--checkpointing_steps", "foo"), "--checkpointing_steps must be a positive integer, 'epoch' or 'none'"),
        (("--model_name_or_path", "facebook/vit-mae-base"), "could not be fetched from the Hub"),
    ],
)
def test_bad_arguments_give_clear_errors(image_dataset_dir, config_file, tmp_path, extra, message):
    result = run(pretraining_args(image_dataset_dir, tmp_path / "out", config_file, *extra), plain_python=True)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr  # one line that says what is wrong, not a stack
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--image_column", "photo"), "image column 'photo' not in the dataset"),
        (("--mask_strategy", "clever"), "field 'mask_strategy': TypeError: Field 'mask_strategy' expected one of"),
        (
            ("--config_overrides", "mask_ratio=1.5"),
            "field 'mask_ratio': ValueError: Value must be greater or equal to 0.0",
        ),
        (("--config_overrides", "mask_ratio=0.0"), "SGMAEConfig.mask_ratio 0.0 masks 0 of the 64 patches"),
        (("--config_overrides", "no_such_field=1"), "names fields SGMAEConfig does not have: ['no_such_field']"),
        (("--config_overrides", "hint_ratio="), "--config_overrides gives no value for 'hint_ratio'"),
        (("--config_overrides", "hint_ratio"), "--config_overrides item 'hint_ratio' is not name=value"),
        (("--checkpointing_steps", "0"), "--checkpointing_steps must be a positive integer"),
        (("--logging_steps", "0"), "--logging_steps must be a positive integer, got 0"),
        (("--per_device_train_batch_size", "0"), "--per_device_train_batch_size must be a positive integer"),
        (("--gradient_accumulation_steps", "0"), "--gradient_accumulation_steps must be a positive integer"),
        (("--max_train_steps", "0"), "--max_train_steps must be a positive integer, got 0"),
        (("--save_total_limit", "-1"), "--save_total_limit must be an integer >= 0, got -1"),
        (("--mixed_precision", "fp12"), "--mixed_precision must be one of auto, no, bf16, fp16, fp8, got 'fp12'"),
        (("--ddp_timeout", "0"), "--ddp_timeout must be a positive integer, got 0"),
        (("--push_to_hub",), "--push_to_hub needs --hub_model_id"),
    ],
)
def test_bad_arguments_are_refused_before_any_data_is_read(image_dataset_dir, config_file, tmp_path, extra, message):
    """The script's own checks, called in this process (the subprocess test above shows they reach the user)."""
    argv = ["run_pretraining.py", *pretraining_args(image_dataset_dir, tmp_path / "out", config_file, *extra)]
    with mock.patch.object(sys, "argv", argv), pytest.raises(SystemExit, match=re.escape(message)):
        model_args, data_args, _ = run_pretraining.parse_args()
        run_pretraining.build_model(model_args)
        run_pretraining.load_data(data_args)


def test_config_overrides_take_lists_booleans_and_none(image_dataset_dir, config_file, tmp_path):
    overrides = "image_size=[32,32],norm_pix_loss=False,mask_feature_layer=None, graph_edges=binary_mean"
    result = run(pretraining_args(image_dataset_dir, tmp_path / "out", config_file, "--max_train_steps", "1",
                                  "--config_overrides", overrides), plain_python=True)  # fmt: skip
    check_ok(result)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["image_size"] == [32, 32] and config["norm_pix_loss"] is False
    assert config["mask_feature_layer"] is None and config["graph_edges"] == "binary_mean"


def test_a_damaged_checkpoint_gives_a_clear_error(config_file, tmp_path):
    folder = tmp_path / "damaged"
    SGMAEForPreTraining(tiny_config()).save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut short
    result = run(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out")], plain_python=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"error: cannot build the model from '{folder}'" in result.stderr


def test_missing_dataset_gives_a_clear_error(config_file, tmp_path):
    result = run(pretraining_args(tmp_path / "nowhere", tmp_path / "out", config_file))
    assert result.returncode != 0
    assert "error: cannot load split 'train'" in result.stderr


def test_divergence_names_a_checkpoint_that_trains_on_and_its_advice_works(image_dataset_dir, config_file, tmp_path):
    output = tmp_path / "out"
    common = ("--checkpointing_steps", "1", "--warmup_ratio", "0", "--save_total_limit", "2")

    def pretrain(*extra: str) -> subprocess.CompletedProcess:
        return run(pretraining_args(image_dataset_dir, output, config_file, *common, *extra), plain_python=True)

    check_ok(pretrain("--max_train_steps", "3"))
    final_model = (output / "model.safetensors").read_bytes()
    # The same run, resumed with an absurd learning rate: it blows up within a few steps.
    blown = pretrain("--max_train_steps", "12", "--base_learning_rate", "1e30", "--resume_from_checkpoint", "latest")
    assert blown.returncode != 0 and "Traceback" not in blown.stderr
    assert "error: the loss became" in blown.stderr or "became non-finite" in blown.stderr
    named = re.search(r"The last good checkpoint is (\S+): resume from it", blown.stderr)
    assert named, blown.stderr[-2000:]
    good = Path(named.group(1))
    assert good.name in {"checkpoint-2", "checkpoint-3", "checkpoint-4"} and (good / "next_loss.json").is_file()
    for checkpoint in output.glob("checkpoint-*"):  # nothing non-finite was ever written
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())
    assert (output / "model.safetensors").read_bytes() == final_model and not list(output.glob(".tmp-*"))
    # Following the advice: back to that checkpoint with a sane learning rate trains on with finite losses.
    resumed = pretrain("--max_train_steps", "12", "--resume_from_checkpoint", str(good))
    check_ok(resumed)
    summary = json.loads((output / "train_results.json").read_text())
    assert summary["step"] == 12 and math.isfinite(summary["final_loss"])
    assert f"resumed from {good} at step" in resumed.stderr


def test_resume_takes_the_new_learning_rate_and_schedule_length(image_dataset_dir, config_file, tmp_path):
    common = ("--checkpointing_steps", "3", "--max_train_steps", "6", "--warmup_ratio", "0")
    straight = tmp_path / "straight"
    check_ok(run(pretraining_args(image_dataset_dir, straight, config_file, *common), plain_python=True))
    faster = tmp_path / "faster"
    faster.mkdir()
    shutil.copytree(straight / "checkpoint-3", faster / "checkpoint-3")
    result = run(pretraining_args(image_dataset_dir, faster, config_file, *common, "--base_learning_rate", "1.5e-2",
                                  "--resume_from_checkpoint", "latest"), plain_python=True)  # fmt: skip
    check_ok(result)
    assert "peak learning rate 0.000469 (checkpoint: 4.69e-06)" in result.stderr
    weights, reference = load_file(faster / "model.safetensors"), load_file(straight / "model.safetensors")
    assert not torch.equal(weights["vit.layers.0.mlp.fc1.weight"], reference["vit.layers.0.mlp.fc1.weight"])

    longer = tmp_path / "longer"
    longer.mkdir()
    shutil.copytree(straight / "checkpoint-6", longer / "checkpoint-6")
    args = [*common[:2], "--max_train_steps", "9", "--warmup_ratio", "0", "--resume_from_checkpoint", "latest"]
    result = run(pretraining_args(image_dataset_dir, longer, config_file, *args), plain_python=True)
    check_ok(result)
    assert "schedule length 9 steps (checkpoint: 6)" in result.stderr
    summary = json.loads((longer / "train_results.json").read_text())
    assert summary["step"] == 9 and summary["total_steps"] == 9


def test_resuming_a_finished_run_keeps_its_final_loss(image_dataset_dir, config_file, tmp_path):
    output = tmp_path / "out"
    args = pretraining_args(
        image_dataset_dir, output, config_file, "--max_train_steps", "4", "--checkpointing_steps", "4"
    )
    check_ok(run(args, plain_python=True))
    first = json.loads((output / "train_results.json").read_text())
    again = run([*args, "--resume_from_checkpoint", "latest"], plain_python=True)
    check_ok(again)
    assert json.loads((output / "train_results.json").read_text())["final_loss"] == first["final_loss"]
    assert first["final_loss"] is not None
    empty = tmp_path / "empty"
    fresh = run(pretraining_args(image_dataset_dir, empty, config_file, "--max_train_steps", "1",
                                 "--resume_from_checkpoint", "latest"), plain_python=True)  # fmt: skip
    check_ok(fresh)
    assert f"no checkpoint in {empty} yet: starting from scratch" in fresh.stderr


def test_a_dataset_without_a_test_split_uses_what_it_has(config_file, tmp_path):
    rng = np.random.default_rng(0)
    images = [png_bytes(Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))) for _ in range(16)]
    dataset = write_dataset(tmp_path / "data", images, splits=("train", "validation"))
    result = run(pretraining_args(dataset, tmp_path / "out", config_file, "--max_train_steps", "1"), plain_python=True)
    check_ok(result)
    assert "has no 'test' split: using its 'validation' split instead" in result.stderr
    only_train = write_dataset(tmp_path / "train-only", images, splits=("train",))
    result = run(
        pretraining_args(only_train, tmp_path / "out2", config_file, "--max_train_steps", "1"), plain_python=True
    )
    check_ok(result)
    assert "the probe images (mask panels, exploitation rates) come from the training split" in result.stderr


def test_checkpoint_objects_round_trip_and_pickled_code_in_them_is_refused(tmp_path):
    from accelerate import Accelerator

    from sgmae_training.checkpoints import OBJECTS_FILE, load_checkpoint, save_checkpoint
    from sgmae_training.training_state import TrainingState

    accelerator = Accelerator()  # as the scripts build it: one process here

    def probe_and_optimizer() -> dict:  # what the linear probe checkpoints beside Accelerate's state
        probe = torch.nn.Linear(2, 2)
        return {"probe": probe, "optimizer": torch.optim.SGD(probe.parameters(), lr=0.1, momentum=0.9)}

    objects = probe_and_optimizer()
    for _ in range(3):
        objects["probe"](torch.ones(1, 2)).sum().backward()
        objects["optimizer"].step()
    state = TrainingState(step=3, epoch=1, samples_seen=24, train_loss=0.5, total_steps=9)
    path = save_checkpoint(accelerator, str(tmp_path), state, None, objects)
    assert not list(path.glob("custom_checkpoint_*")), "Accelerate unpickles these without weights_only"

    restored = probe_and_optimizer()
    assert load_checkpoint(accelerator, path, restored) == state
    torch.testing.assert_close(restored["probe"].weight, objects["probe"].weight, rtol=0, atol=0)
    moments = [
        torch.equal(mine["momentum_buffer"], theirs["momentum_buffer"])
        for mine, theirs in zip(restored["optimizer"].state.values(), objects["optimizer"].state.values(), strict=True)
    ]
    assert moments == [True, True]

    marker = tmp_path / "code-ran"

    class Payload:  # what a tampered checkpoint could hold: unpickling it would create `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"probe": Payload()}, path / OBJECTS_FILE)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(accelerator, path, restored)
    assert not marker.exists()

    (path / OBJECTS_FILE).unlink()  # a checkpoint written before OBJECTS_FILE existed
    with pytest.raises(SystemExit, match="written by an older version"):
        load_checkpoint(accelerator, path, restored)


def test_demo_runs_without_a_dataset(tmp_path):
    output = tmp_path / "demo"
    args = ["--output_dir", str(output), "--max_train_steps", "2", "--per_device_train_batch_size", "8"]
    result = run([*args, "--dataloader_num_workers", "0", "--config_overrides", "num_hidden_layers=1"])
    check_ok(result)
    assert (output / "masks.png").is_file() and (output / "model.safetensors").is_file()
    assert Image.open(output / "masks.png").size[1] == 7 * 150 + 30 + 44  # each of the 7 photos once, no repeat
    assert "scikit-image sample photographs" in (output / "README.md").read_text()


@pytest.mark.parametrize("input_path", ["workers", "decode_once"])
def test_a_refresh_ranks_each_repeated_image_once_and_its_repeats_share_the_ranking(input_path, tmp_path):
    """The demo repeats each photo; a cached-mask refresh ranks each distinct photo once (not every repeat), through
    the script's own cache and input pipeline, and every repeat is masked by its photo's ranking."""
    argv = ["run_pretraining.py", "--output_dir", str(tmp_path), "--input_path", input_path,
            "--per_device_train_batch_size", "8", "--dataloader_num_workers", "0"]  # fmt: skip
    with mock.patch.object(sys, "argv", argv):
        _, data_args, args = run_pretraining.parse_args()
    with mock.patch.object(run_pretraining, "DEMO_REPEATS", 4):
        train_data, _, image_column = run_pretraining.load_data(data_args)
    train_data = run_pretraining.with_index(train_data)
    model = SGMAEForPreTraining(tiny_config(informed_masking_start_step=0))
    cache = run_pretraining.new_mask_cache(args, model.config, train_data, steps_per_epoch=2, total_steps=4)
    processor = run_pretraining.image_processor_for(model.config)
    _, whole_images = run_pretraining.input_pipeline(
        args, data_args, Accelerator(cpu=True), train_data, image_column, processor, model.config, cache.ranked_rows()
    )
    ranked, rank = [], model.informed_mask_scores

    def counting_rank(pixel_values: torch.Tensor) -> torch.Tensor:
        ranked.append(len(pixel_values))
        return rank(pixel_values)

    with mock.patch.object(model, "informed_mask_scores", side_effect=counting_rank):
        cache.refresh(model, whole_images(), step=0)
    photos = len(run_pretraining.DEMO_PHOTOS)
    assert len(train_data) == 4 * photos and sum(ranked) == photos
    rankings = cache.rankings.flatten(1).float()
    assert torch.isfinite(rankings).all()
    assert all(torch.equal(rankings[row], rankings[row % photos]) for row in range(len(train_data)))
