"""WebDataset shards: the writing/checking tool (sgmae_training/shards.py) and run_pretraining.py reading shards
streamed across processes and map-style, with a corrupt member, too few shards and a shard cut short."""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
from conftest import _write_generated_dataset
from PIL import Image
from test_run_pretraining import check_ok, run
from test_run_pretraining import config_file as config_file  # a fixture

from sgmae_training import shards
from sgmae_training.data import loaders
from sgmae_training.data.loaders import shard_for_process
from sgmae_training.data.loading import DataArguments, load_split


def write_shards(source: Path, output: Path, num_shards: int) -> dict[str, int]:
    return shards.main(["--dataset_name", str(source), "--output_dir", str(output), "--num_shards", str(num_shards)])


def corrupt_first_image(shard: Path) -> str:
    """Rewrite `shard` with its first image member's bytes replaced by garbage; returns that member's name."""
    with tarfile.open(shard) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    broken = next(member.name for member, _ in members if member.name.endswith(".png"))
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = b"not a png at all" if member.name == broken else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return broken


@pytest.fixture(scope="module")
def small_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated 96 + 48-image dataset even where $SGMAE_TEST_DATA points at real CIFAR-10 (CI): the counts
    below are its, and sharding 60,000 images would take minutes."""
    return _write_generated_dataset(tmp_path_factory.mktemp("small_dataset"))


@pytest.fixture(scope="module")
def shard_dir(small_dataset_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test dataset (96 train, 48 test images, 10 classes) as 4 + 4 shards, one train image corrupt."""
    output = tmp_path_factory.mktemp("shards")
    assert write_shards(small_dataset_dir, output, 4) == {"train": 96, "test": 48}
    return output


def shard_args(dataset: Path, output: Path, config_file: str, *extra: str) -> list[str]:
    return [
        "--dataset_name", str(dataset), "--config_name", config_file, "--output_dir", str(output),
        "--per_device_train_batch_size", "8", "--dataloader_num_workers", "0", "--logging_steps", "2",
        "--num_train_epochs", "1", "--checkpointing_steps", "none", *extra,
    ]  # fmt: skip


def test_tool_writes_equal_shards_that_datasets_reads_with_labels_and_sizes(small_dataset_dir, shard_dir, tmp_path):
    names = sorted(path.name for path in shard_dir.glob("*.tar"))
    assert names == [f"{split}-0000{i}-of-00004.tar" for split in ("test", "train") for i in range(4)]
    report = shards.main(["--check", str(shard_dir)])
    assert report == {name: f"{12 if name.startswith('test') else 24} samples" for name in names}

    source = datasets.load_dataset(str(small_dataset_dir), split="train")
    stream = datasets.load_dataset(str(shard_dir), split="train", streaming=True)
    assert stream.num_shards == 4 and stream.info.splits["train"].num_examples == 96  # README.md states the size
    assert stream.features["cls"].names == source.features["label"].names
    rows = list(stream.cast_column("png", datasets.Image(decode=False)))
    assert len(rows) == 96 and len({row["__key__"] for row in rows}) == 96
    # each sample is the source row its key names: the same PNG bytes, the same label
    undecoded = source.cast_column("img", datasets.Image(decode=False))
    for row in rows[:10]:
        original = undecoded[int(row["__key__"])]
        assert row["png"]["bytes"] == original["img"]["bytes"] and row["cls"] == original["label"]
    # shuffled before sharding: the first shard holds several classes, not the first 24 rows
    first_shard = [row for row in rows if row["__url__"].endswith("train-00000-of-00004.tar")]
    assert len({row["cls"] for row in first_shard}) > 3 and len(first_shard) == 24

    with pytest.raises(SystemExit, match=re.escape("already holds .tar shards")):
        write_shards(small_dataset_dir, shard_dir, 2)


