"""Where the images come from and how they reach the model: splits, columns, decoding, transforms, sharding."""

from __future__ import annotations

import io
import itertools
import logging
import math
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from datasets.distributed import split_dataset_by_node
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import RandomResizedCrop, v2
from transformers import ViTImageProcessor
from transformers.utils import cached_file

from modeling_sgmae.analysis import MAE_IMAGE_MEAN, MAE_IMAGE_STD

from .arguments import check_positive
from .augment import crop_record
from .training_state import TrainingState

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label", "cls")  # "cls": a WebDataset shard's `{key}.cls` member
POSITIVE_ARGUMENTS = (
    "max_train_samples", "max_eval_samples", "num_train_samples", "shuffle_buffer_size", "num_channels",
    "image_statistics_samples",
)  # fmt: skip
# PIL modes a 1- or 3-channel model's images are converted to; other channel counts keep an image's own bands
CHANNEL_MODES = {1: "L", 3: "RGB"}
INDEX_COLUMN = "__sample_index__"  # a row's number, its identity across processes during evaluation

# scikit-image's photographs: the pre-training demo's data, and app.py's examples
DEMO_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


@dataclass
class DataArguments:
    """Where the images come from (shared by both scripts)."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id or local folder in the Hub layout (e.g. parquet shards)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder for training (class subfolders)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder for evaluation."})
    train_split: str = field(default="train", metadata={"help": "Split used for training."})
    validation_split: str = field(default="test", metadata={"help": "Split used for evaluation/visualisation."})
    image_column: str | None = field(
        default=None, metadata={"help": f"Image column; auto-detected among {IMAGE_COLUMNS} when unset."}
    )
    streaming: bool = field(default=False, metadata={"help": "Stream the training split (IterableDataset)."})
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Shuffle buffer of a streamed split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation images."})
    num_train_samples: int | None = field(
        default=None, metadata={"help": "Size of a streamed training split whose size the dataset does not state."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for datasets and models."})
    dataloader_num_workers: int = field(default=2, metadata={"help": "Data-loading worker processes per device."})
    num_channels: int | None = field(
        default=None,
        metadata={
            "help": "Image channels (default: the model's config). 1: grayscale (L), 3: RGB, others: the images' own "
            "bands (e.g. 4-band PNG/TIFF). A new model takes it; a checkpoint must agree."
        },
    )
    image_mean: list[float] | None = field(
        default=None, metadata={"help": "Normalisation mean, one value per channel (saved with the model)."}
    )
    image_std: list[float] | None = field(
        default=None, metadata={"help": "Normalisation std, one value per channel (saved with the model)."}
    )
    compute_image_statistics: bool = field(
        default=False,
        metadata={
            "help": "Measure the per-channel mean/std on the first --image_statistics_samples training images "
            "(the default for a new model whose images are not RGB)."
        },
    )
    image_statistics_samples: int = field(
        default=1000, metadata={"help": "How many training images --compute_image_statistics measures."}
    )


def load_split(args: DataArguments, split: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    """Load one split from `dataset_name` or an image folder, with a clear error when it cannot be found."""
    folder = args.train_dir if split == args.train_split else args.validation_dir
    try:
        if args.dataset_name:
            dataset = datasets.load_dataset(
                args.dataset_name, args.dataset_config_name, split=split, streaming=streaming, cache_dir=args.cache_dir
            )
        elif folder:
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"image folder {folder!r} does not exist")
            dataset = datasets.load_dataset(
                "imagefolder", data_dir=folder, split="train", streaming=streaming, cache_dir=args.cache_dir
            )
        else:
            raise ValueError("give --dataset_name or --train_dir/--validation_dir")
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError, ValueError) as error:
        source = args.dataset_name or folder
        raise SystemExit(f"error: cannot load split {split!r} of {source!r}: {error}") from error
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, tarfile.TarError):  # preparing a map-style split reads every shard
            raise SystemExit(truncated_shard_message(error.__cause__, args.dataset_name)) from error
        raise
    except datasets.exceptions.NonMatchingSplitsSizesError as error:  # e.g. a shard cut between two samples
        raise SystemExit(
            f"error: split {split!r} of {args.dataset_name!r} does not have the size its README.md states "
            f"({error}): a file is missing or cut short; `python -m sgmae_training.shards --check "
            f"{args.dataset_name}` checks shards"
        ) from error
    return dataset


def truncated_shard_message(error: tarfile.TarError, source: str | None) -> str:
    """One line for a WebDataset shard that ends inside a member (a copy cut short): tarfile does not name it."""
    folder = source or "<the --dataset_name folder>"
    return (
        f"error: a .tar shard of {folder} is damaged ({error}); `python -m sgmae_training.shards --check {folder}` "
        "names it; rewrite or remove it (then resume with --resume_from_checkpoint latest)"
    )


def check_data_arguments(data_args: DataArguments, positive: tuple[str, ...] = POSITIVE_ARGUMENTS) -> None:
    """Clear errors, before anything is loaded, for data arguments out of range."""
    check_positive(data_args, positive)
    if data_args.dataloader_num_workers < 0:
        raise SystemExit(f"error: --dataloader_num_workers must be 0 or more, got {data_args.dataloader_num_workers}")
    mean, std = data_args.image_mean, data_args.image_std
    if (mean is None) != (std is None) or (mean is not None and len(mean) != len(std)):
        raise SystemExit("error: give --image_mean and --image_std together, one value per channel each")
    if std is not None and min(std) <= 0:
        raise SystemExit(f"error: --image_std values must be positive, got {std}")
    if mean is not None and data_args.compute_image_statistics:
        raise SystemExit("error: give --image_mean/--image_std or --compute_image_statistics, not both")


def find_column(features: datasets.Features | None, given: str | None, candidates: tuple[str, ...], kind: str) -> str:
    """The named column, or the first of `candidates` present; a clear error otherwise."""
    names = list(features or {})
    if given:
        if names and given not in names:
            raise SystemExit(f"error: {kind} column {given!r} not in the dataset (columns: {names})")
        return given
    for name in candidates:
        if name in names:
            return name
    raise SystemExit(f"error: no {kind} column found among {names}; pass --{kind}_column")


def find_image_column(features: datasets.Features | None, given: str | None) -> str:
    """`find_column` for images, and a clear error when the column holds something else (e.g. the labels).

    Without a column of a usual name, the dataset's only image column is taken: WebDataset shards name it after the
    members' extension (`jpg`, `png`, ...)."""
    images = [name for name, value in (features or {}).items() if isinstance(value, datasets.Image)]
    names = list(features or {})
    if not given and len(images) == 1 and not any(name in names for name in IMAGE_COLUMNS):
        return images[0]
    column = find_column(features, given, IMAGE_COLUMNS, "image")
    feature = (features or {}).get(column)
    if feature is not None and not isinstance(feature, datasets.Image):
        raise SystemExit(
            f"error: column {column!r} holds {type(feature).__name__} values, not images; "
            f"pass --image_column with an image column (this dataset's: {images or 'none'})"
        )
    return column


