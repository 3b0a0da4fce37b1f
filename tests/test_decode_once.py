"""Decode-once input path: the stored images, the memory budget, corrupt files, and the epochs' batches."""

from __future__ import annotations

import io
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional

from sgmae_training.data.images import decode_image
from sgmae_training.data.loaders import decode_all, decoded_epoch_batches, worker_epoch_batches
from sgmae_training.data.loading import prepare_images
from sgmae_training.training_state import TrainingState


def image_split(count: int, corrupt: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    cells = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        cells.append({"bytes": buffer.getvalue(), "path": None})
    cells += [{"bytes": b"not an image", "path": "broken.png"}] * corrupt
    data = datasets.Dataset.from_dict({"image": cells}, features=datasets.Features({"image": datasets.Image()}))
    return prepare_images(data, "image")


def test_decoded_images_are_the_decoding_paths_images():
    split = image_split(5, corrupt=1)
    images, skipped = decode_all(split, "image", size=32, num_workers=0, max_gib=1.0)
    assert images.dtype == torch.uint8 and images.shape == (5, 3, 32, 32) and skipped == 1
    for index in range(5):  # at the images' own size, storing changes nothing
        assert torch.equal(images[index], functional.pil_to_tensor(decode_image(split[index]["image"])))
    smaller, _ = decode_all(split, "image", size=16, num_workers=0, max_gib=1.0)
    assert smaller.shape == (5, 3, 16, 16)


def test_a_split_over_the_memory_budget_is_refused_before_decoding():
    with pytest.raises(SystemExit, match=r"decoding 5 images at 224x224 takes 0.0 GiB, more than --decode_once_max"):
        decode_all(image_split(5), "image", size=224, num_workers=0, max_gib=1e-6)
    with pytest.raises(SystemExit, match="needs a map-style split"):
        decode_all(image_split(2).to_iterable_dataset(), "image", size=32, num_workers=0, max_gib=1.0)


def batches(images, state, process_index, processes=2, batch_size=3, left_out=0):
    accelerator = SimpleNamespace(num_processes=processes, process_index=process_index, device=torch.device("cpu"))

    def identity(pixels, generator):
        return pixels

    return list(
        decoded_epoch_batches(images, state, accelerator, batch_size, seed=7, augment=identity, left_out=left_out)
    )


def test_processes_get_disjoint_equal_shards_and_a_resume_continues_exactly():
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 3, 2, 2).contiguous()
    state = TrainingState(epoch=1, samples_in_epoch=0)
    seen = [torch.cat([b["pixel_values"][:, 0, 0, 0] for b in batches(images, state, rank)]) for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 9  # 10 rows each, full batches of 3
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    resumed = batches(images, TrainingState(epoch=1, samples_in_epoch=2 * 3), 0)  # after one batch on both processes
    assert torch.equal(torch.cat([b["pixel_values"][:, 0, 0, 0] for b in resumed]), seen[0][3:])
    # Images left out at decoding count as skipped once per epoch over all processes, like the worker path's.
    counted = [sum(b["skipped"] for b in batches(images, state, rank, left_out=2)) for rank in (0, 1)]
    assert counted == [2, 0]
    assert sum(b["skipped"] for b in batches(images, TrainingState(epoch=1, samples_in_epoch=6), 0, left_out=2)) == 0
    other_epoch = batches(images, TrainingState(epoch=2, samples_in_epoch=0), 0)
    assert not torch.equal(torch.cat([b["pixel_values"][:, 0, 0, 0] for b in other_epoch]), seen[0])


def test_augmented_batches_are_the_same_after_a_resume():
    from sgmae_training.augment import BatchAugmentation

    images = torch.randint(0, 256, (12, 3, 20, 20), dtype=torch.uint8)
    accelerator = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))
    augment = BatchAugmentation((16, 16), (0.5,) * 3, (0.25,) * 3)

    def epoch(samples_in_epoch):
        state = TrainingState(epoch=0, samples_in_epoch=samples_in_epoch)
        return list(decoded_epoch_batches(images, state, accelerator, 4, seed=1, augment=augment))

    straight, resumed = epoch(0), epoch(4)
    assert len(straight) == 3 and len(resumed) == 2
    for first, second in zip(straight[1:], resumed, strict=True):
        assert torch.equal(first["pixel_values"], second["pixel_values"])
    assert not torch.equal(straight[0]["pixel_values"], straight[1]["pixel_values"])


def test_the_worker_path_counts_its_batches_up_front_for_a_map_style_split():
    """Uneven shards (11 and 10 rows): both processes stop after the shorter shard's full batches, with no collective
    call per batch (the stub accelerator has no `reduce`), and they never share a row."""
    dataset = datasets.Dataset.from_dict({"x": list(range(21))})
    data_args = SimpleNamespace(shuffle_buffer_size=0, dataloader_num_workers=0)

    def collate(rows: list[dict]) -> dict:
        return {"pixel_values": torch.tensor([row["x"] for row in rows]), "skipped": 0}

    def rows_of(process_index: int, samples_in_epoch: int) -> list[list[int]]:
        accelerator = SimpleNamespace(num_processes=2, process_index=process_index, device=torch.device("cpu"))
        state = TrainingState(epoch=1, samples_in_epoch=samples_in_epoch)
        batches = worker_epoch_batches(dataset, state, accelerator, data_args, 4, collate, seed=0)
        return [batch["pixel_values"].tolist() for batch in batches]

    first, second = rows_of(0, 0), rows_of(1, 0)
    assert len(first) == len(second) == 2 and all(len(batch) == 4 for batch in first + second)
    assert not {row for batch in first for row in batch} & {row for batch in second for row in batch}
    # resuming after one global batch of 8 leaves each process one full batch: its second
    assert rows_of(0, 8) == first[1:] and rows_of(1, 8) == second[1:]
