#!/usr/bin/env python
"""Fine-tune an SG-MAE (or transformers ViTMAE) encoder for semantic segmentation: transformers' UperNet on the
SG-MAE backbone with BEiT / MAE's feature pyramid, MAE's ADE20K recipe by default (docs/segmentation.md).

    accelerate launch -q --config_file configuration/accelerate/single_gpu.yaml run_segmentation.py \
        --dataset_name zhoubolei/scene_parse_150 --num_labels 150 --reduce_labels \
        --label_names_file configuration/datasets/ade20k-id2label.json \
        --model_name_or_path outputs/sgmae-vit-base --output_dir outputs/sgmae-ade20k

Saves a Hub-ready SGMAEForSemanticSegmentation folder (`pipeline("image-segmentation", trust_remote_code=True)`
works on it) and eval_results.json (mIoU, per-class IoU and accuracy, pixel accuracy, through the shipped `mean_iou`
metric). Arguments can also come from one JSON/YAML file: `python run_segmentation.py args.yaml`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import evaluate
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from torch import nn
from torch.utils.data import DataLoader
from transformers import HfArgumentParser, SegformerImageProcessor

from modeling_sgmae import SGMAEBackbone, SGMAEConfig, SGMAEForSemanticSegmentation, SGMAEUperNetConfig
from modeling_sgmae.modeling_sgmae import resize_position_table
from sgmae_training.arguments import LOOP_POSITIVE_ARGUMENTS, RunArguments, check_positive, parse_script_args
from sgmae_training.data.images import check_num_channels, image_processor_for, image_statistics
from sgmae_training.data.loaders import shard_for_process, worker_epoch_batches
from sgmae_training.data.loading import (
    find_column,
    limit_samples,
    prepare_images,
    training_and_evaluation_splits,
    training_length,
)
from sgmae_training.engine import LoopSettings, TrainingHooks, resume_state, start_run, train
from sgmae_training.hub import (
    check_checkpoint_kind,
    model_card,
    push_to_hub,
    save_hub_folder,
    write_json_atomically,
)
from sgmae_training.optim import layer_decay_groups, poly_scheduler
from sgmae_training.segmentation import (
    BadMaskError,
    PairTransform,
    SegmentationCollator,
    SegmentationDataArguments,
    check_segmentation_arguments,
    find_mask_column,
    label_names,
    one_line,
    pixel_areas,
    predict,
)
from sgmae_training.training_state import TrainingState

logger = logging.getLogger("run_segmentation")
METRIC_PATH = Path(__file__).parent / "sgmae_training" / "metrics" / "mean_iou"  # shipped: evaluate loads it offline
# An encoder (SG-MAE or ViTMAE) starts a model; a segmentation checkpoint is continued.
CHECKPOINT_KINDS = {
    "sgmae": "an SG-MAE (pre-training or classification)", "sgmae_upernet": "an SG-MAE segmentation",
    "vit_mae": "a transformers ViTMAE",
}  # fmt: skip
RECIPE_STEPS = 160_000  # MAE's ADE20K schedule (mmsegmentation's schedule_160k)


@dataclass
class ModelArguments:
    """Which encoder to fine-tune, and the pyramid and heads on it."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "SG-MAE pre-training/classification/segmentation checkpoint, or a transformers ViTMAE one."},
    )
    config_name: str | None = field(
        default=None, metadata={"help": "SGMAEConfig JSON for a randomly initialised encoder (from-scratch baseline)."}
    )
    out_indices: list[int] | None = field(
        default=None,
        metadata={"help": "Blocks (1-based) feeding the pyramid; default L/3, L/2, 2L/3, L (4, 6, 8, 12 for ViT-B)."},
    )
    drop_path: float = field(default=0.1, metadata={"help": "Stochastic-depth rate (MAE/BEiT ADE20K: 0.1)."})
    head_channels: int = field(default=768, metadata={"help": "UperNet width (MAE's ViT-B config: 768)."})
    auxiliary_loss_weight: float = field(default=0.4, metadata={"help": "FCN auxiliary head's loss weight (0: off)."})


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


