#!/usr/bin/env python
"""Pre-train SG-MAE (or plain MAE with --mask_strategy random) with Accelerate over a `datasets` split or stream.

    accelerate launch -q --config_file configuration/accelerate/default.yaml run_pretraining.py \
        --dataset_name uoft-cs/cifar10 \
        --config_name configuration/models/sgmae-vit-tiny-patch4-cifar.json --output_dir outputs/sgmae-cifar

With no dataset argument it runs a short demo on photographs shipped with scikit-image (`pip install .[demo]`).
Arguments can also come from one JSON/YAML file: `python run_pretraining.py args.yaml`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from huggingface_hub.errors import StrictDataclassError
from PIL import Image
from safetensors import SafetensorError
from transformers import HfArgumentParser, PreTrainedConfig

from modeling_sgmae import MaskRankingCache, MaskType, SGMAEConfig, SGMAEForPreTraining
from modeling_sgmae.analysis import figure_panel
from modeling_sgmae.mask_cache import default_refresh_epochs
from sgmae_training.analyze import save_figure_panel
from sgmae_training.arguments import (
    LOOP_POSITIVE_ARGUMENTS,
    RunArguments,
    check_positive,
    dataset_reachable,
    parse_config_overrides,
    parse_script_args,
)
from sgmae_training.augment import BatchAugmentation
from sgmae_training.data.images import (
    ImageCollator,
    TrainTransform,
    check_num_channels,
    eval_transform,
    image_processor_for,
    image_statistics,
)
from sgmae_training.data.loaders import (
    decode_all,
    decoded_epoch_batches,
    decoded_whole_images,
    whole_image_batches,
    worker_epoch_batches,
)
from sgmae_training.data.loading import (
    DEMO_PHOTOS,
    INDEX_COLUMN,
    DataArguments,
    check_data_arguments,
    evaluation_split,
    find_image_column,
    limit_samples,
    load_split,
    prepare_images,
    training_length,
    with_index,
)
from sgmae_training.engine import (
    LoopSettings,
    TrainingHooks,
    resume_state,
    start_run,
    train,
)
from sgmae_training.hub import (
    check_checkpoint_kind,
    masking_schedule,
    pretraining_card,
    push_to_hub,
    save_hub_folder,
    write_json_atomically,
)
from sgmae_training.optim import cosine_scheduler, parameter_groups
from sgmae_training.training_state import TrainingState

logger = logging.getLogger("run_pretraining")
DEMO_CONFIG = Path(__file__).parent / "configuration" / "models" / "sgmae-vit-tiny-patch4-cifar.json"
POSITIVE_ARGUMENTS = (*LOOP_POSITIVE_ARGUMENTS, "visualization_steps", "exploitation_check_steps", "storage_size")
INPUT_PATHS = ("workers", "decode_once")
DEMO_REPEATS = 256  # the demo's photos, each this many times per epoch: many random crops of few images
# A column of rows that repeat an image: the first row showing the same image, whose cached ranking they share.
SOURCE_COLUMN = "__source_row__"


@dataclass
class ModelArguments:
    """Which model to pre-train and how it masks."""

    config_name: str | None = field(
        default=None, metadata={"help": "SGMAEConfig JSON (e.g. configuration/models/*.json) for a new model."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue from an SG-MAE or transformers ViTMAE checkpoint."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Config fields, comma-separated, e.g. 'hint_ratio=0.1,image_size=[64,64],norm_pix_loss=True'."
        },
    )
    mask_strategy: str | None = field(default=None, metadata={"help": "random (MAE) or self_guided (SG-MAE)."})
    informed_masking_start: float | None = field(
        default=None, metadata={"help": "Fraction of the schedule after which masks are informed (default 0.25)."}
    )
    informed_masking_start_epoch: float | None = field(
        default=None, metadata={"help": "Epoch at which masks become informed (overrides the fraction)."}
    )
    informed_masking_start_step: int | None = field(
        default=None, metadata={"help": "Optimiser step at which masks become informed (overrides the fraction)."}
    )
    informed_masking_auto_start: bool = field(
        default=False, metadata={"help": "Start when the decoder's mask-token attention overtakes visible tokens."}
    )
    informed_mask_source: str | None = field(
        default=None,
        metadata={
            "help": "cached (default): whole-image rankings refreshed every --mask_refresh_epochs and cropped with "
            "each view (the authors' design); step: ranked from each augmented view at every step."
        },
    )


@dataclass
class PretrainingArguments(RunArguments):
    """Optimisation, schedule, logging and output."""

    output_dir: str = field(default="outputs/sgmae-demo", metadata={"help": "Where checkpoints and the model go."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, data order, augmentation and masks."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Images per device per step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    num_train_epochs: float = field(default=3, metadata={"help": "Epochs (ignored if --max_train_steps is set)."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Total optimiser steps."})
    base_learning_rate: float = field(default=1.5e-4, metadata={"help": "lr = base_lr x global batch / 256."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on norms/biases/tokens)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (beta1 is 0.9)."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Share of the schedule in linear warm-up (MAE: 0.1)."})
    stop_after_minutes: float | None = field(
        default=None,
        metadata={
            "help": "Stop at the last checkpoint that this many minutes allow (a sitting of a long run); the same "
            "command with --resume_from_checkpoint latest continues it."
        },
    )
    logging_steps: int = field(default=10, metadata={"help": "Log loss, lr and masking statistics every N steps."})
    visualization_steps: int | None = field(
        default=None, metadata={"help": "Write a mask/reconstruction PNG every N steps (always at the end)."}
    )
    torch_compile: bool = field(
        default=False, metadata={"help": "torch.compile the transformer blocks (slow to start, faster steps on GPUs)."}
    )
    input_path: str = field(
        default="workers",
        metadata={
            "help": "workers: decode and augment each image in DataLoader workers; decode_once: decode the split once "
            "into memory (uint8, --storage_size) and augment whole batches on the training device."
        },
    )
    storage_size: int | None = field(
        default=None, metadata={"help": "decode_once: side of the stored square (default 1.15 x the image size)."}
    )
    decode_once_max_gib: float = field(default=32.0, metadata={"help": "decode_once: memory budget in GiB."})
    exploitation_check_steps: int | None = field(
        default=None, metadata={"help": "Measure decoder exploitation rates every N steps (default: 4 per epoch)."}
    )
    mask_refresh_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Cached informed masks: epochs between refreshes of the whole-image rankings, from the "
            "informed-masking start (default: a tenth of the schedule, as AMT's 40 of 400, at least 1)."
        },
    )
    mask_cache_key_column: str = field(
        default="__key__",
        metadata={"help": "Cached informed masks on a stream: the column that names each sample (WebDataset's)."},
    )


def parse_args() -> tuple[ModelArguments, DataArguments, PretrainingArguments]:
    """The three argument groups, checked before anything is loaded."""
    model_args, data_args, args = parse_script_args(
        HfArgumentParser((ModelArguments, DataArguments, PretrainingArguments))
    )
    args.check()
    check_positive(args, POSITIVE_ARGUMENTS)
    check_data_arguments(data_args)
    if not args.num_train_epochs > 0:
        raise SystemExit(f"error: --num_train_epochs must be positive, got {args.num_train_epochs}")
    stop = args.stop_after_minutes
    if stop is not None and (not stop > 0 or args.checkpointing_steps in (None, "none")):
        raise SystemExit("error: --stop_after_minutes needs a positive value and checkpoints to stop at")
    if args.input_path not in INPUT_PATHS:
        raise SystemExit(f"error: --input_path must be one of {INPUT_PATHS}, got {args.input_path!r}")
    if args.mask_refresh_epochs is not None and not args.mask_refresh_epochs > 0:
        raise SystemExit(f"error: --mask_refresh_epochs must be positive, got {args.mask_refresh_epochs}")
    parse_config_overrides(model_args.config_overrides)  # a malformed item is an error now, not after loading data
    return model_args, data_args, args


def demo_dataset() -> datasets.Dataset:
    """Photographs shipped with scikit-image, repeated so that a short run sees many random crops of them."""
    try:
        from skimage import data as samples
    except ImportError as error:
        raise SystemExit(
            "error: the demo needs scikit-image (`pip install .[demo]`) or pass --dataset_name"
        ) from error

    images = [Image.fromarray(getattr(samples, name)()).convert("RGB") for name in DEMO_PHOTOS]
    images = [image.resize((128, 128 * image.height // image.width)) for image in images]
    # Each row names the first row of its photo, so cached masks rank each photo once, not each of its repeats.
    sources = list(range(len(images))) * DEMO_REPEATS
    return datasets.Dataset.from_dict({"image": images * DEMO_REPEATS, SOURCE_COLUMN: sources})


def build_model(model_args: ModelArguments, num_channels: int | None = None) -> SGMAEForPreTraining:
    """A new model from --config_name (the demo preset by default) or one loaded from --model_name_or_path, with the
    config overrides and masking arguments applied; a clear error for a field that does not exist or a bad value.
    `num_channels` (--num_channels) sets a new model's; a checkpoint's must agree with it."""
    overrides = parse_config_overrides(model_args.config_overrides)
    for name in ("mask_strategy", "informed_masking_start", "informed_masking_start_step", "informed_mask_source"):
        if getattr(model_args, name) is not None:
            overrides[name] = getattr(model_args, name)
    if model_args.informed_masking_auto_start:
        overrides["informed_masking_auto_start"] = True
    own_fields = {f.name for f in fields(SGMAEConfig)} - {f.name for f in fields(PreTrainedConfig)}
    own_fields |= set(SGMAEConfig.attribute_map)  # earlier names of renamed fields
    unknown = sorted(set(overrides) - own_fields)
    if unknown:
        raise SystemExit(f"error: --config_overrides names fields SGMAEConfig does not have: {unknown}")
    path = model_args.model_name_or_path
    try:
        if path:
            check_checkpoint_kind(path)
            model = SGMAEForPreTraining.from_pretrained(path, **overrides)
            check_num_channels(num_channels, model.config, path)
            return model
        config = SGMAEConfig.from_json_file(model_args.config_name or DEMO_CONFIG)
        config.update(overrides | ({"num_channels": num_channels} if num_channels else {}))
        config.validate()  # the rules between fields, before any data is read
    except (OSError, ValueError, SafetensorError, StrictDataclassError) as error:
        source = path or model_args.config_name or DEMO_CONFIG
        reason = " ".join(str(error).split())  # one line (strict config errors span two)
        raise SystemExit(f"error: cannot build the model from {str(source)!r}: {reason}") from error
    return SGMAEForPreTraining(config)


def load_data(data_args: DataArguments) -> tuple[datasets.Dataset | datasets.IterableDataset, list | None, str]:
    """The training split (undecoded images), the probe rows (first 8 of the evaluation split, else of the training
    split; None for a stream without one) and the image column."""
    if not (data_args.dataset_name or data_args.train_dir):
        train_data = demo_dataset()
        eval_data = train_data.select(range(len(DEMO_PHOTOS)))  # the probe: each photo once
        data_args.streaming = False
    else:
        train_data = load_split(data_args, data_args.train_split, data_args.streaming)
        eval_split = evaluation_split(data_args, data_args.validation_split)
        eval_data = load_split(data_args, eval_split, False) if eval_split else None
        if eval_data is None:
            logger.info("the probe images (mask panels, exploitation rates) come from the training split")
    image_column = find_image_column(train_data.features, data_args.image_column)
    train_data = prepare_images(limit_samples(train_data, data_args.max_train_samples), image_column)
    probe_source = eval_data if eval_data is not None else (None if data_args.streaming else train_data)
    probe_rows = [probe_source[index] for index in range(min(8, len(probe_source)))] if probe_source else None
    return train_data, probe_rows, image_column


class PretrainingHooks(TrainingHooks):
    """Pre-training's part of the loop: the schedule position, cached-mask refreshes, mask statistics, exploitation
    checks, mask panels."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: SGMAEForPreTraining,
        total_steps: int,
        args,
        probe,
        processor,
        mask_cache: MaskRankingCache | None = None,
        whole_images: Callable[[], Iterator[dict]] | None = None,
    ):
        self.accelerator, self.model, self.total_steps, self.args = accelerator, model, total_steps, args
        self.probe, self.processor = probe, processor
        self.mask_cache, self.whole_images = mask_cache, whole_images
        self.exploitation_every = args.exploitation_check_steps
        # informed, fallback, object-part patches, edge density: summed over the logging window
        self.mask_sums: torch.Tensor | None = None
        self.mask_images = 0

    def before_micro_batch(self, step: int) -> None:
        self.model.set_training_progress(step, self.total_steps)  # the model decides its masks from this
        cache = self.mask_cache
        if cache is not None and cache.due(step, self.model.informed_masking_active):
            total = len(cache.rankings) or None
            logs = cache.refresh(self.model, self.whole_images(), step, total)
            self.accelerator.log(logs, step=step)

    def loss(self, model, batch: dict[str, torch.Tensor]):
        scores = None
        if self.mask_cache is not None and self.model.informed_masking_active:
            scores = self.mask_cache.rankings_for(batch)
        outputs = model(batch["pixel_values"], mask_scores=scores)
        return outputs.loss, outputs

    def after_micro_batch(self, batch: dict[str, torch.Tensor], outputs) -> None:
        """Mask statistics, summed on the device (read once per logging window)."""
        informed = outputs.mask_type == MaskType.INFORMED  # only these have an object part and a graph
        sums = torch.stack(
            [
                informed.sum().float(),
                (outputs.mask_type == MaskType.FALLBACK).sum().float(),
                (outputs.object_part_size * informed).sum().float(),  # products, not masking: no data-dependent shape
                (outputs.edge_density * informed).sum().float(),
            ]
        )
        self.mask_sums = sums if self.mask_sums is None else self.mask_sums + sums
        self.mask_images += len(outputs.mask_type)

    def log_values(self) -> dict[str, float]:
        informed, fallback, part, density = self.mask_sums.tolist() if self.mask_sums is not None else [0.0] * 4
        images, num_informed = max(self.mask_images, 1), max(informed, 1)
        self.mask_sums, self.mask_images = None, 0
        return {
            "informed_share": informed / images,
            "fallback_share": fallback / images,
            "object_part_size": part / num_informed,
            "edge_density": density / num_informed,
        }

    def progress_values(self) -> dict[str, str]:
        return {"phase": "informed" if self.model.informed_masking_active else "random"}

    def after_step(self, step: int) -> None:
        probe = None if self.probe is None else self.probe["pixel_values"].to(self.accelerator.device)
        logs = self.model.schedule_step(step, self.total_steps, probe, self.exploitation_every)
        if "informed_start" in logs:
            logger.info(
                "automatic start: informed masks from step %d (decoder mask-token share %.3f > visible %.3f)",
                logs.pop("informed_start"),
                logs["exploitation_mask"],
                logs["exploitation_visible"],
            )
        if logs:
            self.accelerator.log(logs, step=step)
        if probe is not None and self.args.visualization_steps and step % self.args.visualization_steps == 0:
            self.save_panel(Path(self.args.output_dir) / f"masks-step{step}.png", step)

    def save_panel(self, path: Path, step: int) -> None:
        """Input, random mask, NCut bi-partition, informed mask, with hints, reconstruction: one row per image."""
        if self.accelerator.is_main_process:
            pixel_values = self.probe["pixel_values"].to(self.accelerator.device)
            panel = figure_panel(self.model, pixel_values, self.processor.image_mean, self.processor.image_std)
            phase = "informed" if self.model.informed_masking_active else "random"
            title = f"{Path(self.args.output_dir).name}, step {step}: {phase} masks in training"
            save_figure_panel(panel, path, title)


