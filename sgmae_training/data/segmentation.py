"""Images with segmentation maps: the data arguments, the classes, the map column, checked maps, the joint
augmentation of image and map, and the collator that does all of it per row.

The recipe is mmsegmentation's ADE20K pipeline (configs/_base_/datasets/ade20k.py), which BEiT and MAE fine-tune
UperNet with: random rescale within (4c, c) x [0.5, 2], a c x c crop in which no class covers 75 % or more, flip,
photometric distortion, padding with the ignore index; evaluation at the short side c, scored at full resolution.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .images import decode_image, open_cell
from .loading import (
    INDEX_COLUMN,
    DataArguments,
    check_data_arguments,
    find_column,
    limit_samples,
    prepare_images,
    training_and_evaluation_splits,
    with_index,
)

MASK_COLUMNS = ("annotation", "segmentation_map", "semantic_map", "mask", "label", "labels", "seg_map")
EVAL_MODES = ("slide", "whole")
# mmsegmentation's PhotoMetricDistortion: brightness delta, contrast and saturation ranges, hue delta (OpenCV's
# 0..180 hue scale, so 18 is a tenth of the circle)
BRIGHTNESS_DELTA, CONTRAST_RANGE, SATURATION_RANGE, HUE_DELTA = 32, (0.5, 1.5), (0.5, 1.5), 18 / 180
CROP_ATTEMPTS = 10  # mmsegmentation's RandomCrop: tries for a crop whose largest class stays under cat_max_ratio


@dataclass
class SegmentationDataArguments(DataArguments):
    """DataArguments plus the mask column, the classes and the ADE20K recipe's crops."""

    train_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder for training: a metadata.jsonl whose rows name an image (`file_name`) and its map "
            "(`annotation_file_name`), as `python -m sgmae_training.data.shapes` writes."
        },
    )
    validation_dir: str | None = field(default=None, metadata={"help": "Folder for evaluation, as --train_dir."})
    validation_split: str = field(default="validation", metadata={"help": "Split to evaluate on."})
    mask_column: str | None = field(
        default=None,
        metadata={"help": f"Segmentation-map column (one band of class ids); found among {MASK_COLUMNS} when unset."},
    )
    num_labels: int | None = field(
        default=None, metadata={"help": "Number of classes (ADE20K: 150); from --label_names_file when unset."}
    )
    label_names_file: str | None = field(
        default=None, metadata={"help": "JSON list of class names, or {id: name} (saved as the model's id2label)."}
    )
    reduce_labels: bool = field(
        default=False,
        metadata={
            "help": "Mask value 0 is 'other' (ignored) and class k is stored as k + 1 (ADE20K, scene_parse_150)."
        },
    )
    ignore_index: int = field(default=255, metadata={"help": "Mask value left out of the loss and the metric."})
    crop_size: int = field(default=512, metadata={"help": "Training crop and sliding window, c x c (MAE/BEiT: 512)."})
    scale_range: list[float] = field(
        default_factory=lambda: [0.5, 2.0], metadata={"help": "Random rescale ratios of the (4c, c) scale."}
    )
    cat_max_ratio: float = field(
        default=0.75, metadata={"help": "Re-draw a crop (up to 10 times) where one class covers this share or more."}
    )
    photometric_distortion: bool = field(
        default=True, metadata={"help": "mmsegmentation's brightness/contrast/saturation/hue jitter (RGB only)."}
    )
    eval_mode: str = field(default="slide", metadata={"help": f"One of {EVAL_MODES} (MAE/BEiT: slide)."})
    eval_stride: int | None = field(
        default=None, metadata={"help": "Sliding-window stride (default: 2c/3 rounded down, 341 for 512)."}
    )


def check_segmentation_arguments(data_args: SegmentationDataArguments) -> None:
    """Clear errors, before anything is loaded, for data arguments out of range."""
    check_data_arguments(data_args)
    if data_args.eval_mode not in EVAL_MODES:
        raise SystemExit(f"error: --eval_mode must be one of {', '.join(EVAL_MODES)}, got {data_args.eval_mode!r}")
    if data_args.crop_size < 1 or (data_args.eval_stride is not None and data_args.eval_stride < 1):
        raise SystemExit("error: --crop_size and --eval_stride must be positive")
    ratios = data_args.scale_range
    if len(ratios) != 2 or not 0 < ratios[0] <= ratios[1]:
        raise SystemExit(f"error: --scale_range takes two ratios 0 < low <= high, got {data_args.scale_range}")
    if not 0 < data_args.cat_max_ratio <= 1:
        raise SystemExit(f"error: --cat_max_ratio must be in (0, 1], got {data_args.cat_max_ratio}")
    if not 0 <= data_args.ignore_index <= 65535:
        raise SystemExit(f"error: --ignore_index must be a mask value in 0..65535, got {data_args.ignore_index}")
    if data_args.eval_stride is None:
        data_args.eval_stride = data_args.crop_size * 2 // 3


