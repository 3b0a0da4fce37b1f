"""How batches reach the device: each process's shard of an epoch, worker loaders, decode-once tensors in host memory,
whole-image passes for evaluation and mask refreshes, and ranks that stop together."""

from __future__ import annotations

import itertools
import logging
import math
import tarfile
from collections.abc import Callable, Iterator

import datasets
import torch
from accelerate import Accelerator
from datasets.distributed import split_dataset_by_node
from torch import nn
from torch.utils.data import DataLoader
from transformers import ViTImageProcessor

from ..training_state import TrainingState
from .images import ImageCollator, eval_transform, storage_transform, warn_skipped
from .loading import INDEX_COLUMN, DataArguments, truncated_shard_message

logger = logging.getLogger(__name__)


def shard_for_process(dataset, accelerator: Accelerator, seed: int, epoch: int, shuffle: bool, buffer_size: int):
    """This process's share of one epoch: shuffled with the same seed on every rank, then split without overlap.

    A stream is split by whole shards (files) when their number is a multiple of the processes; otherwise every
    process reads every shard and keeps one sample in N (`datasets`' fallback, said once in the log). Fewer shards
    than processes is refused: most processes would read data only to drop it."""
    if isinstance(dataset, datasets.IterableDataset) and accelerator.num_processes > 1:
        check_stream_shards(dataset.num_shards, accelerator.num_processes)
    if shuffle:
        if isinstance(dataset, datasets.IterableDataset):
            dataset = dataset.shuffle(seed=seed, buffer_size=buffer_size)
            dataset.set_epoch(epoch)
        else:
            dataset = dataset.shuffle(seed=seed + epoch)
    if accelerator.num_processes > 1:
        dataset = split_dataset_by_node(dataset, rank=accelerator.process_index, world_size=accelerator.num_processes)
    return dataset


def check_stream_shards(num_shards: int, num_processes: int) -> None:
    """One line about a stream whose shards do not split evenly across the processes (see `shard_for_process`)."""
    if num_shards < num_processes:
        raise SystemExit(
            f"error: the stream has {num_shards} shard(s) for {num_processes} processes; write at least one shard per "
            "process, best a multiple of processes x --dataloader_num_workers (python -m sgmae_training.shards "
            "--num_shards N), or drop --streaming"
        )
    if num_shards % num_processes and num_processes not in _WARNED_UNEVEN:
        _WARNED_UNEVEN.add(num_processes)
        logger.warning(
            "%d shards do not split evenly across %d processes: every process reads every shard and keeps 1 sample "
            "in %d; use a multiple of %d shards", num_shards, num_processes, num_processes, num_processes,
        )  # fmt: skip


_WARNED_UNEVEN: set[int] = set()  # said once per run, not at every epoch


def skip_samples(dataset, count: int):
    """Drop the first `count` rows (resuming inside an epoch; none left when a checkpoint ended the epoch, so the loop
    goes on to the next)."""
    if count == 0:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.skip(count)
    if count >= len(dataset):  # `select(range(n, n))` is refused by `datasets`
        return dataset.select([])
    return dataset.select(range(count, len(dataset)))