def test_pretraining_streams_shards_across_two_processes_and_skips_a_corrupt_member(
    small_dataset_dir, config_file, tmp_path
):
    shard_dir = tmp_path / "shards"
    write_shards(small_dataset_dir, shard_dir, 4)
    broken = corrupt_first_image(shard_dir / "train-00002-of-00004.tar")
    output = tmp_path / "stream"
    result = run(shard_args(shard_dir, output, config_file, "--streaming"), num_processes=2)
    check_ok(result)
    summary = json.loads((output / "train_results.json").read_text())
    # 2 shards of 24 per process, 3 full batches of 8 each: every sample of the epoch once, the corrupt one skipped
    assert summary["num_processes"] == 2 and summary["step"] == 96 // 16
    assert summary["skipped_images"] == 1 and summary["samples_seen"] == 95
    assert f"skipping a corrupt image ({broken})" in result.stderr
    assert "do not split evenly" not in result.stderr  # whole shards per process
    processor = json.loads((output / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.485, 0.456, 0.406]  # RGB: MAE's statistics, as before

    mapped = tmp_path / "map-style"
    result = run(shard_args(shard_dir, mapped, config_file, "--max_train_steps", "3"), plain_python=True)
    check_ok(result)
    summary = json.loads((mapped / "train_results.json").read_text())
    assert summary["step"] == 3 and summary["samples_seen"] + summary["skipped_images"] == 24


def test_fewer_shards_than_processes_is_one_clear_line_not_a_hang(small_dataset_dir, config_file, tmp_path):
    shard_dir = tmp_path / "shards"
    write_shards(small_dataset_dir, shard_dir, 1)
    started = time.time()
    result = run(shard_args(shard_dir, tmp_path / "out", config_file, "--streaming"), num_processes=2, timeout=180)
    assert result.returncode != 0
    assert "error: the stream has 1 shard(s) for 2 processes; write at least one shard per process" in result.stderr
    assert time.time() - started < 150 and not (tmp_path / "out" / "model.safetensors").exists()


def cut_short(shard: Path, member_index: int, inside: bool) -> None:
    """Truncate `shard` inside its `member_index`-th member's data, or just before that member's header."""
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[member_index]
    with shard.open("r+b") as file:
        file.truncate(member.offset_data + member.size // 2 if inside else member.offset)


def test_a_shard_cut_short_is_named_by_check_and_stops_training_with_one_line(
    small_dataset_dir, config_file, tmp_path
):
    inside, between = tmp_path / "inside", tmp_path / "between"
    for folder in (inside, between):
        write_shards(small_dataset_dir, folder, 2)
    cut_short(inside / "train-00001-of-00002.tar", 6, inside=True)  # inside the 4th sample's image
    cut_short(between / "train-00001-of-00002.tar", 6, inside=False)  # after 3 whole samples: reads as a short tar
    with pytest.raises(SystemExit, match=re.escape("1 damaged shard(s): train-00001-of-00002.tar")):
        shards.main(["--check", str(inside)])
    report = shards.check_shards(str(between))
    assert report["train-00001-of-00002.tar"] == "damaged: no end-of-archive marker after 3 samples (cut short)"
    assert "train split" not in report  # the shard's line says it
    (between / "train-00001-of-00002.tar").unlink()
    assert (
        shards.check_shards(str(between))["train split"]
        == "damaged: 48 samples, README.md states 96 (a shard missing?)"
    )

    # map-style: preparing the split reads every shard (and compares its size with README.md's)
    for folder, message in ((inside, "is damaged (unexpected end of data)"), (between, "does not have the size")):
        arguments = DataArguments(dataset_name=str(folder), cache_dir=str(tmp_path / "cache"))
        with pytest.raises(SystemExit, match=re.escape(message)):
            load_split(arguments, "train", False)
    # streamed: the run reaches the shard, then stops with the same advice instead of a worker's traceback
    result = run(shard_args(inside, tmp_path / "out", config_file, "--streaming"), plain_python=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "is damaged (unexpected end of data); `python -m sgmae_training.shards --check" in result.stderr


def test_tool_converts_an_image_folder_and_leaves_out_unreadable_files(tmp_path):
    rng = np.random.default_rng(0)
    for index, name in enumerate(["cat", "cat", "dog", "dog", "dog"]):
        folder = tmp_path / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
        image.save(folder / f"{index}.{'jpg' if index == 4 else 'png'}")  # one JPEG among PNGs
    (tmp_path / "images" / "dog" / "broken.png").write_bytes(b"not an image")
    output = tmp_path / "shards"
    written = shards.main(
        ["--train_dir", str(tmp_path / "images"), "--output_dir", str(output), "--image_format", "png"]
    )
    assert written == {"train": 5}  # the unreadable file left out
    rows = list(datasets.load_dataset(str(output), split="train", streaming=True))
    assert sorted(rows[0]) == ["__key__", "__url__", "cls", "png"]
    assert [row["png"].format for row in rows] == ["PNG"] * 5  # the JPEG re-encoded: one image column
    names = datasets.load_dataset(str(output), split="train", streaming=True).features["cls"].names
    assert names == ["cat", "dog"] and sorted(row["cls"] for row in rows) == [0, 0, 1, 1, 1]
    unlabelled = tmp_path / "unlabelled"
    shards.main(["--train_dir", str(tmp_path / "images"), "--output_dir", str(unlabelled), "--label_column", "none"])
    assert "cls" not in datasets.load_dataset(str(unlabelled), split="train", streaming=True).features


def test_a_stream_is_split_by_whole_shards_only_when_they_divide_evenly(
    small_dataset_dir, tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr(loaders, "_WARNED_UNEVEN", set())  # whatever ran before in this process
    shard_dir = tmp_path / "shards"
    write_shards(small_dataset_dir, shard_dir, 3)
    stream = datasets.load_dataset(str(shard_dir), split="train", streaming=True)
    for rank in range(2):
        process = SimpleNamespace(num_processes=2, process_index=rank)
        shard_for_process(stream, process, seed=0, epoch=0, shuffle=False, buffer_size=0)
    assert caplog.text.count("3 shards do not split evenly across 2 processes") == 1  # said once, not per epoch
    with pytest.raises(SystemExit, match=re.escape("the stream has 3 shard(s) for 4 processes")):
        shard_for_process(stream, SimpleNamespace(num_processes=4, process_index=0), 0, 0, False, 0)
