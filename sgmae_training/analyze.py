"""Analyse an SG-MAE checkpoint on the first images of a dataset split (the paper's §5 metrics, Figure-1 panel).

    python -m sgmae_training.analyze --model PATH --dataset_name PATH_OR_ID --split test --output_dir DIR

writes `DIR/analysis.json` (the metrics of `modeling_sgmae.analysis.analysis_metrics`) and `DIR/figure_panel.png`
(`modeling_sgmae.analysis.figure_panel`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import HfArgumentParser, ViTImageProcessor

from modeling_sgmae import SGMAEConfig, SGMAEForPreTraining
from modeling_sgmae.analysis import (
    HINT_GREEN,
    MASKED_GREY,
    OBJECT_OUTLINE,
    FigurePanel,
    analysis_metrics,
    figure_panel,
)

from .arguments import dataset_reachable, parse_script_args
from .data.images import image_processor_for, saved_statistics, to_channels
from .data.loading import IMAGE_COLUMNS, DataArguments, evaluation_split, find_image_column, load_split

logger = logging.getLogger(__name__)
PANEL_LEGEND = (  # what the panel's colours mean (modeling_sgmae.analysis tints the columns with them)
    (OBJECT_OUTLINE, "outline of the NCut part taken as the object (the rest dimmed)"),
    (MASKED_GREY, "masked patches"),
    (HINT_GREEN, "hints: informed-mask patches shown to the encoder"),
)


@dataclass
class AnalysisArguments:
    """Arguments of `python -m sgmae_training.analyze`."""

    model: str = field(metadata={"help": "SG-MAE (or ViTMAE) checkpoint: a local directory or a Hub id."})
    dataset_name: str = field(metadata={"help": "Dataset for `datasets.load_dataset`: a local directory or a Hub id."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the dataset."})
    split: str = field(default="test", metadata={"help": "Split the probe batch is taken from."})
    image_column: str | None = field(
        default=None, metadata={"help": f"Image column (default: the first of {', '.join(IMAGE_COLUMNS)})."}
    )
    num_images: int = field(default=256, metadata={"help": "Size of the probe batch (the first images of the split)."})
    output_dir: str = field(default="sgmae_analysis", metadata={"help": "Where analysis.json and the PNG go."})
    figure_images: int = field(default=6, metadata={"help": "Images (rows) in the Figure-1 panel; 0 for none."})
    batch_size: int = field(default=64, metadata={"help": "Images per forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed of the probe's random masks and hints."})
    device: str = field(default="auto", metadata={"help": "Torch device; `auto` picks CUDA when available."})


def load_image_processor(model_path: str, config: SGMAEConfig) -> ViTImageProcessor:
    """Resize to the model's image size and normalise with the checkpoint's preprocessor_config.json statistics
    (MAE's for an RGB checkpoint without one): the processor pre-training saved."""
    return image_processor_for(config, saved_statistics(model_path))


def probe_batch(dataset, image_column: str | None, num_images: int, processor, config: SGMAEConfig):
    """The first `num_images` images of a `datasets.Dataset` as normalised pixels [B, C, H, W], and the column used."""
    column = find_image_column(dataset.features, image_column)
    images = dataset.select(range(min(num_images, len(dataset))))[column]
    converted = [to_channels(image, config.num_channels) for image in images]
    if any(image is None for image in converted):
        raise SystemExit(f"error: the probe images do not have the model's {config.num_channels} channels")
    return processor(converted, return_tensors="pt")["pixel_values"], column


def save_figure_panel(panel: FigurePanel, path: str | Path, title: str) -> None:
    """The panel as a PNG under a header: `title` (which model, at which step) and a legend of its colours."""
    panel.save(path)
    image = Image.open(path).convert("RGB")
    font = ImageFont.load_default(size=13)
    header = Image.new("RGB", (image.width, 44), "white")
    draw = ImageDraw.Draw(header)
    draw.text((8, 4), title, fill="black", font=font)
    left = 8
    for colour, meaning in PANEL_LEGEND:
        draw.rectangle((left, 26, left + 11, 37), fill=tuple(round(255 * value) for value in colour))
        draw.text((left + 16, 24), meaning, fill="black", font=font)
        left += 16 + round(draw.textlength(meaning, font=font)) + 18
    annotated = Image.new("RGB", (image.width, image.height + header.height), "white")
    annotated.paste(header, (0, 0))
    annotated.paste(image, (0, header.height))
    annotated.save(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Analyse a checkpoint on the first images of a dataset split; write analysis.json and figure_panel.png."""
    (args,) = parse_script_args(HfArgumentParser(AnalysisArguments), argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")

    # data: the fixed probe batch
    model = SGMAEForPreTraining.from_pretrained(args.model).to(device)
    processor = load_image_processor(args.model, model.config)
    data_args = DataArguments(dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name)
    with dataset_reachable(args.dataset_name):
        split = evaluation_split(data_args, args.split) or data_args.train_split
        dataset = load_split(data_args, split, streaming=False)
    pixel_values, column = probe_batch(dataset, args.image_column, args.num_images, processor, model.config)

    # metrics and figure
    metrics = analysis_metrics(model, pixel_values, args.batch_size, args.seed)
    metrics = {
        "model": args.model,
        "dataset": args.dataset_name,
        "split": split,
        "image_column": column,
        **metrics,
    }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "analysis.json").write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("wrote %s", output_dir / "analysis.json")
    if args.figure_images > 0:
        panel = figure_panel(
            model,
            pixel_values[: args.figure_images],
            tuple(processor.image_mean),
            tuple(processor.image_std),
            args.seed,
        )
        save_figure_panel(panel, output_dir / "figure_panel.png", f"{Path(args.model).name}: {split} images")
        logger.info("wrote %s", output_dir / "figure_panel.png")
    return metrics


if __name__ == "__main__":
    main()