def label_names(data_args: SegmentationDataArguments) -> list[str]:
    """Class names from --label_names_file (a JSON list, or {id: name} for ids 0..N-1), else "0".."N-1"; checked
    against --ignore_index."""
    path, count = data_args.label_names_file, data_args.num_labels
    if path is None:
        if count is None:
            raise SystemExit("error: give --num_labels (ADE20K: 150) or --label_names_file")
        if count < 2:
            raise SystemExit(f"error: --num_labels must be at least 2, got {count}")
        names = [str(index) for index in range(count)]
    else:
        names = read_label_names(path, count)
    if data_args.ignore_index < len(names):
        raise SystemExit(
            f"error: --ignore_index {data_args.ignore_index} is one of the {len(names)} class ids; use "
            f"{len(names)} or more (ADE20K: 255)"
        )
    return names


def read_label_names(path: str, count: int | None) -> list[str]:
    """The names in a --label_names_file (a JSON list, or {id: name} for ids 0..N-1), `count` of them if given."""
    try:
        loaded = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"error: cannot read --label_names_file {path!r}: {error}") from error
    if isinstance(loaded, dict):
        if sorted(str(key) for key in loaded) != sorted(str(index) for index in range(len(loaded))):
            raise SystemExit(f"error: --label_names_file {path!r} must map the ids 0..N-1 to names")
        loaded = [loaded.get(str(index), loaded.get(index)) for index in range(len(loaded))]
    if not isinstance(loaded, list) or len(loaded) < 2:
        raise SystemExit(f"error: --label_names_file {path!r} must hold a list of at least 2 class names")
    if count is not None and count != len(loaded):
        raise SystemExit(f"error: --num_labels {count} disagrees with the {len(loaded)} names in {path!r}")
    return [str(name) for name in loaded]


def find_mask_column(features: datasets.Features | None, given: str | None, image_column: str) -> str:
    """The segmentation-map column: the named one, the first image column among MASK_COLUMNS, or the only image
    column besides the input images; a clear error otherwise."""
    features = features or {}
    if given:
        find_column(features, given, (), "mask")
        if features and not isinstance(features[given], datasets.Image):
            raise SystemExit(f"error: mask column {given!r} holds {type(features[given]).__name__} values, not images")
        return given
    images = [name for name, value in features.items() if isinstance(value, datasets.Image) and name != image_column]
    for name in MASK_COLUMNS:
        if name in images:
            return name
    if len(images) == 1:
        return images[0]
    raise SystemExit(
        f"error: no segmentation-map column found among {list(features)} (image columns besides {image_column!r}: "
        f"{images or 'none'}); pass --mask_column"
    )


@dataclass
class SegmentationData:
    """The splits (images and maps undecoded; map-style rows numbered in INDEX_COLUMN) and how to read them."""

    train: datasets.Dataset | datasets.IterableDataset
    eval: datasets.Dataset
    train_split: str
    eval_split: str
    image_column: str
    mask_column: str


def load_segmentation_data(data_args: SegmentationDataArguments) -> SegmentationData:
    """Training and evaluation splits and their image and map columns, checked and limited as asked."""
    train_data, eval_data, eval_split, image_column = training_and_evaluation_splits(data_args)
    mask_column = find_mask_column(train_data.features, data_args.mask_column, image_column)
    for column in (image_column, mask_column):
        find_column(eval_data.features, column, (), f"{eval_split} split's")
    train_data = limit_samples(train_data, data_args.max_train_samples)
    eval_data = limit_samples(eval_data, data_args.max_eval_samples)
    if not len(eval_data):
        raise SystemExit(f"error: the {eval_split!r} split is empty")
    train_data = prepare_images(prepare_images(train_data, image_column), mask_column)
    if isinstance(train_data, datasets.Dataset):  # a stream's rows have no stable number across workers
        train_data = with_index(train_data)
    eval_data = with_index(prepare_images(prepare_images(eval_data, image_column), mask_column))
    return SegmentationData(train_data, eval_data, data_args.train_split, eval_split, image_column, mask_column)


