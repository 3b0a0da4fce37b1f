"""How an image becomes a tensor: decoding to the model's channels, normalisation statistics, the saved image
processor, the training / evaluation / fine-tuning transforms and the collators that batch them."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader
from torchvision.transforms import RandomResizedCrop, v2
from transformers import ViTImageProcessor
from transformers.utils import cached_file

from modeling_sgmae.analysis import MAE_IMAGE_MEAN, MAE_IMAGE_STD

from ..augment import crop_record
from .loading import DataArguments, limit_samples

logger = logging.getLogger(__name__)

# PIL modes a 1- or 3-channel model's images are converted to; other channel counts keep an image's own bands
CHANNEL_MODES = {1: "L", 3: "RGB"}


def open_cell(value: Any) -> Image.Image:
    """The image of a cell (undecoded dict with bytes or a path, PIL image, or path), loaded as stored (no mode
    conversion); PIL's own errors when the file is unreadable."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes") is not None:
        image = Image.open(io.BytesIO(value["bytes"]))
    else:
        image = Image.open(value["path"] if isinstance(value, dict) else value)
    image.load()
    return image


def decode_image(value: Any, num_channels: int = 3, problems: list[str] | None = None) -> Image.Image | None:
    """Decode an image cell (undecoded dict, PIL image or path) to `num_channels` channels (see `to_channels`);
    None when the file is corrupt or its bands cannot become that many channels. Why it was skipped is logged as a
    warning, or appended to `problems` for whoever counts the skipped images to say (see ImageCollator)."""
    name = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    try:
        image = open_cell(value)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        problem = f"skipping a corrupt image ({name or 'no file name'}): {error}"
    else:
        converted = to_channels(image, num_channels)
        if converted is not None:
            return converted
        problem = (
            f"skipping an image with {len(image.getbands())} bands ({name or 'no file name'}, mode {image.mode}): "
            f"the model takes {num_channels} channels"
        )
    if problems is None:
        logger.warning(problem)
    else:
        problems.append(problem)
    return None


def warn_skipped(batch: dict) -> None:
    """Say why each image of a collated batch was skipped, where the batch is used and its `skipped` counted (not in
    a DataLoader worker, which may decode batches ahead that are never used): one warning per counted image."""
    for problem in batch.get("problems", ()):
        logger.warning(problem)


def to_channels(image: Image.Image, num_channels: int) -> Image.Image | None:
    """The image as grayscale (L) for 1 channel or RGB for 3, whatever its mode (alpha dropped, palettes expanded);
    for other counts its own bands when it has that many (a 4-band PNG/TIFF: RGBA or CMYK), else None.

    8-bit bands only: 16-bit or float images (modes I;16, I, F) are not rescaled here."""
    mode = CHANNEL_MODES.get(num_channels)
    if mode is not None:
        return image if image.mode == mode else image.convert(mode)
    return image if len(image.getbands()) == num_channels else None


def check_num_channels(requested: int | None, config, source: str) -> None:
    """A clear error when --num_channels disagrees with the channels of the checkpoint's patch projection."""
    if requested is not None and requested != config.num_channels:
        raise SystemExit(
            f"error: --num_channels {requested} disagrees with {source!r}, which takes {config.num_channels}-channel "
            "images; drop --num_channels (the checkpoint decides) or start a new model with --config_name"
        )


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


def storage_transform(size: int) -> v2.Compose:
    """What decode-once keeps of an image: shorter side resized to `size` (bicubic), the central square, uint8."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
        ]
    )


class ImageCollator:
    """Decode, transform and stack a list of rows; corrupt images are dropped, counted (`skipped`) and their reasons
    kept (`problems`, for `warn_skipped` where the batch is used).

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
        pixels, crops, problems = [], [], []
        extras: dict[str, list] = {key: [] for key, column in self.extra_columns.items() if column}
        for row in rows:
            image = decode_image(row[self.image_column], self.num_channels, problems)
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
            "problems": problems,
        }
        if crops:
            batch["crops"] = torch.stack(crops)
        keys = extras.pop("keys", None)
        if keys is not None:
            batch["keys"] = [str(key) for key in keys]  # a stream's sample ids, kept on the host
        return batch | {key: torch.tensor(values, dtype=torch.long) for key, values in extras.items()}


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
