"""Non-RGB images through the scripts: 1- and 4-channel datasets pre-trained and evaluated by kNN, per-channel
normalisation measured or given and saved with the model, and channel counts that disagree with a checkpoint."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from test_run_classification import launch, run_main
from test_run_pretraining import check_ok, run
from test_run_pretraining import config_file as config_file  # a fixture
from transformers import AutoImageProcessor

from modeling_sgmae import SGMAEForPreTraining
from sgmae_training.data.images import image_processor_for, image_statistics
from sgmae_training.data.loaders import decode_all
from sgmae_training.data.loading import prepare_images

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import run_pretraining


def encoded(pixels: np.ndarray, image_format: str = "PNG") -> dict:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return {"bytes": buffer.getvalue(), "path": f"image.{image_format.lower()}"}


def channel_dataset(root: Path, bands: int, train_size: int = 32, test_size: int = 16) -> tuple[Path, np.ndarray]:
    """Two classes of `bands`-band 32x32 PNGs (class 1 brighter in the last band), as Hub-layout parquet splits;
    returns the folder and the training pixels [N, 32, 32, bands]."""
    rng = np.random.default_rng(bands)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["dim", "bright"])})
    (root / "data").mkdir(parents=True)
    training = None
    for split, size in (("train", train_size), ("test", test_size)):
        pixels = rng.integers(0, 120, (size, 32, 32, bands), dtype=np.uint8)
        labels = np.arange(size) % 2
        pixels[labels == 1, 8:24, 8:24, -1] += 120
        pixels = pixels[..., 0] if bands == 1 else pixels
        images = [encoded(image) for image in pixels]
        if split == "train":
            training = pixels
            if bands == 4:  # a 4-band TIFF is kept as 4 channels; an RGB image cannot be, it is skipped and counted
                images[1] = encoded(pixels[1], "TIFF")
                images[2] = encoded(pixels[2][..., :3])
        table = datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)
        table.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root, training


def pretrain(dataset: Path, output: Path, config_file: str, *extra: str) -> str:
    result = run(
        [
            "--dataset_name", str(dataset), "--config_name", config_file, "--output_dir", str(output),
            "--per_device_train_batch_size", "8", "--num_train_epochs", "1", "--dataloader_num_workers", "0",
            "--logging_steps", "2", "--checkpointing_steps", "none", *extra,
        ],
        plain_python=True,
    )  # fmt: skip
    check_ok(result)
    return result.stderr


def knn(dataset: Path, model: Path, output: Path) -> dict:
    args = ["--protocol", "knn", "--dataset_name", str(dataset), "--model_name_or_path", str(model)]
    args += ["--output_dir", str(output), "--per_device_eval_batch_size", "8", "--dataloader_num_workers", "0"]
    log = launch([*args, "--knn_k", "5"], plain_python=True).stderr
    assert "normalising with the checkpoint's mean" in log
    return json.loads((output / "eval_results.json").read_text())


def test_one_channel_images_pretrain_with_measured_statistics_and_knn_uses_them(config_file, tmp_path):
    dataset, pixels = channel_dataset(tmp_path / "gray", bands=1)
    output = tmp_path / "pretrained"
    log = pretrain(dataset, output, config_file, "--num_channels", "1")
    assert "normalising 1-channel images with mean" in log  # not RGB: measured, not ImageNet's
    config = json.loads((output / "config.json").read_text())
    assert config["num_channels"] == 1
    saved = json.loads((output / "preprocessor_config.json").read_text())
    # images at the model's size: the measured statistics are the training pixels' own
    assert saved["image_mean"] == pytest.approx([pixels.mean() / 255], abs=1e-4)
    assert saved["image_std"] == pytest.approx([pixels.std() / 255], abs=1e-4)
    assert (output / "masks.png").is_file()  # the mask panel shows a 1-channel image grey
    summary = json.loads((output / "train_results.json").read_text())
    assert summary["samples_seen"] == 32 and summary["skipped_images"] == 0

    # what from_pretrained / pipelines get: the saved processor normalises a grayscale image with those statistics
    processor = AutoImageProcessor.from_pretrained(output)
    values = processor(Image.fromarray(pixels[0]), return_tensors="pt")["pixel_values"]
    expected = (torch.from_numpy(pixels[0]).float() / 255 - saved["image_mean"][0]) / saved["image_std"][0]
    torch.testing.assert_close(values, expected[None, None], rtol=0, atol=1e-4)

    results = knn(dataset, output, tmp_path / "knn")
    assert results["eval_samples"] == 16 and results["train_features"] == 32
    assert 0.0 <= results["eval_top1"] <= 1.0


def test_four_band_images_keep_four_channels_with_given_statistics_through_pretraining_and_knn(config_file, tmp_path):
    dataset, _ = channel_dataset(tmp_path / "four", bands=4)
    output = tmp_path / "pretrained"
    mean, std = ["0.25", "0.25", "0.25", "0.4"], ["0.15", "0.15", "0.15", "0.3"]
    log = pretrain(dataset, output, config_file, "--num_channels", "4", "--image_mean", *mean, "--image_std", *std)
    assert "skipping an image with 3 bands (image.png, mode RGB): the model takes 4 channels" in log
    summary = json.loads((output / "train_results.json").read_text())
    assert summary["skipped_images"] == 1 and summary["samples_seen"] == 31  # the TIFF among them
    saved = json.loads((output / "preprocessor_config.json").read_text())
    assert saved["image_mean"] == [float(value) for value in mean]
    assert saved["image_std"] == [float(value) for value in std]
    weights = SGMAEForPreTraining.from_pretrained(output).vit.embeddings.patch_embeddings.projection.weight
    assert weights.shape[1] == 4

    results = knn(dataset, output, tmp_path / "knn")
    assert results["eval_samples"] == 16 and results["train_features"] == 31
    assert results["eval_skipped_images"] == 0


def test_channel_counts_and_statistics_that_do_not_fit_are_one_line_each(
    config_file, tmp_path, monkeypatch, image_dataset_dir
):
    checkpoint = tmp_path / "gray-model"
    SGMAEForPreTraining(tiny_config(num_channels=1)).save_pretrained(checkpoint)
    common = ("--dataset_name", str(image_dataset_dir), "--output_dir", str(tmp_path / "out"))
    message = run_main(monkeypatch, "--protocol", "knn", *common, "--model_name_or_path", str(checkpoint),
                       "--num_channels", "3")  # fmt: skip
    assert message == (
        f"error: --num_channels 3 disagrees with '{checkpoint}', which takes 1-channel images; drop --num_channels "
        "(the checkpoint decides) or start a new model with --config_name"
    )
    for extra, expected in [
        (("--model_name_or_path", str(checkpoint), "--num_channels", "4"), "--num_channels 4 disagrees with"),
        (("--config_name", config_file, "--image_mean", "0.5", "--image_std", "0.2"), "has 1 mean and 1 std values"),
        (("--config_name", config_file, "--image_mean", "0.5", "0.5", "0.5"), "give --image_mean and --image_std"),
        (("--config_name", config_file, "--num_channels", "0"), "--num_channels must be a positive integer"),
    ]:
        argv = ["run_pretraining.py", *common, "--max_train_samples", "16", *extra]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit, match=re.escape(expected)):
            model_args, data_args, _ = run_pretraining.parse_args()
            model = run_pretraining.build_model(model_args, data_args.num_channels)
            train_data, _, image_column = run_pretraining.load_data(data_args)
            statistics = image_statistics(data_args, model.config, train_data, image_column)
            image_processor_for(model.config, statistics)


def test_decode_once_keeps_each_image_s_channels(tmp_path):
    dataset, pixels = channel_dataset(tmp_path / "four", bands=4, train_size=6, test_size=2)
    split = prepare_images(datasets.load_dataset(str(dataset), split="train"), "image")
    images, skipped = decode_all(split, "image", size=32, num_workers=0, max_gib=1.0, num_channels=4)
    assert images.shape == (5, 4, 32, 32) and skipped == 1  # the RGB image left out
    assert torch.equal(images[0], torch.from_numpy(pixels[0]).permute(2, 0, 1))
    assert torch.equal(images[1], torch.from_numpy(pixels[1]).permute(2, 0, 1))  # the TIFF