def evaluation_split(data_args: DataArguments, wanted: str) -> str | None:
    """The split to take evaluation (or probe) images from: `wanted` if the dataset has it, else its `validation`
    or `test` split (said in the log), else None. Image folders use --validation_dir."""
    if not data_args.dataset_name:
        return wanted if data_args.validation_dir else None
    try:
        names = datasets.get_dataset_split_names(data_args.dataset_name, data_args.dataset_config_name)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError):
        return wanted  # let load_split say what is wrong
    if wanted in names:
        return wanted
    for name in ("validation", "test", "val"):
        if name in names:
            logger.warning("the dataset has no %r split: using its %r split instead", wanted, name)
            return name
    logger.warning("the dataset has no %r split (it has %s)", wanted, names)
    return None


def prepare_images(dataset, image_column: str):
    """Keep images undecoded so a corrupt file can be skipped at collate time instead of killing the run."""
    return dataset.cast_column(image_column, datasets.Image(decode=False))


def decode_image(value: Any, num_channels: int = 3) -> Image.Image | None:
    """Decode an image cell (undecoded dict, PIL image or path) to `num_channels` channels (see `to_channels`);
    None when the file is corrupt or its bands cannot become that many channels."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        else:
            image = Image.open(value["path"] if isinstance(value, dict) else value)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        name = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        logger.warning("skipping a corrupt image (%s): %s", name or "no file name", error)
        return None
    converted = to_channels(image, num_channels)
    if converted is None:
        name = value.get("path") if isinstance(value, dict) else None
        logger.warning(
            "skipping an image with %d bands (%s, mode %s): the model takes %d channels",
            len(image.getbands()), name or "no file name", image.mode, num_channels,
        )  # fmt: skip
    return converted


def to_channels(image: Image.Image, num_channels: int) -> Image.Image | None:
    """The image as grayscale (L) for 1 channel or RGB for 3, whatever its mode (alpha dropped, palettes expanded);
    for other counts its own bands when it has that many (a 4-band PNG/TIFF: RGBA or CMYK), else None.

    8-bit bands only: 16-bit or float images (modes I;16, I, F) are not rescaled here."""
    mode = CHANNEL_MODES.get(num_channels)
    if mode is not None:
        return image if image.mode == mode else image.convert(mode)
    return image if len(image.getbands()) == num_channels else None


def image_processor_for(config, statistics: tuple[list[float], list[float]] | None = None) -> ViTImageProcessor:
    """The processor saved beside the weights: resize to the model's size, normalise with per-channel `statistics`
    (mean, std), by default MAE's (ImageNet) for RGB. Its mean/std travel in preprocessor_config.json, so
    `from_pretrained` and pipelines normalise as training did."""
    height, width = config.image_height_width
    mean, std = statistics or (list(MAE_IMAGE_MEAN), list(MAE_IMAGE_STD))
    if len(mean) != config.num_channels or len(std) != config.num_channels:
        raise SystemExit(
            f"error: the normalisation has {len(mean)} mean and {len(std)} std values for a "
            f"{config.num_channels}-channel model; give one per channel (--image_mean/--image_std)"
        )
    return ViTImageProcessor(
        do_resize=True,
        size={"height": height, "width": width},
        resample=Image.Resampling.BICUBIC,
        image_mean=[float(value) for value in mean],
        image_std=[float(value) for value in std],
    )


def image_statistics(
    data_args: DataArguments, config, train_data, image_column: str, checkpoint: str | None = None
) -> tuple[list[float], list[float]] | None:
    """The per-channel (mean, std) to normalise with, or None for MAE's RGB default; the first that applies:
    --image_mean/--image_std; measured (--compute_image_statistics); the checkpoint's saved processor (the encoder
    learned on those); measured again when the images are not RGB (ImageNet's statistics would be a guess)."""
    channels = config.num_channels
    if data_args.image_mean is not None:
        return list(data_args.image_mean), list(data_args.image_std)
    saved = None if checkpoint is None or data_args.compute_image_statistics else saved_statistics(checkpoint)
    if saved is not None and len(saved[0]) == channels:
        logger.info("normalising with the checkpoint's mean %s and std %s", *saved)
        return saved
    if not data_args.compute_image_statistics and channels == 3:
        return None
    count = data_args.image_statistics_samples
    mean, std = measure_image_statistics(
        limit_samples(train_data, count), image_column, channels, config, data_args.dataloader_num_workers
    )
    logger.info(
        "normalising %d-channel images with mean %s and std %s, measured on the first %d training images "
        "(--image_mean/--image_std set them)", channels, rounded(mean), rounded(std), count,
    )  # fmt: skip
    return mean, std


def rounded(values: list[float]) -> list[float]:
    return [round(value, 4) for value in values]


def saved_statistics(checkpoint: str) -> tuple[list[float], list[float]] | None:
    """The mean/std of a checkpoint's preprocessor_config.json (None when it has none or does not normalise)."""
    found = cached_file(
        checkpoint,
        "preprocessor_config.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if found is None:
        return None
    saved = ViTImageProcessor.from_pretrained(checkpoint)
    if not saved.do_normalize:
        return None
    mean = [saved.image_mean] if isinstance(saved.image_mean, float) else saved.image_mean
    std = [saved.image_std] if isinstance(saved.image_std, float) else saved.image_std
    return [float(value) for value in mean], [float(value) for value in std]


def measure_image_statistics(
    dataset, image_column: str, num_channels: int, config, num_workers: int
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] over all pixels of `dataset`'s images, resized to the model's size as
    evaluation does (corrupt images left out). Every process reads the same images and gets the same numbers."""
    height, width = config.image_height_width
    resize = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((height, width), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    collate = ImageCollator(resize, image_column, num_channels=num_channels)
    loader = DataLoader(dataset, 64, collate_fn=collate, num_workers=num_workers, generator=torch.Generator())
    sums = torch.zeros(2, num_channels, dtype=torch.float64)  # sum of x and of x^2 per channel
    pixels = 0
    for batch in loader:
        values = batch["pixel_values"].double()
        if len(values):
            sums += torch.stack([values.sum(dim=(0, 2, 3)), values.square().sum(dim=(0, 2, 3))])
            pixels += values[:, 0].numel()
    if not pixels:
        raise SystemExit("error: no readable training image to measure the normalisation statistics on")
    mean = sums[0] / pixels
    std = (sums[1] / pixels - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)  # a constant band: no division by 0
    return mean.tolist(), std.tolist()


def check_num_channels(requested: int | None, config, source: str) -> None:
    """A clear error when --num_channels disagrees with the channels of the checkpoint's patch projection."""
    if requested is not None and requested != config.num_channels:
        raise SystemExit(
            f"error: --num_channels {requested} disagrees with {source!r}, which takes {config.num_channels}-channel "
            "images; drop --num_channels (the checkpoint decides) or start a new model with --config_name"
        )


class TrainTransform:
    """MAE augmentation: RandomResizedCrop (bicubic), horizontal flip, normalisation. Returns the input and its crop
    [5] (top, left, height, width as fractions of the image, then the flip as 0.0 / 1.0), so a stored whole-image
    ranking can be cropped with it (`mask_cache`).

    Written out rather than as a torchvision pipeline to know the box; it draws from torch's RNG exactly as
    `v2.RandomResizedCrop` followed by `v2.RandomHorizontalFlip` do, so the crops are the same."""

    def __init__(
        self, processor: ViTImageProcessor, scale: tuple[float, float] = (0.2, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)
    ):
        self.size = (processor.size["height"], processor.size["width"])
        self.scale, self.ratio = scale, ratio
        self.normalize = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(processor.image_mean, processor.image_std)]
        )

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        image = v2.functional.to_image(image)
        height, width = image.shape[-2:]
        top, left, crop_height, crop_width = RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        image = v2.functional.resized_crop(
            image, top, left, crop_height, crop_width, list(self.size),
            interpolation=v2.InterpolationMode.BICUBIC, antialias=True,
        )  # fmt: skip
        flip = bool(torch.rand(1) < 0.5)
        if flip:
            image = v2.functional.horizontal_flip(image)
        box = torch.tensor([top, left, crop_height, crop_width])
        return self.normalize(image), crop_record(box[None], height, width, torch.tensor([flip]))[0]


