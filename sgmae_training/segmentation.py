"""Semantic segmentation on an SG-MAE encoder, MAE's ADE20K protocol: transformers' UperNet fine-tuned end to end by
the shared loop (AdamW with layer-wise lr decay, linear warm-up then poly decay), evaluated at full resolution by
sliding windows (or the whole image) through the shipped `mean_iou` metric. `run_segmentation.py` prepares a `Task`
and calls `finetune`; the image/map data are in `data/segmentation.py`."""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import evaluate
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from torch import nn
from torch.utils.data import DataLoader

from modeling_sgmae import SGMAEForSemanticSegmentation

from .arguments import RunArguments
from .data.images import warn_skipped
from .data.loaders import shard_for_process, worker_epoch_batches
from .data.loading import training_length
from .data.segmentation import (
    BadMaskError,
    PairTransform,
    SegmentationCollator,
    SegmentationData,
    SegmentationDataArguments,
    one_line,
)
from .engine import LoopSettings, resume_state, train
from .optim import layer_decay_groups, poly_scheduler
from .protocol import EvaluatingHooks, finish_training
from .training_state import TrainingState

logger = logging.getLogger(__name__)

METRIC_PATH = Path(__file__).parent / "metrics" / "mean_iou"  # shipped: evaluate loads it offline
RECIPE_STEPS = 160_000  # MAE's ADE20K schedule (mmsegmentation's schedule_160k)
AREA_NAMES = (
    "intersect",
    "union",
    "pred_label",
    "label",
)  # the mean_iou metric's per-class areas, in pixel_areas' order