def parse_args() -> tuple[ModelArguments, SegmentationDataArguments, SegmentationArguments]:
    parsed = parse_script_args(HfArgumentParser((ModelArguments, SegmentationDataArguments, SegmentationArguments)))
    validate_args(*parsed)
    return parsed


def validate_args(model_args: ModelArguments, data_args: SegmentationDataArguments, args: SegmentationArguments):
    """Clear errors for bad choices, before anything is loaded."""
    if not (model_args.model_name_or_path or model_args.config_name):
        raise SystemExit("error: give --model_name_or_path (a checkpoint) or --config_name (a from-scratch baseline)")
    if args.num_train_epochs is None and args.max_train_steps is None:
        args.max_train_steps = RECIPE_STEPS
    if args.num_train_epochs is not None and args.num_train_epochs <= 0:
        raise SystemExit(f"error: --num_train_epochs must be positive, got {args.num_train_epochs}")
    args.check()
    check_positive(args, LOOP_POSITIVE_ARGUMENTS)
    check_positive(model_args, ("head_channels",))
    check_positive(args, ("warmup_steps", "eval_every_epochs"), minimum=0)
    if args.per_device_train_batch_size < 2:
        raise SystemExit("error: --per_device_train_batch_size must be at least 2 (the heads' BatchNorm needs two)")
    if not 0 <= model_args.drop_path < 1 or not 0 < args.layer_decay <= 1:
        raise SystemExit("error: --drop_path must be in [0, 1) and --layer_decay in (0, 1]")
    check_segmentation_arguments(data_args)


# ----- model ---------------------------------------------------------------------------------------------------------
def pyramid_stages(model_args: ModelArguments, num_layers: int) -> list[int]:
    """The four blocks whose outputs feed the pyramid: given, or L/3, L/2, 2L/3, L (BEiT/MAE's 0-based 3, 5, 7, 11
    for 12 blocks, 7, 11, 15, 23 for 24)."""
    stages = model_args.out_indices or [round(num_layers / 3), round(num_layers / 2), round(2 * num_layers / 3)]
    stages = list(stages) if model_args.out_indices else [*stages, num_layers]
    if len(stages) != 4 or len(set(stages)) != 4 or not all(0 <= stage <= num_layers for stage in stages):
        raise SystemExit(
            f"error: the pyramid takes four different blocks of the {num_layers}-block encoder (0 = the embeddings), "
            f"got {stages}; pass --out_indices"
        )
    return sorted(stages)


def build_model(
    model_args: ModelArguments, data_args: SegmentationDataArguments, names: list[str]
) -> SGMAEForSemanticSegmentation:
    """UperNet on the SG-MAE backbone at the crop size, its encoder from a checkpoint (position table resized to
    the crop's grid, bicubic as MAE's `interpolate_pos_embed`) or a config; a segmentation checkpoint is continued
    (with new heads when its classes differ)."""
    labels = {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}
    path, cache_dir = model_args.model_name_or_path, data_args.cache_dir
    encoder: SGMAEBackbone | None = None
    try:
        if path and check_checkpoint_kind(path, cache_dir, kinds=CHECKPOINT_KINDS) == "sgmae_upernet":
            model = SGMAEForSemanticSegmentation.from_pretrained(
                path, cache_dir=cache_dir, ignore_mismatched_sizes=True, loss_ignore_index=data_args.ignore_index,
                **labels,
            )  # fmt: skip
            check_num_channels(data_args.num_channels, model.config.backbone_config, path)
            return model
        if path:
            encoder = SGMAEBackbone.from_pretrained(path, cache_dir=cache_dir)
            backbone_config = SGMAEConfig.from_dict(encoder.config.to_dict())
            check_num_channels(data_args.num_channels, backbone_config, path)
        else:
            backbone_config = SGMAEConfig.from_json_file(model_args.config_name)
            if data_args.num_channels:
                backbone_config.num_channels = data_args.num_channels
        stages = pyramid_stages(model_args, backbone_config.num_hidden_layers)
        backbone_config.update(
            {"image_size": data_args.crop_size, "drop_path_rate": model_args.drop_path, "add_fpn": True,
             "apply_layernorm": False, "reshape_hidden_states": True, "out_indices": stages}
        )  # fmt: skip
        backbone_config.validate()
        config = SGMAEUperNetConfig(
            backbone_config=backbone_config, hidden_size=model_args.head_channels,
            use_auxiliary_head=model_args.auxiliary_loss_weight > 0,
            auxiliary_loss_weight=model_args.auxiliary_loss_weight, auxiliary_in_channels=backbone_config.hidden_size,
            loss_ignore_index=data_args.ignore_index, **labels,
        )  # fmt: skip
    except (OSError, ValueError, TypeError, SafetensorError, StrictDataclassError) as error:
        reason = " ".join(str(error).split())  # one line (strict config errors span two)
        raise SystemExit(f"error: cannot build the segmentation model from {path or model_args.config_name!r}: "
                         f"{reason}") from error  # fmt: skip
    model = SGMAEForSemanticSegmentation(config)
    if encoder is not None:
        load_encoder(model, encoder)
    return model