def eval_transform(processor: ViTImageProcessor) -> v2.Compose:
    """Resize (bicubic) and normalise, as the saved image processor does."""
    size = (processor.size["height"], processor.size["width"])
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(processor.image_mean, processor.image_std),
        ]
    )


class ImageCollator:
    """Decode, transform and stack a list of rows; corrupt images are dropped (and counted).

    With `label_column` / `index_column`, each kept row's label / index comes along as `labels` / `index`.
    """

    def __init__(
        self,
        transform: Callable,
        image_column: str,
        label_column: str | None = None,
        index_column: str | None = None,
        num_channels: int = 3,
        key_column: str | None = None,
    ):
        self.transform = transform
        self.image_column = image_column
        self.extra_columns = {"labels": label_column, "index": index_column, "keys": key_column}
        self.num_channels = num_channels

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        pixels, crops = [], []
        extras: dict[str, list] = {key: [] for key, column in self.extra_columns.items() if column}
        for row in rows:
            image = decode_image(row[self.image_column], self.num_channels)
            if image is None:
                continue
            transformed = self.transform(image)
            if isinstance(transformed, tuple):  # a training transform that says where it cropped (TrainTransform)
                transformed, crop = transformed
                crops.append(crop)
            pixels.append(transformed)
            for key in extras:
                extras[key].append(row[self.extra_columns[key]])
        batch = {
            "pixel_values": torch.stack(pixels) if pixels else torch.empty(0),
            "skipped": len(rows) - len(pixels),  # a plain int: counting never touches the device
        }
        if crops:
            batch["crops"] = torch.stack(crops)
        keys = extras.pop("keys", None)
        if keys is not None:
            batch["keys"] = [str(key) for key in keys]  # a stream's sample ids, kept on the host
        return batch | {key: torch.tensor(values, dtype=torch.long) for key, values in extras.items()}


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
    """Drop the first `count` rows (resuming inside an epoch)."""
    if count == 0:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.skip(count)
    return dataset.select(range(min(count, len(dataset)), len(dataset)))


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