def worker_epoch_batches(
    train_data,
    state: TrainingState,
    accelerator: Accelerator,
    data_args: DataArguments,
    batch_size: int,
    collate,
    seed: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """This process's batches of the epoch in `state`, past the samples it already trained on, decoded and augmented
    by `collate` in DataLoader workers, on the device.

    Full batches only (MAE's drop_last), and a generator of its own, so that building a loader draws nothing from
    the global RNG: a resumed run sees the same crops and masks as an uninterrupted one. Every process stops after
    as many batches as the shortest shard gives: counted up front for a map-style split (the shard lengths are
    known), agreed on per batch for a stream.
    """
    epoch_data = shard_for_process(train_data, accelerator, seed, state.epoch, True, data_args.shuffle_buffer_size)
    epoch_data = skip_samples(epoch_data, state.samples_in_epoch // accelerator.num_processes)
    loader = DataLoader(
        epoch_data,
        batch_size=batch_size,
        collate_fn=collate,
        num_workers=data_args.dataloader_num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed + state.epoch),
    )
    if isinstance(train_data, datasets.Dataset):
        processes = accelerator.num_processes
        shortest = len(train_data) // processes - state.samples_in_epoch // processes
        return (on_device(batch, accelerator) for batch in itertools.islice(loader, max(shortest, 0) // batch_size))
    return synchronized_batches(loader, accelerator)


def decode_all(
    dataset: datasets.Dataset, image_column: str, size: int, num_workers: int, max_gib: float, num_channels: int = 3
) -> tuple[torch.Tensor, int]:
    """Decode every image of a map-style split once: a uint8 tensor [N, C, size, size] in host memory (the central
    square of each image, shorter side `size`, `num_channels` channels), and the number of corrupt images left out.

    Refuses, before decoding, a split that would not fit in `max_gib` GiB."""
    if not isinstance(dataset, datasets.Dataset):
        raise SystemExit("error: --input_path decode_once needs a map-style split; drop --streaming")
    needed = len(dataset) * num_channels * size * size / 2**30
    if needed > max_gib:
        raise SystemExit(
            f"error: decoding {len(dataset)} images at {size}x{size} takes {needed:.1f} GiB, more than "
            f"--decode_once_max_gib {max_gib}; lower --storage_size, raise the budget or use --input_path workers"
        )
    images = torch.empty(len(dataset), num_channels, size, size, dtype=torch.uint8)
    collate = ImageCollator(storage_transform(size), image_column, num_channels=num_channels)
    # A generator of its own: building the loader must draw nothing from the global RNG (masks use it).
    loader = DataLoader(dataset, 256, collate_fn=collate, num_workers=num_workers, generator=torch.Generator())
    kept = skipped = 0
    for batch in loader:
        images[kept : kept + len(batch["pixel_values"])] = batch["pixel_values"]
        kept += len(batch["pixel_values"])
        skipped += int(batch["skipped"])
        warn_skipped(batch)
    logger.info(
        "decoded %d images once into %.2f GiB (%d corrupt ones left out)", kept,
        kept * num_channels * size**2 / 2**30, skipped,
    )  # fmt: skip
    return images[:kept], skipped


def decoded_epoch_batches(
    images: torch.Tensor,
    state: TrainingState,
    accelerator: Accelerator,
    batch_size: int,
    seed: int,
    augment: Callable,
    left_out: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """This process's batches of the epoch in `state` from decoded images, augmented on the device, with each
    image's row (`index`) and, when `augment` returns them, its crop (`crops`).

    The epoch's order is a seeded permutation, cut into equal shards (one per process), so every process has as many
    full batches; each batch's augmentation draws from a generator seeded by (seed, epoch, position), so a resumed
    run sees the same crops and flips as an uninterrupted one. The `left_out` corrupt images are counted as skipped
    once per epoch (with the first batch of process 0), as the worker path counts them each time it meets them.
    """
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + state.epoch))
    processes = accelerator.num_processes
    shard = order[: len(order) // processes * processes][accelerator.process_index :: processes]
    for start in range(state.samples_in_epoch // processes, len(shard) - batch_size + 1, batch_size):
        rows = shard[start : start + batch_size]
        generator = torch.Generator(device=accelerator.device)
        generator.manual_seed(
            (seed * 1_000_003 + state.epoch) * 1_000_003 + start * processes + accelerator.process_index
        )
        pixels = images[rows].to(accelerator.device, non_blocking=True)
        skipped = left_out if start == 0 and accelerator.process_index == 0 else 0
        batch = {"skipped": skipped, "index": rows.to(accelerator.device, non_blocking=True)}
        augmented = augment(pixels, generator)
        if isinstance(augmented, tuple):  # BatchAugmentation.with_crops: the crops come along
            augmented, batch["crops"] = augmented
        yield batch | {"pixel_values": augmented}


def whole_image_batches(
    dataset, image_column: str, processor: ViTImageProcessor, accelerator: Accelerator, batch_size: int,
    num_workers: int, num_channels: int, key_column: str | None = None,
) -> Iterator[dict[str, torch.Tensor]]:  # fmt: skip
    """This process's share of a split's whole images, resized to the model as evaluation does (no crop, no flip),
    in order, on the device, with their rows (`index`, from the INDEX_COLUMN of `with_index`) or, for a stream,
    their sample ids (`keys`, from `key_column`). Corrupt images are left out."""
    if isinstance(dataset, datasets.IterableDataset):
        share = split_dataset_by_node(dataset, accelerator.process_index, accelerator.num_processes)
        collate = ImageCollator(eval_transform(processor), image_column, num_channels=num_channels,
                                key_column=key_column)  # fmt: skip
    else:
        share = dataset.shard(accelerator.num_processes, accelerator.process_index, contiguous=True)
        collate = ImageCollator(eval_transform(processor), image_column, index_column=INDEX_COLUMN,
                                num_channels=num_channels)  # fmt: skip
    # A generator of its own: the loader's worker seeds must not come from the global RNG (training's crops do).
    loader = DataLoader(share, batch_size, collate_fn=collate, num_workers=num_workers, generator=torch.Generator())
    return (on_device(batch, accelerator) for batch in loader if len(batch["pixel_values"]))


def decoded_whole_images(
    images: torch.Tensor, processor: ViTImageProcessor, accelerator: Accelerator, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """This process's share of decoded images [N, C, S, S] (uint8), each resized whole to the model's size
    (bilinear, antialiased) and normalised, in order, on the device, with their rows (`index`)."""
    size = (processor.size["height"], processor.size["width"])
    mean = torch.tensor(processor.image_mean, device=accelerator.device).view(1, -1, 1, 1)
    std = torch.tensor(processor.image_std, device=accelerator.device).view(1, -1, 1, 1)
    share = math.ceil(len(images) / accelerator.num_processes)
    first = accelerator.process_index * share
    for start in range(first, min(first + share, len(images)), batch_size):
        rows = torch.arange(start, min(start + batch_size, first + share, len(images)))
        pixels = images[rows].to(accelerator.device, non_blocking=True).float() / 255
        pixels = nn.functional.interpolate(pixels, size, mode="bilinear", antialias=True, align_corners=False)
        yield {"pixel_values": (pixels - mean) / std, "index": rows.to(accelerator.device)}


def on_device(batch: dict, accelerator: Accelerator) -> dict:
    """The batch's tensors on the training device (the host-side skip count and sample ids stay on the host)."""
    return {key: value.to(accelerator.device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}  # fmt: skip


def synchronized_batches(loader, accelerator: Accelerator) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches on the device until any process runs out, so that ranks never wait on each other forever.

    For training only: the batches of the processes that did not run out are dropped, so an evaluation must not
    use it (see `sgmae_training.evaluation.Evaluation`, which counts every sample once).
    """
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator, None)
        except tarfile.TarError as error:  # a streamed WebDataset shard cut short: tarfile's message names no file
            raise SystemExit(truncated_shard_message(error, None)) from error
        if accelerator.num_processes > 1:
            exhausted = torch.tensor([batch is None], device=accelerator.device, dtype=torch.float32)
            if accelerator.reduce(exhausted, reduction="sum").item() > 0:
                return
        elif batch is None:
            return
        yield on_device(batch, accelerator)
