"""WebDataset shards for the scripts: write an image folder or a `datasets` split (e.g. parquet) as `.tar` shards, and
check shards for damage.

    python -m sgmae_training.shards --dataset_name data/cifar10 --output_dir shards/cifar10 --num_shards 64
    python -m sgmae_training.shards --train_dir images/train --validation_dir images/val --output_dir shards/mine
    python -m sgmae_training.shards --check shards/cifar10

Each sample is a `{key}.{ext}` image member (its original bytes) and, when the source has labels, a `{key}.cls`
member (the class index as text), in `{split}-00000-of-00064.tar` files: the layout `datasets` reads natively, as
`load_dataset(folder)` or `load_dataset(folder, streaming=True)`. The folder's README.md declares the columns (class
names as a ClassLabel) and each split's size, so a stream knows its length. Rows are shuffled (--seed) before they are
cut into shards of equal size (within one sample): a process reading whole shards sees every class, and processes
reading equal numbers of shards run out together.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import os
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import yaml
from PIL import Image, UnidentifiedImageError
from transformers import HfArgumentParser

from .arguments import dataset_reachable, parse_script_args
from .data.loading import LABEL_COLUMNS, DataArguments, find_column, find_image_column, load_split, prepare_images

logger = logging.getLogger(__name__)
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "TIFF": "tif", "WEBP": "webp", "BMP": "bmp", "GIF": "gif"}
DEFAULT_SHARD_SIZE = 1000  # samples per shard when --num_shards is not given


@dataclass
class ShardArguments:
    """What to convert and where to, or which shards to check."""

    dataset_name: str | None = field(default=None, metadata={"help": "`datasets` folder (e.g. parquet) or Hub id."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder (class subfolders): split train."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder: split validation."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: auto-detected)."})
    label_column: str | None = field(
        default=None, metadata={"help": f"Label column (default: the first of {LABEL_COLUMNS}; none: no .cls)."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "An empty or new folder for the shards."})
    num_shards: int | None = field(
        default=None,
        metadata={
            "help": f"Shards per split (default: about {DEFAULT_SHARD_SIZE} samples each); for streaming, a multiple "
            "of processes x --dataloader_num_workers."
        },
    )
    image_format: str | None = field(
        default=None,
        metadata={"help": "Re-encode images of other formats to this one (png, jpg...; default: the first image's)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the shuffle before sharding."})
    check: str | None = field(default=None, metadata={"help": "Read every member of every shard in this folder."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for datasets."})


def split_names(args: ShardArguments) -> list[str]:
    if args.dataset_name:
        return datasets.get_dataset_split_names(args.dataset_name, args.dataset_config_name)
    return [name for name, folder in (("train", args.train_dir), ("validation", args.validation_dir)) if folder]


def shard_bounds(num_rows: int, num_shards: int) -> list[tuple[int, int]]:
    """[start, end) of `num_shards` contiguous blocks whose sizes differ by at most one."""
    edges = [round(index * num_rows / num_shards) for index in range(num_shards + 1)]
    return list(itertools.pairwise(edges))


def image_member(value: dict, wanted: str | None) -> tuple[str, bytes] | None:
    """(extension, bytes) of an undecoded image cell, re-encoded only when its format is not `wanted`; None when
    the bytes are not an image (left out: shards carry no file that training would skip anyway)."""
    data = value["bytes"] if value.get("bytes") is not None else Path(value["path"]).read_bytes()
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as error:
        logger.warning("leaving out an unreadable image (%s): %s", value.get("path") or "no file name", error)
        return None
    extension = EXTENSIONS.get(image.format, (image.format or "img").lower())
    if wanted is None or extension == wanted:
        return extension, data
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=Image.registered_extensions()[f".{wanted}"])
    except (OSError, KeyError, ValueError) as error:
        raise SystemExit(f"error: cannot re-encode {value.get('path') or 'an image'} as {wanted}: {error}") from error
    return wanted, buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # no time stamp: the same input gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def shard_samples(rows, image_column: str, label_column: str | None, wanted: str | None) -> Iterator[tuple]:
    """(key, extension, image bytes, label) for each readable row; the key is the row's number in the source split."""
    for row in rows:
        member = image_member(row[image_column], wanted)
        if member is not None:
            yield f"{row['__row__']:09d}", *member, None if label_column is None else row[label_column]


def write_split(
    data: datasets.Dataset, split: str, args: ShardArguments, columns: tuple[str, str | None], wanted: str | None
) -> tuple[str | None, int, int]:
    """Shuffle the split, cut it into shards and write them (each atomically), images in the `wanted` format (None:
    the first image's); returns the image extension, the number of samples written and their bytes."""
    image_column, label_column = columns
    data = data.add_column("__row__", list(range(len(data))))
    order = np.random.default_rng(args.seed).permutation(len(data))
    num_shards = min(args.num_shards or math.ceil(len(data) / DEFAULT_SHARD_SIZE), len(data))
    written, size = 0, 0
    for index, (start, end) in enumerate(shard_bounds(len(data), num_shards)):
        name = f"{split}-{index:05d}-of-{num_shards:05d}.tar"
        partial = Path(args.output_dir) / f".{name}.partial"  # hidden: `datasets` never reads a half-written shard
        with tarfile.open(partial, "w") as tar:
            for key, extension, image, label in shard_samples(
                data.select(order[start:end]), image_column, label_column, wanted
            ):
                wanted = wanted or extension  # one image column: the first image's format unless told otherwise
                add_member(tar, f"{key}.{extension}", image)
                if label is not None:
                    add_member(tar, f"{key}.cls", str(label).encode())
                written += 1
        os.replace(partial, Path(args.output_dir) / name)
        size += (Path(args.output_dir) / name).stat().st_size
    logger.info("%s: %d samples in %d shards (%s)", split, written, num_shards, wanted)
    return wanted, written, size