def main() -> None:
    model_args, data_args, args = parse_args()
    stop_at = None if args.stop_after_minutes is None else time.time() + 60 * args.stop_after_minutes
    run = (args.output_dir, args.seed, args.gradient_accumulation_steps, args.mixed_precision, args.report_to)
    accelerator = start_run(*run, args.ddp_timeout)
    model = build_model(model_args, data_args.num_channels)  # first: a bad config stops the run before data is read
    with dataset_reachable(data_args.dataset_name):
        train_data, probe_rows, image_column = load_data(data_args)

    # ----- optimiser, schedule -----
    config = model.config
    statistics = image_statistics(data_args, config, train_data, image_column, model_args.model_name_or_path)
    processor = image_processor_for(config, statistics)
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    steps_per_epoch, total_steps = training_length(
        train_data, data_args, global_batch, args.num_train_epochs, args.max_train_steps
    )
    if model_args.informed_masking_start_epoch is not None:
        config.informed_masking_start_step = round(model_args.informed_masking_start_epoch * steps_per_epoch)
    learning_rate = args.base_learning_rate * global_batch / 256
    model, optimizer = accelerator.prepare(model, adamw(model, learning_rate, args))
    if args.torch_compile:
        accelerator.unwrap_model(model).compile_blocks()
    unwrapped: SGMAEForPreTraining = accelerator.unwrap_model(model)
    if uses_mask_cache(config):
        train_data = with_index(train_data) if isinstance(train_data, datasets.Dataset) else train_data
    mask_cache = new_mask_cache(args, config, train_data, steps_per_epoch, total_steps)
    objects = {"mask_cache": mask_cache} if mask_cache is not None else {}
    state = resume_state(accelerator, optimizer, args.output_dir, args.resume_from_checkpoint, objects, total_steps)
    # Not prepared: the engine steps it once per optimiser step (a prepared one steps once per process).
    scheduler = cosine_scheduler(optimizer, args.warmup_ratio, total_steps, state.step)
    unwrapped.set_training_progress(state.step, total_steps)
    if accelerator.is_main_process:
        accelerator.init_trackers("sgmae_pretraining", config={k: str(v) for k, v in asdict(args).items()})
    log_plan(config, unwrapped, total_steps, steps_per_epoch, global_batch, learning_rate, mask_cache)

    # ----- training -----
    probe_collate = ImageCollator(eval_transform(processor), image_column, num_channels=config.num_channels)
    probe = probe_collate(probe_rows) if probe_rows else None
    args.exploitation_check_steps = args.exploitation_check_steps or max(steps_per_epoch // 4, 1)
    ranked_rows = mask_cache.ranked_rows() if mask_cache is not None and mask_cache.sources is not None else None
    epoch_batches, whole_images = input_pipeline(
        args, data_args, accelerator, train_data, image_column, processor, config, ranked_rows
    )
    hooks = PretrainingHooks(accelerator, unwrapped, total_steps, args, probe, processor, mask_cache, whole_images)

    loop = (args.output_dir, args.logging_steps, args.checkpointing_steps, args.save_total_limit, args.max_grad_norm)
    settings = LoopSettings(*loop, config, stop_at=stop_at)
    state = train(accelerator, model, optimizer, scheduler, epoch_batches, state, settings, hooks, objects)
    if state.step < total_steps:  # a checkpoint to continue from, no model yet
        resume = "the same command with --resume_from_checkpoint latest continues from its checkpoint"
        logger.info("stopped at step %d of %d (--stop_after_minutes); %s", state.step, total_steps, resume)
        accelerator.end_training()
        return
    unwrapped.set_training_progress(state.step, total_steps)  # the saved model says how far it was trained
    if state.skipped_images:
        logger.warning("skipped %d corrupt images", state.skipped_images)

    # ----- output -----
    save_outputs(accelerator, model_args, data_args, args, hooks, processor, state, global_batch)


def adamw(model: SGMAEForPreTraining, learning_rate: float, args) -> torch.optim.AdamW:
    """MAE's optimiser: AdamW with betas (0.9, --adam_beta2), no weight decay on norms, biases and tokens."""
    groups = parameter_groups(model, args.weight_decay)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, args.adam_beta2))