# ----- maps ----------------------------------------------------------------------------------------------------------
class BadMaskError(ValueError):
    """A segmentation map that cannot be used: unreadable, not one band, another size than its image, or a class id
    out of range. Raised in a DataLoader worker, it reaches the main process wrapped in a traceback (`one_line`)."""


def one_line(error: BadMaskError) -> str:
    """The original message of a BadMaskError, also when a DataLoader worker re-raised it inside its traceback."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if f"{BadMaskError.__name__}: " in line:
            return line.split(f"{BadMaskError.__name__}: ", 1)[1]
    return lines[-1] if lines else BadMaskError.__name__


def row_name(row: dict[str, Any], mask_column: str, split: str) -> str:
    """How a message names a row: its map's file name when the dataset kept one (parquet rows have none), and its
    number in the split (`datasets.load_dataset(..., split=split)[number]`) when the split is map-style."""
    value = row[mask_column]
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    place = (
        f"row {row[INDEX_COLUMN]} of the {split!r} split" if INDEX_COLUMN in row else f"a row of the {split!r} split"
    )
    return f"{path!r} ({place})" if path else place


def decode_mask(
    value: Any, size: tuple[int, int], num_labels: int, ignore_index: int, reduce_labels: bool, name: str = "a row"
) -> torch.Tensor:
    """A mask cell as class ids [H, W] (int64): reduced if asked (0 -> ignore, k -> k - 1), checked against its
    image's (width, height) `size` and the classes; a BadMaskError with one line, naming the row, otherwise."""
    try:
        mask = open_cell(value)  # as stored: a palette map keeps its class ids
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, TypeError) as error:
        raise BadMaskError(f"error: cannot read the segmentation map of {name}: {error}") from error
    if len(mask.getbands()) != 1:
        raise BadMaskError(
            f"error: the segmentation map of {name} has {len(mask.getbands())} bands (mode {mask.mode}); a map is one "
            "band of class ids (PNG mode L, P or I)"
        )
    if mask.size != size:
        raise BadMaskError(
            f"error: the segmentation map of {name} is {mask.size[0]}x{mask.size[1]} but its image is "
            f"{size[0]}x{size[1]} (width x height)"
        )
    labels = torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())
    if reduce_labels:  # mmsegmentation's reduce_zero_label
        labels = torch.where(labels == 0, ignore_index, labels - 1)
        labels[labels == ignore_index - 1] = ignore_index
    valid = labels[labels != ignore_index]
    if len(valid) and (valid.min() < 0 or valid.max() >= num_labels):
        bad = int(valid.max() if valid.max() >= num_labels else valid.min())
        hint = "; masks whose 0 means 'other' (ADE20K) need --reduce_labels" if bad == num_labels else ""
        reduced = " after --reduce_labels" if reduce_labels else ""
        raise BadMaskError(
            f"error: the segmentation map of {name} holds class {bad}{reduced}, outside 0..{num_labels - 1} "
            f"(--num_labels {num_labels}; {ignore_index} is ignored){hint}"
        )
    return labels


# ----- augmentation --------------------------------------------------------------------------------------------------
def rescale_size(height: int, width: int, long_side: float, short_side: float) -> tuple[int, int]:
    """mmsegmentation's keep-ratio rescale to fit (long_side, short_side): the largest size within both bounds."""
    scale = min(long_side / max(height, width), short_side / min(height, width))
    return max(int(height * scale + 0.5), 1), max(int(width * scale + 0.5), 1)


def uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def photometric_distortion(pixels: torch.Tensor) -> torch.Tensor:
    """mmsegmentation's PhotoMetricDistortion on a [3, H, W] float image in 0..255: each of brightness (added),
    contrast (multiplied), saturation and hue (torchvision's operations) with probability 1/2, contrast before or after
    the colour changes at random, clipped to 0..255 after each."""

    def maybe() -> bool:
        return bool(torch.rand(()) < 0.5)

    if maybe():
        pixels = (pixels + uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)).clamp(0, 255)
    contrast_first = maybe()
    if contrast_first and maybe():
        pixels = (pixels * uniform(*CONTRAST_RANGE)).clamp(0, 255)
    if maybe():
        pixels = F.adjust_saturation(pixels / 255, uniform(*SATURATION_RANGE)).clamp(0, 1) * 255
    if maybe():
        pixels = F.adjust_hue(pixels / 255, uniform(-HUE_DELTA, HUE_DELTA)).clamp(0, 1) * 255
    if not contrast_first and maybe():
        pixels = (pixels * uniform(*CONTRAST_RANGE)).clamp(0, 255)
    return pixels


