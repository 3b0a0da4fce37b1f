"""Where the images come from: data arguments, splits from the Hub or a folder, their columns, sizes and classes."""

from __future__ import annotations

import logging
import math
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from modeling_sgmae.hub_access import is_hub_id

from ..arguments import check_positive

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label", "cls")  # "cls": a WebDataset shard's `{key}.cls` member
POSITIVE_ARGUMENTS = (
    "max_train_samples", "max_eval_samples", "num_train_samples", "shuffle_buffer_size", "num_channels",
    "image_statistics_samples",
)  # fmt: skip
INDEX_COLUMN = "__sample_index__"  # a row's number, its identity across processes during evaluation

# scikit-image's photographs: the pre-training demo's data, and app.py's examples
DEMO_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


@dataclass
class DataArguments:
    """Where the images come from (shared by the scripts)."""

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
            if not is_hub_id(args.dataset_name) and not Path(args.dataset_name).expanduser().exists():
                raise FileNotFoundError(f"no such folder: {Path(args.dataset_name).expanduser().resolve()}")
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


def training_and_evaluation_splits(
    args: DataArguments,
) -> tuple[datasets.Dataset | datasets.IterableDataset, datasets.Dataset, str, str]:
    """The training split (streamed with --streaming), the evaluation split (see `evaluation_split`; an error when
    there is none), the evaluation split's name and the training split's image column."""
    train_data = load_split(args, args.train_split, args.streaming)
    eval_split = evaluation_split(args, args.validation_split)
    if eval_split is None:
        raise SystemExit("error: the dataset has no split to evaluate on; name one with --validation_split")
    eval_data = load_split(args, eval_split, False)
    return train_data, eval_data, eval_split, find_image_column(train_data.features, args.image_column)


def prepare_images(dataset, image_column: str):
    """Keep images undecoded so a corrupt file can be skipped at collate time instead of killing the run."""
    return dataset.cast_column(image_column, datasets.Image(decode=False))


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


def with_index(dataset: datasets.Dataset) -> datasets.Dataset:
    """Number the rows 0..N-1 in a column of their own (the identity of a sample across processes)."""
    return dataset.add_column(INDEX_COLUMN, list(range(len(dataset))))