def dataset_card(features: datasets.Features, splits: dict[str, tuple[int, int]]) -> str:
    """README.md whose metadata declares the columns and each split's size (read by `load_dataset`)."""
    info = datasets.DatasetInfo(features=features)
    info.splits = datasets.SplitDict()
    for name, (count, size) in splits.items():
        info.splits.add(datasets.SplitInfo(name=name, num_examples=count, num_bytes=size))
    metadata = yaml.safe_dump({"dataset_info": info._to_yaml_dict()}, sort_keys=False)
    body = "WebDataset shards written by `python -m sgmae_training.shards`; check them with `--check`.\n"
    return f"---\n{metadata}---\n\n{body}"


def write_shards(args: ShardArguments) -> dict[str, int]:
    """Every split of the source as shards in args.output_dir; returns the samples written per split."""
    output = Path(args.output_dir)
    if output.exists() and any(output.glob("*.tar")):
        raise SystemExit(f"error: {output} already holds .tar shards; choose an empty or new folder")
    output.mkdir(parents=True, exist_ok=True)
    source = DataArguments(
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name, train_dir=args.train_dir,
        validation_dir=args.validation_dir, validation_split="validation", cache_dir=args.cache_dir,
    )  # fmt: skip
    features, splits, extension = None, {}, args.image_format
    for split in split_names(args):
        data = load_split(source, split, streaming=False)
        image_column = find_image_column(data.features, args.image_column)
        label_column = args.label_column or next((name for name in LABEL_COLUMNS if name in data.features), None)
        if label_column == "none":  # unlabelled shards, for pre-training only
            label_column = None
        elif label_column is not None:
            find_column(data.features, label_column, (), "label")
        # every split in the first split's image format: the image column is named after it
        extension, count, size = write_split(
            prepare_images(data, image_column), split, args, (image_column, label_column), extension
        )
        splits[split] = (count, size)
        columns = {extension or "jpg": datasets.Image()}
        if label_column is not None:
            label = data.features[label_column]
            columns["cls"] = label if isinstance(label, datasets.ClassLabel) else datasets.Value("int64")
        features = datasets.Features(
            {**columns, "__key__": datasets.Value("string"), "__url__": datasets.Value("string")}
        )
    (output / "README.md").write_text(dataset_card(features, splits))
    return {name: count for name, (count, _) in splits.items()}


def check_shards(folder: str) -> dict[str, str]:
    """Read every member of every `.tar` in `folder`; returns "N samples" or what is wrong, per shard file.

    A shard cut inside a member fails to read; one cut between members reads as a shorter archive, so its missing
    end-of-archive marker (two zero blocks) is checked too. Each split's total is compared with README.md's."""
    report: dict[str, str] = {}
    totals: dict[str, int | None] = {}
    for path in sorted(Path(folder).glob("*.tar")):
        keys, end, split = set(), 0, path.name.split("-", 1)[0]
        try:
            with tarfile.open(path, "r|*") as tar:  # a stream, as `datasets` reads it
                for member in tar:
                    if member.isreg():
                        tar.extractfile(member).read()
                        keys.add(member.name.split(".", 1)[0])
                    end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            with path.open("rb") as file:
                file.seek(end)
                if file.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
                    raise tarfile.ReadError(f"no end-of-archive marker after {len(keys)} samples (cut short)")
            report[path.name] = f"{len(keys)} samples"
            if totals.get(split, 0) is not None:  # None: another shard of the split is damaged
                totals[split] = totals.get(split, 0) + len(keys)
        except (tarfile.TarError, OSError) as error:
            report[path.name] = f"damaged: {error}"
            totals[split] = None  # the shard's line says what is wrong with the split
    if not report:
        raise SystemExit(f"error: no .tar shards in {folder}")
    for split, stated in stated_sizes(Path(folder)).items():
        if totals.get(split) not in (None, stated):
            report[f"{split} split"] = (
                f"damaged: {totals[split]} samples, README.md states {stated} (a shard missing?)"
            )
    return report


def stated_sizes(folder: Path) -> dict[str, int]:
    """Samples per split as README.md's metadata states them (none without a README.md)."""
    card = folder / "README.md"
    if not card.is_file() or not card.read_text().startswith("---\n"):
        return {}
    metadata = yaml.safe_load(card.read_text().split("---\n")[1]) or {}
    splits = (metadata.get("dataset_info") or {}).get("splits") or []
    return {split["name"]: split["num_examples"] for split in splits if "num_examples" in split}


def main(argv: list[str] | None = None) -> dict[str, int] | dict[str, str]:
    (args,) = parse_script_args(HfArgumentParser(ShardArguments), argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.check:
        report = check_shards(args.check)
        for name, result in report.items():
            print(f"{name}: {result}")
        damaged = [name for name, result in report.items() if result.startswith("damaged")]
        if damaged:
            raise SystemExit(f"error: {len(damaged)} damaged shard(s): {', '.join(damaged)}")
        return report
    if not args.output_dir or not (args.dataset_name or args.train_dir):
        raise SystemExit("error: give --output_dir and --dataset_name or --train_dir (or --check FOLDER)")
    if args.num_shards is not None and args.num_shards < 1:
        raise SystemExit(f"error: --num_shards must be a positive integer, got {args.num_shards}")
    with dataset_reachable(args.dataset_name):
        return write_shards(args)


if __name__ == "__main__":
    main(sys.argv[1:])