def load_encoder(model: SGMAEForSemanticSegmentation, encoder: SGMAEBackbone) -> None:
    """Copy a pre-trained encoder into the model's backbone, its position table resized to the crop's grid."""
    state = encoder.vit.state_dict()
    key = "embeddings.position_embeddings"
    state[key] = resize_position_table(state[key], encoder.config.grid_size, model.backbone.config.grid_size)
    model.backbone.vit.load_state_dict(state)
    model.freeze_unused_parameters()


# ----- training ------------------------------------------------------------------------------------------------------
@dataclass
class Task:
    """What the loop and the evaluation need."""

    accelerator: Accelerator
    data_args: SegmentationDataArguments
    args: SegmentationArguments
    model: SGMAEForSemanticSegmentation
    eval_data: datasets.Dataset
    eval_collate: SegmentationCollator
    results: dict[str, Any] = field(default_factory=dict)  # the last evaluation's eval_results.json entries


def evaluate_model(task: Task) -> dict[str, Any]:
    """mIoU, per-class IoU and accuracy, pixel accuracy over the evaluation split at full resolution: each process
    predicts its shard (sliding window or whole image), counts per-class areas, and the sums go through the shipped
    `mean_iou` metric (every image counted once: the shards do not overlap)."""
    accelerator, data_args, model = task.accelerator, task.data_args, task.model
    num_labels = model.config.num_labels
    shard = shard_for_process(task.eval_data, accelerator, seed=0, epoch=0, shuffle=False, buffer_size=0)
    loader = DataLoader(
        shard, batch_size=1, collate_fn=task.eval_collate, num_workers=data_args.dataloader_num_workers
    )
    areas = torch.zeros(4, num_labels, dtype=torch.long, device=accelerator.device)
    counts = torch.zeros(2, dtype=torch.long, device=accelerator.device)  # images scored, corrupt images skipped
    multiple = 2 * model.backbone.config.patch_size  # the pyramid's coarsest stride
    if accelerator.num_processes > 1:
        # DDP copies BatchNorm statistics from process 0 only at the start of each forward, so the others end training
        # with their own last update: every process scores with process 0's, the statistics that are saved.
        for buffer in model.buffers():
            buffer.data.copy_(broadcast(buffer.data.clone(), from_process=0))
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            counts[1] += batch["skipped"]
            if not len(batch["pixel_values"]):
                continue
            pixels, labels = batch["pixel_values"].to(accelerator.device), batch["labels"].to(accelerator.device)
            with accelerator.autocast():
                scores = predict(model, pixels, data_args.eval_mode, data_args.crop_size, data_args.eval_stride,
                                 multiple)  # fmt: skip
            scores = nn.functional.interpolate(scores, size=labels.shape[1:], mode="bilinear", align_corners=False)
            areas += pixel_areas(scores.argmax(1), labels, num_labels, data_args.ignore_index)
            counts[0] += 1
    except BadMaskError as error:
        raise SystemExit(one_line(error)) from error
    model.train(was_training)
    areas, counts = accelerator.reduce(areas, "sum"), accelerator.reduce(counts, "sum").tolist()
    results: dict[str, Any] = {"eval_samples": counts[0], "eval_skipped_images": counts[1]}
    if not accelerator.is_main_process:
        return results
    metric = evaluate.load(str(METRIC_PATH))
    names = ("intersect", "union", "pred_label", "label")
    scores = metric.compute(
        predictions=[], references=[], num_labels=num_labels, ignore_index=data_args.ignore_index,
        areas=dict(zip(names, areas.cpu().numpy(), strict=True)),
    )  # fmt: skip
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