@dataclass
class SegmentationArguments(RunArguments):
    """Optimisation, schedule, evaluation, logging and output (defaults: MAE's ADE20K recipe, see the docs)."""

    output_dir: str = field(default="outputs/sgmae-segmentation", metadata={"help": "Where results go."})
    seed: int = field(default=0, metadata={"help": "Seed for the heads, data order and augmentation."})
    per_device_train_batch_size: int = field(
        default=16, metadata={"help": "Crops per device/step (16 in all, e.g. 2 x 8 GPUs; BatchNorm needs >= 2)."}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    max_train_steps: int | None = field(
        default=None, metadata={"help": f"Total optimiser steps (overrides epochs; neither given: {RECIPE_STEPS})."}
    )
    num_train_epochs: float | None = field(default=None, metadata={"help": "Epochs, when --max_train_steps is unset."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak AdamW lr, not scaled by the batch (1e-4)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (0.05)."})
    layer_decay: float = field(default=0.65, metadata={"help": "lr x layer_decay^(depth from the top) (0.65)."})
    warmup_steps: int = field(default=1500, metadata={"help": "Linear warm-up steps before the poly decay (1500)."})
    poly_power: float = field(default=1.0, metadata={"help": "Power of the poly decay to 0 (1.0)."})
    eval_every_epochs: int = field(default=1, metadata={"help": "Evaluate every N epochs (0: only at the end)."})
    logging_steps: int = field(default=50, metadata={"help": "Log loss and lr every N steps."})


@dataclass
class Task:
    """What run_segmentation.py prepared for `finetune`."""

    accelerator: Accelerator
    data_args: SegmentationDataArguments
    args: SegmentationArguments
    model: SGMAEForSemanticSegmentation
    data: SegmentationData
    image_mean: list[float]
    image_std: list[float]
    results: dict[str, Any] = field(default_factory=dict)  # the last evaluation's eval_results.json entries


def collator(task: Task, train: bool) -> SegmentationCollator:
    """Training's (augmented crops) or evaluation's (resized whole images, full-size maps) collator."""
    data_args, data = task.data_args, task.data
    transform = PairTransform(
        data_args.crop_size,
        task.image_mean,
        task.image_std,
        data_args.ignore_index,
        train,
        tuple(data_args.scale_range),
        data_args.cat_max_ratio,
        data_args.photometric_distortion,
    )
    return SegmentationCollator(
        transform,
        data.image_column,
        data.mask_column,
        task.model.config.num_labels,
        data_args.reduce_labels,
        task.model.config.backbone_config.num_channels,
        data.train_split if train else data.eval_split,
    )


# ----- inference and scoring -----------------------------------------------------------------------------------------
def padded_logits(model: nn.Module, pixels: torch.Tensor, multiple: int, at_least: int = 0) -> torch.Tensor:
    """The model's logits for [B, C, h, w] pixels, run padded (zeros: the mean after normalisation) to a multiple of
    `multiple` and at least `at_least` per side, then cut back to [B, K, h, w]."""
    height, width = pixels.shape[2:]
    padded_height = max(math.ceil(height / multiple) * multiple, at_least)
    padded_width = max(math.ceil(width / multiple) * multiple, at_least)
    padded = nn.functional.pad(pixels, (0, padded_width - width, 0, padded_height - height))
    return model(pixel_values=padded).logits[:, :, :height, :width].float()


@torch.no_grad()
def predict(model: nn.Module, pixels: torch.Tensor, mode: str, crop: int, stride: int, multiple: int) -> torch.Tensor:
    """Class scores [B, K, h, w] for normalised pixels [B, C, h, w].

    `slide` (mmsegmentation's slide_inference): crop x crop windows every `stride` pixels, the last flush with the
    border, logits averaged where windows overlap; a side shorter than the crop is padded. `whole`: the image at once,
    padded to a multiple of `multiple` (the pyramid's coarsest stride)."""
    if mode == "whole":
        return padded_logits(model, pixels, multiple)
    height, width = pixels.shape[2:]
    rows = max(height - crop + stride - 1, 0) // stride + 1
    columns = max(width - crop + stride - 1, 0) // stride + 1
    scores = counts = None
    for row in range(rows):
        for column in range(columns):
            bottom, right = min(row * stride + crop, height), min(column * stride + crop, width)
            top, left = max(bottom - crop, 0), max(right - crop, 0)
            window = padded_logits(model, pixels[:, :, top:bottom, left:right], multiple, crop)
            if scores is None:
                scores = window.new_zeros(*window.shape[:2], height, width)
                counts = window.new_zeros(1, 1, height, width)
            scores[:, :, top:bottom, left:right] += window
            counts[:, :, top:bottom, left:right] += 1
    return scores / counts


def pixel_areas(prediction: torch.Tensor, labels: torch.Tensor, num_labels: int, ignore_index: int) -> torch.Tensor:
    """Per-class pixel counts [4, K] (intersection, union, predicted, reference) of class-id maps of one shape,
    reference pixels at `ignore_index` left out: the mean_iou metric's areas, counted on the device."""
    kept = labels != ignore_index
    prediction, labels = prediction[kept], labels[kept]
    intersect = torch.bincount(prediction[prediction == labels], minlength=num_labels)[:num_labels]
    predicted = torch.bincount(prediction, minlength=num_labels)[:num_labels]
    reference = torch.bincount(labels, minlength=num_labels)[:num_labels]
    return torch.stack([intersect, predicted + reference - intersect, predicted, reference])


def shard_areas(task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's shard of the evaluation split predicted at full resolution: per-class areas [4, K] and counts
    [2] (images scored, corrupt images skipped)."""
    accelerator, data_args, model = task.accelerator, task.data_args, task.model
    shard = shard_for_process(task.data.eval, accelerator, seed=0, epoch=0, shuffle=False, buffer_size=0)
    loader = DataLoader(
        shard, batch_size=1, collate_fn=collator(task, train=False), num_workers=data_args.dataloader_num_workers
    )
    areas = torch.zeros(4, model.config.num_labels, dtype=torch.long, device=accelerator.device)
    counts = torch.zeros(2, dtype=torch.long, device=accelerator.device)
    multiple = 2 * model.backbone.config.patch_size  # the pyramid's coarsest stride
    for batch in loader:
        counts[1] += batch["skipped"]
        warn_skipped(batch)  # here, where they are counted
        if not len(batch["pixel_values"]):
            continue
        pixels, labels = batch["pixel_values"].to(accelerator.device), batch["labels"].to(accelerator.device)
        with accelerator.autocast():
            scores = predict(model, pixels, data_args.eval_mode, data_args.crop_size, data_args.eval_stride, multiple)
        scores = nn.functional.interpolate(scores, size=labels.shape[1:], mode="bilinear", align_corners=False)
        areas += pixel_areas(scores.argmax(1), labels, model.config.num_labels, data_args.ignore_index)
        counts[0] += 1
    return areas, counts


def evaluate_model(task: Task) -> dict[str, Any]:
    """mIoU, per-class IoU and accuracy, pixel accuracy over the evaluation split: each process scores its shard, and
    the summed areas go through the shipped `mean_iou` metric (every image counted once: the shards do not overlap)."""
    accelerator, model = task.accelerator, task.model
    if accelerator.num_processes > 1:
        # DDP copies BatchNorm statistics from process 0 only at the start of each forward, so the others end training
        # with their own last update: every process scores with process 0's, the statistics that are saved.
        for buffer in model.buffers():
            buffer.data.copy_(broadcast(buffer.data.clone(), from_process=0))
    was_training = model.training
    model.eval()
    areas, counts = shard_areas(task)
    model.train(was_training)
    areas, counts = accelerator.reduce(areas, "sum"), accelerator.reduce(counts, "sum").tolist()
    results: dict[str, Any] = {"eval_samples": counts[0], "eval_skipped_images": counts[1]}
    if not accelerator.is_main_process:
        return results
    scores = evaluate.load(str(METRIC_PATH)).compute(
        predictions=[],
        references=[],
        num_labels=model.config.num_labels,
        ignore_index=task.data_args.ignore_index,
        areas=dict(zip(AREA_NAMES, areas.cpu().numpy(), strict=True)),
    )
    id2label = model.config.id2label
    return results | {
        "eval_mean_iou": scores["mean_iou"],
        "eval_mean_accuracy": scores["mean_accuracy"],
        "eval_overall_accuracy": scores["overall_accuracy"],
        "eval_per_category_iou": {id2label[i]: none_if_nan(v) for i, v in enumerate(scores["per_category_iou"])},
        "eval_per_category_accuracy": {
            id2label[i]: none_if_nan(v) for i, v in enumerate(scores["per_category_accuracy"])
        },
    }


def none_if_nan(value: float) -> float | None:
    """A class absent from references and predictions has no IoU (JSON has no NaN)."""
    return None if math.isnan(value) else float(value)


# ----- training ------------------------------------------------------------------------------------------------------
class SegmentationHooks(EvaluatingHooks):
    """UperNet's loss (decode head + 0.4 x auxiliary head, ignore index left out) and the evaluations."""

    def __init__(self, task: Task, total_steps: int):
        self.task, self.total_steps = task, total_steps
        self.results: dict[str, Any] = {}

    def loss(self, model, batch: dict[str, torch.Tensor]):
        return model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss, None

    def evaluate(self, step: int) -> None:
        self.results = evaluate_model(self.task)
        self.evaluated_at = step
        scalars = {key: value for key, value in self.results.items() if isinstance(value, (int, float))}
        self.task.accelerator.log(scalars, step=step)

    def after_epoch(self, state: TrainingState) -> None:
        every = self.task.args.eval_every_epochs
        if (every and state.epoch % every == 0) or state.step >= self.total_steps:
            self.evaluate(state.step)
            if "eval_mean_iou" in self.results:
                logger.info(
                    "epoch %d: mIoU %.4f, pixel accuracy %.4f",
                    state.epoch,
                    self.results["eval_mean_iou"],
                    self.results["eval_overall_accuracy"],
                )


def finetune(task: Task) -> TrainingState:
    """Fine-tune `task.model` and evaluate it at the end (`task.results`). A bad map, found in training or evaluation
    (in a DataLoader worker or here), ends the run with its one line, printed as the last line of the run."""
    try:
        return train_and_evaluate(task)
    except BadMaskError as error:
        message = one_line(error)
    # The loop's progress bar closes (and draws itself a last time) when its frame is freed; a worker's re-raised error
    # holds that frame in a reference cycle, so free it now, and the message stays the run's last line.
    gc.collect()
    raise SystemExit(message)


def train_and_evaluate(task: Task) -> TrainingState:
    """The training loop (checkpoints, resume, evaluations after epochs), then the final evaluation if the last epoch
    did not end with one."""
    accelerator, data_args, args = task.accelerator, task.data_args, task.args
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    steps_per_epoch, total_steps = training_length(
        task.data.train, data_args, global_batch, args.num_train_epochs, args.max_train_steps
    )
    model, optimizer, scheduler, state = prepare_training(task, total_steps)
    schedule = (total_steps, math.ceil(total_steps / steps_per_epoch), steps_per_epoch, global_batch)
    recipe = (args.learning_rate, args.layer_decay, task.model.backbone.config.drop_path_rate, data_args.crop_size)
    logger.info(
        "fine-tuning %d steps (%d epochs of %d steps), global batch %d, lr %.2e, layer decay %s, drop path %s, "
        "crops %d",
        *schedule,
        *recipe,
    )
    epoch_batches: Callable[[TrainingState], Iterator[dict]] = partial(
        worker_epoch_batches,
        task.data.train,
        accelerator=accelerator,
        data_args=data_args,
        batch_size=args.per_device_train_batch_size,
        collate=collator(task, train=True),
        seed=args.seed,
    )
    hooks, config = SegmentationHooks(task, total_steps), task.model.config
    settings = LoopSettings(
        args.output_dir,
        args.logging_steps,
        args.checkpointing_steps,
        args.save_total_limit,
        args.max_grad_norm,
        config,
    )
    state = train(accelerator, model, optimizer, scheduler, epoch_batches, state, settings, hooks, {})
    finish_training(state, hooks)
    task.results = hooks.results
    return state


def prepare_training(task: Task, total_steps: int) -> tuple[nn.Module, torch.optim.Optimizer, Any, TrainingState]:
    """AdamW with layer-wise lr decay (SyncBN across GPUs), prepared by Accelerate (`task.model` becomes the unwrapped
    model), the state resumed if asked, the warm-up + poly schedule, the trackers started."""
    accelerator, args, model = task.accelerator, task.args, task.model
    groups = layer_decay_groups(model, args.learning_rate, args.weight_decay, args.layer_decay, encoder="backbone.vit")
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # mmsegmentation's SyncBN: batch statistics of all
    prepared_model, optimizer = accelerator.prepare(model, optimizer)
    task.model = accelerator.unwrap_model(prepared_model)
    state = resume_state(accelerator, optimizer, args.output_dir, args.resume_from_checkpoint, {}, total_steps)
    scheduler = poly_scheduler(optimizer, args.warmup_steps, total_steps, args.poly_power, state.step)
    if accelerator.is_main_process:
        accelerator.init_trackers("sgmae_segmentation", config={k: str(v) for k, v in asdict(args).items()})
    return prepared_model, optimizer, scheduler, state