def storage_transform(size: int) -> v2.Compose:
    """What decode-once keeps of an image: shorter side resized to `size` (bicubic), the central square, uint8."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
        ]
    )


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
    use it (see run_classification.py's `Evaluation`, which counts every sample once).
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


def limit_samples(dataset, count: int | None):
    """The first `count` rows (all when None), for a split or a stream."""
    if not count:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(count)
    return dataset.select(range(min(count, len(dataset))))


def training_length(
    dataset, data_args: DataArguments, global_batch: int, num_train_epochs: float, max_train_steps: int | None
) -> tuple[int, int]:
    """(optimiser steps per epoch, total steps) for full global batches; a clear error for an unsized stream."""
    num_samples = data_args.num_train_samples
    if num_samples is None and isinstance(dataset, datasets.Dataset):
        num_samples = len(dataset)
    elif num_samples is None:
        splits = dataset.info.splits or {}
        num_samples = splits[data_args.train_split].num_examples if data_args.train_split in splits else None
    if data_args.max_train_samples:  # a stream's `take` leaves its stated size unchanged
        num_samples = min(num_samples or data_args.max_train_samples, data_args.max_train_samples)
    if num_samples is None and max_train_steps is None:
        raise SystemExit("error: the stream does not say its size: pass --num_train_samples or --max_train_steps")
    if num_samples is not None and num_samples < global_batch:
        raise SystemExit(f"error: {num_samples} training images do not fill one global batch of {global_batch}")
    steps_per_epoch = num_samples // global_batch if num_samples is not None else max_train_steps
    return steps_per_epoch, max_train_steps or math.ceil(num_train_epochs * steps_per_epoch)


def class_names(features: datasets.Features | None, label_column: str, data) -> list[str]:
    """Class names from a ClassLabel column (or "0".."C-1" for plain integer labels of a map-style split)."""
    feature = (features or {}).get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    dtype = getattr(feature, "dtype", None)
    if isinstance(data, datasets.Dataset) and dtype is not None and dtype.startswith(("int", "uint")):
        values = data.unique(label_column)
        if min(values) < 0:
            raise SystemExit(f"error: label column {label_column!r} holds negative labels")
        return [str(index) for index in range(max(values) + 1)]
    raise SystemExit(
        f"error: label column {label_column!r} must be a ClassLabel (or integer) column, got {feature}; "
        "cast it with `dataset.class_encode_column`"
    )


def finetune_transform(
    processor: ViTImageProcessor, crop_scale_min: float, rand_augment_ops: int, rand_augment_magnitude: int,
    random_erasing: float,
) -> v2.Compose:  # fmt: skip
    """MAE fine-tuning augmentation: RandomResizedCrop, flip, RandAugment, normalisation, RandomErasing."""
    size = (processor.size["height"], processor.size["width"])
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(
            size, scale=(crop_scale_min, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
        ),
        v2.RandomHorizontalFlip(),
    ]
    if rand_augment_ops:
        steps.append(
            v2.RandAugment(rand_augment_ops, rand_augment_magnitude, interpolation=v2.InterpolationMode.BILINEAR)
        )
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(processor.image_mean, processor.image_std)]
    if random_erasing:
        steps.append(v2.RandomErasing(random_erasing, value=0.0))
    return v2.Compose(steps)


class MixingCollator:
    """ImageCollator followed by MixUp or CutMix (one of them, at random, per batch): labels become soft [B, C]."""

    def __init__(self, collator: ImageCollator, num_classes: int, mixup: float, cutmix: float):
        self.collator = collator
        choices = [v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []
        choices += [v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else []
        self.mix = v2.RandomChoice(choices) if choices else None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(rows)
        if self.mix is not None and len(batch["pixel_values"]):
            batch["pixel_values"], batch["labels"] = self.mix(batch["pixel_values"], batch["labels"])
        return batch


def with_index(dataset: datasets.Dataset) -> datasets.Dataset:
    """Number the rows 0..N-1 in a column of their own (the identity of a sample across processes)."""
    return dataset.add_column(INDEX_COLUMN, list(range(len(dataset))))