class SegmentationHooks(TrainingHooks):
    """UperNet's loss (decode head + 0.4 x auxiliary head, ignore index left out) and the evaluations."""

    def __init__(self, task: Task, total_steps: int):
        self.task, self.total_steps = task, total_steps
        self.results: dict[str, Any] = {}
        self.evaluated_at = -1

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
                    "epoch %d: mIoU %.4f, pixel accuracy %.4f", state.epoch, self.results["eval_mean_iou"],
                    self.results["eval_overall_accuracy"],
                )  # fmt: skip


def checked_batches(epoch_batches: Callable[[TrainingState], Iterator[dict]], state: TrainingState) -> Iterator[dict]:
    """The epoch's training batches; a bad mask (found in a DataLoader worker or here) ends the run with its line."""
    try:
        yield from epoch_batches(state)
    except BadMaskError as error:
        raise SystemExit(one_line(error)) from error


def finetune(task: Task, train_data, collate: SegmentationCollator) -> TrainingState:
    """The training loop: AdamW with layer-wise lr decay, linear warm-up then poly decay, checkpoints and resume."""
    accelerator, data_args, args = task.accelerator, task.data_args, task.args
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    steps_per_epoch, total_steps = training_length(
        train_data, data_args, global_batch, args.num_train_epochs, args.max_train_steps
    )
    model = task.model
    optimizer = torch.optim.AdamW(
        layer_decay_groups(model, args.learning_rate, args.weight_decay, args.layer_decay, encoder="backbone.vit"),
        betas=(0.9, 0.999),
    )
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # mmsegmentation's SyncBN: batch statistics of all
    prepared_model, optimizer = accelerator.prepare(model, optimizer)
    task.model = accelerator.unwrap_model(prepared_model)
    state = resume_state(accelerator, optimizer, args.output_dir, args.resume_from_checkpoint, {}, total_steps)
    scheduler = poly_scheduler(optimizer, args.warmup_steps, total_steps, args.poly_power, state.step)
    if accelerator.is_main_process:
        accelerator.init_trackers("sgmae_segmentation", config={k: str(v) for k, v in asdict(args).items()})
    logger.info(
        "fine-tuning %d steps (%d epochs of %d steps), global batch %d, lr %.2e, layer decay %s, drop path %s, "
        "crops %d", total_steps, math.ceil(total_steps / steps_per_epoch), steps_per_epoch, global_batch,
        args.learning_rate, args.layer_decay, task.model.backbone.config.drop_path_rate, data_args.crop_size,
    )  # fmt: skip
    loader = partial(worker_epoch_batches, train_data, accelerator=accelerator, data_args=data_args,
                     batch_size=args.per_device_train_batch_size, collate=collate, seed=args.seed)  # fmt: skip

    hooks = SegmentationHooks(task, total_steps)
    settings = LoopSettings(
        args.output_dir, args.logging_steps, args.checkpointing_steps, args.save_total_limit, args.max_grad_norm,
        task.model.config,
    )  # fmt: skip
    state = train(
        accelerator, prepared_model, optimizer, scheduler, partial(checked_batches, loader), state, settings, hooks, {}
    )
    if state.skipped_images:
        logger.warning("skipped %d corrupt training images", state.skipped_images)
    if hooks.evaluated_at != state.step:
        hooks.evaluate(state.step)
    task.results = hooks.results
    return state