def random_crop_box(mask: torch.Tensor, crop: int, cat_max_ratio: float, ignore_index: int) -> tuple[int, int]:
    """Top-left corner of a crop x crop window; re-drawn up to CROP_ATTEMPTS times while one class covers
    `cat_max_ratio` or more of its labelled pixels (mmsegmentation's RandomCrop)."""
    height, width = mask.shape

    def draw() -> tuple[int, int]:
        top = int(torch.randint(max(height - crop, 0) + 1, ()))
        return top, int(torch.randint(max(width - crop, 0) + 1, ()))

    top, left = draw()
    if cat_max_ratio >= 1:
        return top, left
    for _ in range(CROP_ATTEMPTS):
        window = mask[top : top + crop, left : left + crop]
        counts = torch.bincount(window[window != ignore_index].flatten())
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        top, left = draw()
    return top, left


@dataclass
class PairTransform:
    """Image and mask together: training's augmentation (`train=True`) or evaluation's resize; both normalise."""

    crop_size: int
    image_mean: list[float]
    image_std: list[float]
    ignore_index: int
    train: bool
    scale_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    photometric: bool = True

    def __call__(self, image: Image.Image, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image: PIL, mask: [H, W] class ids. Training: ([C, c, c] pixels, [c, c] mask). Evaluation: pixels with
        the short side c (long side at most 4c) and the mask unchanged, scored at its own resolution."""
        pixels = F.pil_to_tensor(image).float()  # [C, H, W], 0..255
        crop = self.crop_size
        ratio = uniform(*self.scale_range) if self.train else 1.0
        size = rescale_size(*pixels.shape[1:], 4 * crop * ratio, crop * ratio)
        pixels = F.resize(pixels, list(size), interpolation=v2.InterpolationMode.BILINEAR, antialias=False)
        if not self.train:
            return self.normalise(pixels), mask
        mask = F.resize(mask[None], list(size), interpolation=v2.InterpolationMode.NEAREST)[0]
        top, left = random_crop_box(mask, crop, self.cat_max_ratio, self.ignore_index)
        pixels, mask = pixels[:, top : top + crop, left : left + crop], mask[top : top + crop, left : left + crop]
        if torch.rand(()) < 0.5:
            pixels, mask = pixels.flip(-1), mask.flip(-1)
        if self.photometric:
            pixels = photometric_distortion(pixels)
        pad = (0, crop - pixels.shape[2], 0, crop - pixels.shape[1])  # right and bottom, to crop x crop
        pixels = nn.functional.pad(self.normalise(pixels), pad)  # 0: the mean after normalisation
        return pixels, nn.functional.pad(mask, pad, value=self.ignore_index)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(pixels / 255, self.image_mean, self.image_std)


class SegmentationCollator:
    """Decode, check and transform rows of (image, mask) of the split `split`: stacked [B, C, c, c] pixels and
    [B, c, c] labels for training, or one row's resized pixels [1, C, h, w] and full-size labels [1, H, W] for
    evaluation (batch 1: images differ in size). Corrupt images are dropped, counted (`skipped`) and said why
    (`problems`, for `warn_skipped` where the batch is used); a bad mask raises BadMaskError naming its row."""

    def __init__(
        self,
        transform: PairTransform,
        image_column: str,
        mask_column: str,
        num_labels: int,
        reduce_labels: bool,
        num_channels: int = 3,
        split: str = "train",
    ):
        self.transform, self.image_column, self.mask_column = transform, image_column, mask_column
        self.num_labels, self.reduce_labels, self.num_channels, self.split = (
            num_labels,
            reduce_labels,
            num_channels,
            split,
        )

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        pixels, labels, problems = [], [], []
        for row in rows:
            image = decode_image(row[self.image_column], self.num_channels, problems)
            if image is None:
                continue
            mask = decode_mask(
                row[self.mask_column],
                image.size,
                self.num_labels,
                self.transform.ignore_index,
                self.reduce_labels,
                row_name(row, self.mask_column, self.split),
            )
            image_pixels, mask = self.transform(image, mask)
            pixels.append(image_pixels)
            labels.append(mask)
        return {
            "pixel_values": torch.stack(pixels) if pixels else torch.empty(0),
            "labels": torch.stack(labels) if labels else torch.empty(0, dtype=torch.long),
            "skipped": len(rows) - len(pixels),  # a plain int: counting never touches the device
            "problems": problems,
        }
