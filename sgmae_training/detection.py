"""Object detection and instance segmentation on an SG-MAE encoder: Conditional DETR with its mask head fine-tuned
end to end by the shared loop, and COCO's box and mask AP (torchmetrics' MeanAveragePrecision on pycocotools) over
the evaluation split. `run_detection.py` prepares a `DetectionTask` and calls `finetune`."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.detection import MeanAveragePrecision
from transformers.image_transforms import center_to_corners_format

from modeling_sgmae.detection_sgmae import SGMAEForObjectDetection

from .arguments import RunArguments
from .data.detection import DetectionCollator, DetectionDataArguments, decode_masks, encode_masks, labels_on_device
from .data.loaders import shard_for_process, worker_epoch_batches
from .data.loading import training_length
from .engine import LoopSettings, resume_state, train
from .optim import cosine_scheduler, layer_decay_groups
from .protocol import EvaluatingHooks, finish_training
from .training_state import TrainingState

logger = logging.getLogger(__name__)

ENCODER = "conditional_detr.model.backbone.model.vit"  # where the SG-MAE encoder sits (for layer-wise lr decay)
TOP_K = 100  # detections kept per image, COCO's maxDets (and the image processor's post-processing)
# torchmetrics' names -> eval_results.json's, for boxes ("bbox") and masks ("segm")
AP_NAMES = {"map": "ap", "map_50": "ap50", "map_75": "ap75", "map_small": "ap_small", "map_medium": "ap_medium",
            "map_large": "ap_large"}  # fmt: skip


@dataclass
class DetectionArguments(RunArguments):
    """Optimisation, schedule, evaluation and output (defaults: see docs/detection.md)."""

    output_dir: str = field(default="outputs/sgmae-detection", metadata={"help": "Where results go."})
    seed: int = field(default=0, metadata={"help": "Seed for the heads, data order and augmentation."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Images per device and step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Total optimiser steps (overrides epochs)."})
    num_train_epochs: float = field(default=50.0, metadata={"help": "Epochs (Conditional DETR's schedule: 50)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak AdamW lr of the heads (DETR, ViTDet: 1e-4)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (DETR: 1e-4)."})
    layer_decay: float = field(default=0.7, metadata={"help": "Encoder lr x layer_decay^(depth from top) (0.7)."})
    warmup_ratio: float = field(default=0.01, metadata={"help": "Share of the steps warming up before the cosine."})
    max_grad_norm: float | None = field(default=0.1, metadata={"help": "Clip gradients to this norm (DETR: 0.1)."})
    eval_every_epochs: int = field(default=1, metadata={"help": "Evaluate every N epochs (0: only at the end)."})
    logging_steps: int = field(default=50, metadata={"help": "Log loss and lr every N steps."})


@dataclass
class DetectionTask:
    """What the loop and the evaluation need."""

    accelerator: Accelerator
    data_args: DetectionDataArguments
    args: DetectionArguments
    model: SGMAEForObjectDetection
    eval_data: datasets.Dataset
    eval_collate: DetectionCollator
    results: dict[str, Any] = field(default_factory=dict)  # the last evaluation's eval_results.json entries


# ----- evaluation ----------------------------------------------------------------------------------------------------
def image_detections(outputs, image: int, height: int, width: int) -> dict[str, Any]:
    """The TOP_K best (query, class) pairs of one image, as Conditional DETR's image processor ranks them (sigmoid
    scores over all pairs): boxes xyxy in the original image's pixels, scores, labels and the query's mask (its
    logits upsampled to the image, above 0) as RLE."""
    scores = outputs.logits[image].float().sigmoid()  # [Q, C]
    top_scores, top = scores.flatten().topk(min(TOP_K, scores.numel()))
    queries, labels = top // scores.shape[1], top % scores.shape[1]
    scale = torch.tensor([width, height, width, height], device=scores.device)
    boxes = center_to_corners_format(outputs.pred_boxes[image, queries].float()) * scale
    masks = nn.functional.interpolate(
        outputs.pred_masks[image, queries][None].float(), size=(height, width), mode="bilinear", align_corners=False
    )[0]
    return {
        "boxes": boxes.cpu(),
        "scores": top_scores.cpu(),
        "labels": labels.cpu(),
        "masks": encode_masks(masks.cpu() > 0),
    }


def encoded_target(target: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {**{key: target[key] for key in ("boxes", "labels", "iscrowd")}, "masks": encode_masks(target["masks"])}


def coco_scores(records: list[tuple[int, tuple[int, int], dict, dict]]) -> dict[str, float | None]:
    """COCO box and mask AP, AP50, AP75 and AP by size over every image (each once, in row order); None where the
    split has no object of that size."""
    # the records are already gathered: torchmetrics' own sync would wait for processes that do not compute
    metric = MeanAveragePrecision(iou_type=("bbox", "segm"), backend="pycocotools", sync_on_compute=False)
    for _, (height, width), detections, target in sorted(records, key=lambda record: record[0]):
        metric.update(
            [{**detections, "masks": decode_masks(detections["masks"], height, width)}],
            [{**target, "masks": decode_masks(target["masks"], height, width)}],
        )
    scores = metric.compute()
    results = {}
    for kind, prefix in (("bbox", "eval_box_"), ("segm", "eval_mask_")):
        for name, ours in AP_NAMES.items():
            value = float(scores[f"{kind}_{name}"])
            results[prefix + ours] = None if value < 0 else value  # -1: no object of that size
    return results


def evaluate_model(task: DetectionTask) -> dict[str, Any]:
    """Box and mask AP over the evaluation split: each process predicts its shard at size x size, the detections
    (masks as RLE, at the original resolution) are gathered, and the metric counts every image once."""
    accelerator, data_args, model = task.accelerator, task.data_args, task.model
    shard = shard_for_process(task.eval_data, accelerator, seed=0, epoch=0, shuffle=False, buffer_size=0)
    loader = DataLoader(shard, batch_size=data_args.per_device_eval_batch_size, collate_fn=task.eval_collate,
                        num_workers=data_args.dataloader_num_workers)  # fmt: skip
    records, skipped = [], 0
    was_training = model.training
    model.eval()
    for batch in loader:
        skipped += batch["skipped"]
        if not len(batch["pixel_values"]):
            continue
        with torch.no_grad(), accelerator.autocast():
            outputs = model(pixel_values=batch["pixel_values"].to(accelerator.device))
        for image, (index, size, target) in enumerate(
            zip(batch["index"], batch["sizes"], batch["targets"], strict=True)
        ):
            records.append((index, size, image_detections(outputs, image, *size), encoded_target(target)))
    model.train(was_training)
    records = gather_object(records)
    skipped = int(accelerator.reduce(torch.tensor(skipped, device=accelerator.device), "sum"))
    results: dict[str, Any] = {"eval_samples": len(records), "eval_skipped_images": skipped}
    return results | coco_scores(records) if accelerator.is_main_process else results


# ----- training ------------------------------------------------------------------------------------------------------
class DetectionHooks(EvaluatingHooks):
    """Detection's part of the loop: Conditional DETR's matched losses (classes, boxes, masks) and the evaluation
    every `eval_every_epochs` epochs and at the end."""

    def __init__(self, task: DetectionTask, total_steps: int):
        self.task, self.total_steps = task, total_steps
        self.results: dict[str, Any] = {}

    def loss(self, model, batch: dict[str, Any]):
        labels = labels_on_device(batch["labels"], self.task.accelerator.device)
        outputs = model(pixel_values=batch["pixel_values"], labels=labels)
        return outputs.loss, None

    def evaluate(self, step: int) -> None:
        self.results = evaluate_model(self.task)
        self.evaluated_at = step
        scores = {key: value for key, value in self.results.items() if value is not None}
        self.task.accelerator.log(scores, step=step)

    def after_epoch(self, state: TrainingState) -> None:
        every = self.task.args.eval_every_epochs
        if (every and state.epoch % every == 0) or state.step >= self.total_steps:
            self.evaluate(state.step)
            if self.task.accelerator.is_main_process:
                logger.info("epoch %d: box AP %s, mask AP %s", state.epoch, ap_text(self.results["eval_box_ap"]),
                            ap_text(self.results["eval_mask_ap"]))  # fmt: skip


def ap_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def finetune(task: DetectionTask, train_data, collate: DetectionCollator) -> TrainingState:
    """The training loop: AdamW with layer-wise lr decay on the encoder, warm-up then cosine, checkpoints, resume."""
    accelerator, data_args, args = task.accelerator, task.data_args, task.args
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    steps_per_epoch, total_steps = training_length(
        train_data, data_args, global_batch, args.num_train_epochs, args.max_train_steps
    )
    optimizer = torch.optim.AdamW(
        layer_decay_groups(task.model, args.learning_rate, args.weight_decay, args.layer_decay, encoder=ENCODER)
    )
    prepared_model, optimizer = accelerator.prepare(task.model, optimizer)
    task.model = accelerator.unwrap_model(prepared_model)
    state = resume_state(accelerator, optimizer, args.output_dir, args.resume_from_checkpoint, {}, total_steps)
    scheduler = cosine_scheduler(optimizer, args.warmup_ratio, total_steps, state.step)
    if accelerator.is_main_process:
        accelerator.init_trackers("sgmae_detection", config={k: str(v) for k, v in asdict(args).items()})
    logger.info(
        "fine-tuning %d steps (%d epochs of %d steps), global batch %d, lr %.2e, layer decay %s, %d queries, "
        "images %d", total_steps, math.ceil(total_steps / steps_per_epoch), steps_per_epoch, global_batch,
        args.learning_rate, args.layer_decay, task.model.config.num_queries, data_args.image_size,
    )  # fmt: skip
    epoch_batches = partial(worker_epoch_batches, train_data, accelerator=accelerator, data_args=data_args,
                            batch_size=args.per_device_train_batch_size, collate=collate, seed=args.seed)  # fmt: skip
    hooks = DetectionHooks(task, total_steps)
    settings = LoopSettings(
        args.output_dir, args.logging_steps, args.checkpointing_steps, args.save_total_limit, args.max_grad_norm,
        task.model.config,
    )  # fmt: skip
    state = train(accelerator, prepared_model, optimizer, scheduler, epoch_batches, state, settings, hooks, {})
    finish_training(state, hooks)
    task.results = hooks.results
    return state