# ----- main ----------------------------------------------------------------------------------------------------------
def load_data(data_args: SegmentationDataArguments):
    """Training and evaluation splits (undecoded images and masks) and their image and mask columns."""
    train_data, eval_data, eval_split, image_column = training_and_evaluation_splits(data_args)
    mask_column = find_mask_column(train_data.features, data_args.mask_column, image_column)
    for column in (image_column, mask_column):
        find_column(eval_data.features, column, (), f"{eval_split} split's")
    train_data = limit_samples(train_data, data_args.max_train_samples)
    eval_data = limit_samples(eval_data, data_args.max_eval_samples)
    if not len(eval_data):
        raise SystemExit(f"error: the {eval_split!r} split is empty")
    train_data = prepare_images(prepare_images(train_data, image_column), mask_column)
    eval_data = prepare_images(prepare_images(eval_data, image_column), mask_column)
    return train_data, eval_data, image_column, mask_column


def main() -> None:
    model_args, data_args, args = parse_args()
    names = label_names(data_args)
    if data_args.ignore_index < len(names):
        raise SystemExit(f"error: --ignore_index {data_args.ignore_index} is one of the {len(names)} class ids; use "
                         f"{len(names)} or more (ADE20K: 255)")  # fmt: skip
    accelerator = start_run(
        args.output_dir, args.seed, args.gradient_accumulation_steps, args.mixed_precision, args.report_to,
        args.ddp_timeout,
    )  # fmt: skip
    train_data, eval_data, image_column, mask_column = load_data(data_args)
    model = build_model(model_args, data_args, names)
    backbone_config = model.config.backbone_config
    channels = backbone_config.num_channels
    if data_args.photometric_distortion and channels != 3:
        raise SystemExit(f"error: --photometric_distortion takes RGB images, not {channels} channels; pass "
                         "--photometric_distortion false")  # fmt: skip
    statistics = image_statistics(data_args, backbone_config, train_data, image_column, model_args.model_name_or_path)
    processor = image_processor_for(backbone_config, statistics)  # MAE's mean/std unless the data need others
    mean, std = list(processor.image_mean), list(processor.image_std)
    common = dict(image_column=image_column, mask_column=mask_column, num_labels=len(names),
                  reduce_labels=data_args.reduce_labels, num_channels=channels)  # fmt: skip
    train_collate = SegmentationCollator(
        PairTransform(data_args.crop_size, mean, std, data_args.ignore_index, True, tuple(data_args.scale_range),
                      data_args.cat_max_ratio, data_args.photometric_distortion), **common,
    )  # fmt: skip
    eval_collate = SegmentationCollator(
        PairTransform(data_args.crop_size, mean, std, data_args.ignore_index, False), **common
    )
    logger.info(
        "segmentation of %d classes (%s...), image column %r, mask column %r%s, %d processes", len(names),
        ", ".join(names[:3]), image_column, mask_column, " (labels reduced)" if data_args.reduce_labels else "",
        accelerator.num_processes,
    )  # fmt: skip
    task = Task(accelerator, data_args, args, model, eval_data, eval_collate)
    state = finetune(task, train_data, train_collate)

    # ----- output -----
    results = {
        "model_name_or_path": model_args.model_name_or_path or model_args.config_name,
        "num_processes": accelerator.num_processes,
        "eval_mode": data_args.eval_mode,
        "crop_size": data_args.crop_size,
        **task.results,
        **state.results(),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output = Path(args.output_dir)
        write_json_atomically(output / "eval_results.json", results)
        logger.info("mIoU %s over %d images", results.get("eval_mean_iou"), results["eval_samples"])
        segmenter_processor = SegformerImageProcessor(
            size={"height": data_args.crop_size, "width": data_args.crop_size}, image_mean=mean, image_std=std,
            do_reduce_labels=data_args.reduce_labels,
        )  # fmt: skip
        card = segmentation_card(model_args, data_args, args, task.model, results)
        task.model.eval()
        save_hub_folder(task.model, segmenter_processor, output, card)
        logger.info("saved the segmentation model to %s", output)
        if args.push_to_hub:
            push_to_hub(args.output_dir, args.hub_model_id, args.hub_token)
    accelerator.end_training()


def segmentation_card(model_args, data_args, args, model: SGMAEForSemanticSegmentation, results: dict) -> str:
    """The model card: the pipeline call, mIoU and pixel accuracy (model-index), the recipe, the per-class IoU."""
    backbone = model.config.backbone_config
    name = args.hub_model_id or Path(args.output_dir).name
    data_name = Path(data_args.dataset_name or data_args.train_dir or "images").name
    if data_args.dataset_name and not Path(data_args.dataset_name).exists():
        data_name = data_args.dataset_name
    dataset = {"name": data_name, "type": data_name, "split": data_args.validation_split}
    metrics = [
        {"type": "mean_iou", "value": round(results["eval_mean_iou"], 4), "name": "mIoU"},
        {"type": "accuracy", "value": round(results["eval_overall_accuracy"], 4), "name": "Pixel accuracy"},
    ]
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "image-segmentation",
        "license": "apache-2.0",
        "tags": ["sgmae", "mae", "upernet", "semantic-segmentation", "vision"],
        "datasets": [data_name],
        "model-index": [
            {"name": name, "results": [{"task": {"type": "image-segmentation", "name": "Semantic Segmentation"},
                                        "dataset": dataset, "metrics": metrics}]}
        ],
    }  # fmt: skip
    base = model_args.model_name_or_path
    if base and not Path(base).exists():
        metadata["base_model"] = base
    per_class = "\n".join(
        f"| {label} | {'n/a' if iou is None else f'{iou:.4f}'} |"
        for label, iou in results["eval_per_category_iou"].items()
    )
    body = f"""
transformers' UperNet on an SG-MAE (Self-Guided Masked Autoencoder, Shin et al., NeurIPS 2024) encoder, fine-tuned
with `run_segmentation.py`. Use it with `trust_remote_code=True`:

```python
from transformers import pipeline
segmenter = pipeline("image-segmentation", model="{name}", trust_remote_code=True)
masks = segmenter("photo.jpg")  # one {{"label", "mask"}} per class present
```

The pipeline resizes an image to {data_args.crop_size}x{data_args.crop_size}; the scores below come from
{data_args.eval_mode} evaluation (short side {data_args.crop_size}, scored at the original resolution).

## Results on {data_name} ({data_args.validation_split}, {results["eval_samples"]} images)
| mIoU | mean accuracy | pixel accuracy |
|---|---|---|
| {results["eval_mean_iou"]:.4f} | {results["eval_mean_accuracy"]:.4f} | {results["eval_overall_accuracy"]:.4f} |

## Training
| | |
|---|---|
| encoder | {base or "random init (" + str(model_args.config_name) + ")"} |
| architecture | {backbone.num_hidden_layers} x {backbone.hidden_size}, patch {backbone.patch_size} |
| crops | {backbone.image_size} x {backbone.image_size}, {data_args.eval_mode} evaluation |
| pyramid | blocks {backbone.out_indices}, strides p/4, p/2, p, 2p; UperNet width {model.config.hidden_size} |
| optimiser steps | {results.get("step", 0)} of {results.get("total_steps", 0)} |
| lr / weight decay | {args.learning_rate} / {args.weight_decay} (AdamW) |
| layer decay / drop path | {args.layer_decay} / {backbone.drop_path_rate} |
| schedule | {args.warmup_steps} warm-up steps, poly power {args.poly_power} |

## IoU per class
| class | IoU |
|---|---|
{per_class}
"""
    return model_card(metadata, f"SG-MAE UperNet: {Path(args.output_dir).name}", body)


if __name__ == "__main__":
    main()