def save_outputs(
    accelerator: Accelerator, model_args, data_args, args, hooks: PretrainingHooks, processor, state, global_batch: int
) -> None:
    """On the main process: the final mask panel, the Hub-ready folder with its card, train_results.json, the push."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = hooks.model
        if hooks.probe is not None:
            hooks.save_panel(Path(args.output_dir) / "masks.png", state.step)
        demo = not (data_args.dataset_name or data_args.train_dir)
        card = pretraining_card(
            model_args, data_args, args, model, state, demo, global_batch, accelerator.num_processes
        )
        save_hub_folder(model, processor, args.output_dir, card)
        summary = {key: value for key, value in state.state_dict().items() if key != "train_loss"}
        summary |= {"num_processes": accelerator.num_processes, "final_loss": state.train_loss}
        write_json_atomically(Path(args.output_dir) / "train_results.json", summary)
        logger.info("saved the model to %s", args.output_dir)
        if args.push_to_hub:
            push_to_hub(args.output_dir, args.hub_model_id, args.hub_token)
    accelerator.end_training()


def uses_mask_cache(config: SGMAEConfig) -> bool:
    return config.mask_strategy == "self_guided" and config.informed_mask_source == "cached"


def new_mask_cache(args, config: SGMAEConfig, train_data, steps_per_epoch: int, total_steps: int):
    """The run's cache of whole-image rankings (None when masks are random or ranked per step): a row per training
    image, or for a stream a row per sample id of its `--mask_cache_key_column` (one line when it has none)."""
    if not uses_mask_cache(config):
        return None
    keyed = isinstance(train_data, datasets.IterableDataset)
    if keyed and args.mask_cache_key_column not in (train_data.features or {}):
        raise SystemExit(
            f"error: cached informed masks match each image to its stored ranking by a stable id, and this stream has "
            f"no {args.mask_cache_key_column!r} column (WebDataset shards have __key__): name one with "
            "--mask_cache_key_column, drop --streaming, or use --informed_mask_source step"
        )
    epochs = args.mask_refresh_epochs or default_refresh_epochs(total_steps / steps_per_epoch)
    sources = None if keyed or SOURCE_COLUMN not in train_data.features else train_data[SOURCE_COLUMN]
    return MaskRankingCache(
        0 if keyed else len(train_data), config.grid_size, max(1, round(epochs * steps_per_epoch)), keyed, sources
    )


Pipeline = tuple[Callable[[TrainingState], Iterator[dict[str, torch.Tensor]]], Callable[[], Iterator[dict]]]


def input_pipeline(
    args,
    data_args,
    accelerator: Accelerator,
    train_data,
    image_column: str,
    processor,
    config,
    ranked_rows: torch.Tensor | None = None,
) -> Pipeline:
    """`epoch_batches(state)` for the engine: images decoded and augmented in DataLoader workers, or decoded once into
    memory and augmented a whole batch at a time on the device (`--input_path decode_once`); each view comes with its
    image's row (or sample id) and crop. And `whole_images()`, the images of `ranked_rows` (all when None) uncropped,
    which cached informed masks are ranked from."""
    if args.input_path == "decode_once":
        images, left_out = decode_split(args, data_args, train_data, image_column, config)
        return decoded_pipeline(args, accelerator, processor, config, images, left_out, ranked_rows)
    batch_size = args.per_device_train_batch_size
    streamed = isinstance(train_data, datasets.IterableDataset)
    key_column = args.mask_cache_key_column if streamed and uses_mask_cache(config) else None
    index_column = INDEX_COLUMN if INDEX_COLUMN in (train_data.features or {}) else None
    transform = TrainTransform(processor)
    collate = ImageCollator(
        transform, image_column, index_column=index_column, num_channels=config.num_channels, key_column=key_column
    )
    loader = dict(accelerator=accelerator, data_args=data_args, batch_size=batch_size, collate=collate, seed=args.seed)
    epoch_batches = partial(worker_epoch_batches, train_data, **loader)
    ranked_data = train_data if ranked_rows is None else train_data.select(ranked_rows.tolist())
    workers, channels = data_args.dataloader_num_workers, config.num_channels
    whole = (ranked_data, image_column, processor, accelerator, batch_size, workers, channels, key_column)
    return epoch_batches, partial(whole_image_batches, *whole)


def decoded_pipeline(
    args, accelerator: Accelerator, processor, config, images: torch.Tensor, left_out, ranked_rows: torch.Tensor | None
) -> Pipeline:
    """`input_pipeline` of `--input_path decode_once`: the decoded split `images` (uint8 squares of `--storage_size`)
    augmented a whole batch at a time on the device."""
    augment = BatchAugmentation(config.image_height_width, processor.image_mean, processor.image_std)
    batch_size = args.per_device_train_batch_size
    loader = dict(accelerator=accelerator, batch_size=batch_size, seed=args.seed, left_out=left_out)
    epoch_batches = partial(decoded_epoch_batches, images, augment=augment.with_crops, **loader)
    if ranked_rows is None:
        return epoch_batches, partial(decoded_whole_images, images, processor, accelerator, batch_size)
    whole = partial(decoded_whole_images, images[ranked_rows], processor, accelerator, batch_size)
    return epoch_batches, partial(renumbered, whole, ranked_rows.to(accelerator.device))


def decode_split(args, data_args, train_data, image_column: str, config):
    """The split decoded once into memory (`decode_all`): uint8 squares of `--storage_size`, and the rows left out."""
    storage = args.storage_size or round(1.15 * max(config.image_height_width))
    if storage < max(config.image_height_width):
        raise SystemExit(f"error: --storage_size {storage} is smaller than the model's images")
    workers, budget = data_args.dataloader_num_workers, args.decode_once_max_gib
    return decode_all(train_data, image_column, storage, workers, budget, config.num_channels)


def renumbered(whole_images: Callable[[], Iterator[dict]], rows: torch.Tensor) -> Iterator[dict]:
    """`whole_images()` of a selection of rows, with each batch's `index` turned back into the split's rows."""
    for batch in whole_images():
        yield batch | {"index": rows[batch["index"]]}


def log_plan(
    config: SGMAEConfig, model: SGMAEForPreTraining, total_steps, steps_per_epoch, global_batch, lr, mask_cache
) -> None:
    logger.info(
        "training %d steps (%d epochs of %d steps), global batch %d, lr %.2e, masking: %s",
        total_steps,
        math.ceil(total_steps / steps_per_epoch),
        steps_per_epoch,
        global_batch,
        lr,
        masking_schedule(config, model.informed_masking_start_step, finished=False),
    )
    if mask_cache is not None:
        logger.info(
            "informed masks from whole-image rankings, refreshed every %d steps from the start and cropped with each "
            "view (%.1f MB for %d images)",
            mask_cache.refresh_steps,
            mask_cache.memory_bytes() / 1e6,
            len(mask_cache.rankings),
        )


if __name__ == "__main__":
    main()
