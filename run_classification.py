#!/usr/bin/env python
"""Evaluate an SG-MAE (or transformers ViTMAE) encoder on image classification: fine-tuning, linear probing or kNN.

    accelerate launch -q --config_file configuration/accelerate/default.yaml run_classification.py \
        --protocol finetune --dataset_name uoft-cs/cifar10 \
        --model_name_or_path outputs/sgmae-cifar --output_dir outputs/sgmae-cifar-finetuned
    accelerate launch run_classification.py --protocol linear_probe ...   # frozen encoder, BN + linear head
    accelerate launch run_classification.py --protocol knn ...            # frozen encoder, weighted cosine kNN
    accelerate launch run_classification.py --protocol frozen ...         # kNN + probe, [CLS] + mean, one pass

`finetune` and `linear_probe` save a Hub-ready SGMAEForImageClassification folder (pipeline("image-classification",
trust_remote_code=True) works on it); every protocol writes eval_results.json (top-1/top-5 over the whole
validation split, each sample counted once). Arguments can also come from one JSON/YAML file:
`python run_classification.py args.yaml`.
"""

from __future__ import annotations

import logging
import math
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from torch import nn
from transformers import HfArgumentParser, ViTImageProcessor

from modeling_sgmae import SGMAEConfig, SGMAEForImageClassification
from sgmae_training import data
from sgmae_training.arguments import (
    RunArguments,
    check_positive,
    dataset_reachable,
    parse_script_args,
)
from sgmae_training.engine import (
    LoopSettings,
    TrainingHooks,
    resume_state,
    start_run,
    train,
)
from sgmae_training.evaluation import Evaluation, EvaluationResult, gather_samples, knn_scores, local_pass
from sgmae_training.hub import (
    check_checkpoint_kind,
    classification_card,
    push_to_hub,
    save_hub_folder,
    write_json_atomically,
)
from sgmae_training.optim import cosine_scheduler, layer_decay_groups
from sgmae_training.training_state import TrainingState

logger = logging.getLogger("run_classification")
PROTOCOLS = ("finetune", "linear_probe", "knn", "frozen")
POOLINGS = typing.get_args(SGMAEConfig.__annotations__["classifier_pooling"])  # the config's Literal choices
POSITIVE_ARGUMENTS = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_train_steps", "logging_steps",
)  # fmt: skip
# MAE's recipes (FINETUNE.md / LINPROBE.md) where a protocol changes the default.
DEFAULTS = {
    "finetune": {"base_learning_rate": 5e-4, "weight_decay": 0.05, "warmup_ratio": 0.05, "num_train_epochs": 100},
    "linear_probe": {"base_learning_rate": 0.1, "weight_decay": 0.0, "warmup_ratio": 0.1, "num_train_epochs": 90},
    "knn": {},
}
DEFAULTS["frozen"] = DEFAULTS["linear_probe"]
# Training-state fields left out of eval_results.json, so a resumed run's file equals an uninterrupted run's.
UNREPRODUCIBLE = ("samples_in_epoch", "train_seconds")


@dataclass
class ModelArguments:
    """Which encoder to evaluate, and its head."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "SG-MAE pre-training or classification checkpoint, or a transformers ViTMAE checkpoint."},
    )
    config_name: str | None = field(
        default=None, metadata={"help": "SGMAEConfig JSON for a randomly initialised encoder (from-scratch baseline)."}
    )
    classifier_pooling: str | None = field(
        default=None, metadata={"help": "finetune: 'mean' (patch mean + LayerNorm, MAE) or 'cls' (default: config)."}
    )
    probe_pooling: str = field(
        default="cls",
        metadata={"help": "linear_probe/knn feature: 'cls' (MAE, DINO) or 'mean' of the patch tokens (frozen: both)."},
    )
    drop_path: float = field(default=0.1, metadata={"help": "finetune: stochastic-depth rate (MAE: 0.1)."})


@dataclass
class ClassificationDataArguments(data.DataArguments):
    """DataArguments plus the label column."""

    label_column: str | None = field(
        default=None, metadata={"help": f"Label column; auto-detected among {data.LABEL_COLUMNS} when unset."}
    )
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Images per device when evaluating."})


@dataclass
class ClassificationArguments(RunArguments):
    """Protocol, optimisation, schedule, logging and output."""

    protocol: str = field(default="finetune", metadata={"help": f"One of {PROTOCOLS}."})
    output_dir: str = field(default="outputs/sgmae-classification", metadata={"help": "Where results go."})
    seed: int = field(default=0, metadata={"help": "Seed for the head, data order, augmentation and mixing."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Images (or features) per device/step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "finetune: micro-batches per step."})
    num_train_epochs: float | None = field(default=None, metadata={"help": "Epochs (finetune 100, probe 90)."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Total optimiser steps (overrides epochs)."})
    base_learning_rate: float | None = field(
        default=None, metadata={"help": "lr = base_lr x global batch / 256 (finetune 5e-4, linear_probe 0.1)."}
    )
    weight_decay: float | None = field(default=None, metadata={"help": "finetune 0.05 (AdamW), linear_probe 0."})
    layer_decay: float = field(default=0.65, metadata={"help": "finetune: lr x layer_decay^(depth from the top)."})
    adam_beta2: float = field(default=0.999, metadata={"help": "finetune: AdamW beta2 (beta1 is 0.9)."})
    warmup_ratio: float | None = field(default=None, metadata={"help": "Share of steps in warm-up (0.05 / 0.1)."})
    label_smoothing: float = field(default=0.1, metadata={"help": "finetune: label smoothing."})
    mixup: float = field(default=0.8, metadata={"help": "finetune: MixUp alpha (0 = off)."})
    cutmix: float = field(default=1.0, metadata={"help": "finetune: CutMix alpha (0 = off); one of both per batch."})
    rand_augment_ops: int = field(default=2, metadata={"help": "finetune: RandAugment ops per image (0 = off)."})
    rand_augment_magnitude: int = field(default=9, metadata={"help": "finetune: RandAugment magnitude (of 30)."})
    random_erasing: float = field(default=0.25, metadata={"help": "finetune: RandomErasing probability."})
    crop_scale_min: float = field(default=0.08, metadata={"help": "finetune: RandomResizedCrop minimum scale."})
    knn_k: int = field(default=20, metadata={"help": "knn: neighbours (DINO: 20)."})
    knn_temperature: float = field(default=0.07, metadata={"help": "knn: vote weight exp(cosine / T) (DINO: 0.07)."})
    eval_every_epoch: bool = field(default=True, metadata={"help": "Evaluate after every epoch (always at the end)."})
    save_predictions: bool = field(
        default=False, metadata={"help": "Also write eval_predictions.json (index, label, prediction per sample)."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log loss and lr every N steps."})


def parse_args() -> tuple[ModelArguments, ClassificationDataArguments, ClassificationArguments]:
    parsed = parse_script_args(
        HfArgumentParser((ModelArguments, ClassificationDataArguments, ClassificationArguments))
    )
    validate_args(*parsed)
    return parsed


def validate_args(model_args: ModelArguments, data_args: ClassificationDataArguments, args: ClassificationArguments):
    """Clear errors for bad choices, and the protocol's MAE defaults for what was left unset."""
    if args.protocol not in PROTOCOLS:
        raise SystemExit(f"error: unknown --protocol {args.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if model_args.probe_pooling not in POOLINGS:
        raise SystemExit(f"error: --probe_pooling must be one of {POOLINGS}, got {model_args.probe_pooling!r}")
    if model_args.classifier_pooling not in (None, *POOLINGS):
        raise SystemExit(
            f"error: --classifier_pooling must be one of {POOLINGS}, got {model_args.classifier_pooling!r}"
        )
    if not (model_args.model_name_or_path or model_args.config_name):
        raise SystemExit("error: give --model_name_or_path (a checkpoint) or --config_name (a from-scratch baseline)")
    if args.save_predictions and args.protocol == "frozen":
        raise SystemExit("error: --save_predictions is not available with --protocol frozen (it scores four ways)")
    if data_args.streaming and args.protocol != "finetune":
        raise SystemExit("error: --streaming is only supported with --protocol finetune")
    if args.knn_k < 1 or args.knn_temperature <= 0:
        raise SystemExit("error: --knn_k must be positive and --knn_temperature greater than 0")
    args.check()
    check_positive(args, POSITIVE_ARGUMENTS)
    data.check_data_arguments(data_args, (*data.POSITIVE_ARGUMENTS, "per_device_eval_batch_size"))
    for name, value in DEFAULTS[args.protocol].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


# ----- model ---------------------------------------------------------------------------------------------------------
def build_model(
    model_args: ModelArguments, args: ClassificationArguments, names: list[str], data_args: data.DataArguments
) -> SGMAEForImageClassification:
    """A classifier for `names`: pooling and drop-path from the protocol, encoder from a checkpoint or a config
    (--num_channels sets a config's channels; a checkpoint's must agree)."""
    cache_dir = data_args.cache_dir
    overrides = {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}
    if args.protocol == "finetune":
        overrides["drop_path_rate"] = model_args.drop_path
        if model_args.classifier_pooling:
            overrides["classifier_pooling"] = model_args.classifier_pooling
    else:  # frozen encoder: the head reads the probe's feature, nothing is dropped
        overrides["drop_path_rate"] = 0.0
        overrides["classifier_pooling"] = "mean" if args.protocol == "frozen" else model_args.probe_pooling
    if model_args.model_name_or_path:
        path = model_args.model_name_or_path
        model_type = check_checkpoint_kind(path, cache_dir)
        if model_type == "sgmae":  # a classification checkpoint of other classes gets a new head
            overrides["ignore_mismatched_sizes"] = True
        try:
            model = SGMAEForImageClassification.from_pretrained(path, cache_dir=cache_dir, **overrides)
        except (OSError, ValueError, TypeError, SafetensorError, StrictDataclassError) as error:
            reason = " ".join(str(error).split())  # one line (strict config errors span two)
            raise SystemExit(f"error: cannot load {path!r} as an SG-MAE classifier: {reason}") from error
        data.check_num_channels(data_args.num_channels, model.config, path)
        model.train()
        return model
    if data_args.num_channels:
        overrides["num_channels"] = data_args.num_channels
    try:
        config = SGMAEConfig.from_json_file(model_args.config_name)
        config.update(overrides)
        config.validate()  # the rules between fields, before any data is read
    except (OSError, ValueError, StrictDataclassError) as error:
        reason = " ".join(str(error).split())  # one line (strict config errors span two)
        raise SystemExit(f"error: cannot read --config_name {model_args.config_name!r}: {reason}") from error
    return SGMAEForImageClassification(config)


def frozen_features(model: SGMAEForImageClassification, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the classifier head reads: the pooled feature after `fc_norm`, [B, D].

    For [CLS] pooling `fc_norm` is an identity. For mean pooling it is a LayerNorm, frozen like the encoder; loaded
    from a pre-training checkpoint it has its initial weight 1 / bias 0, as in MAE's global-pool linear probe. Either
    way the probe trains on exactly what the saved classifier computes before its Linear.
    """
    return model.fc_norm(model.vit(pixel_values).pooler_output)


@torch.no_grad()
def fold_probe(model: SGMAEForImageClassification, norm: nn.BatchNorm1d, linear: nn.Linear) -> None:
    """Write BatchNorm1d(affine=False) (eval mode: running statistics) followed by a Linear into `model.classifier`.

    BN(x) = (x - mu) / s with s = sqrt(var + eps), so W BN(x) + b = (W / s) x + (b - W mu / s). The probe was trained
    on `frozen_features`, which the model computes before its classifier, so the folded model predicts exactly
    what the probe does.
    """
    scale = (norm.running_var + norm.eps).rsqrt()
    weight = linear.weight * scale[None, :]
    bias = linear.bias - weight @ norm.running_mean
    classifier = nn.Linear(linear.in_features, linear.out_features)
    classifier.weight.copy_(weight)
    classifier.bias.copy_(bias)
    model.classifier = classifier.to(model.vit.layernorm.weight.device)


@dataclass
class ProtocolResult:
    """What a protocol hands back to main()."""

    metrics: dict[str, Any]  # its entries of eval_results.json
    gathered: dict[str, torch.Tensor]  # per validation sample: "index", "labels", scores "values" (frozen: none)
    state: TrainingState | None = None  # the training loop's final state (None: nothing was trained)
    model: SGMAEForImageClassification | None = None  # the classifier to save (None: no model is saved)


@dataclass
class Task:
    """What main() prepared for a protocol."""

    accelerator: Accelerator
    data_args: ClassificationDataArguments
    args: ClassificationArguments
    processor: ViTImageProcessor
    train_data: datasets.Dataset | datasets.IterableDataset
    evaluation: Evaluation
    image_column: str
    label_column: str
    num_classes: int


# ----- main ----------------------------------------------------------------------------------------------------------
def load_data(data_args: ClassificationDataArguments) -> tuple[datasets.Dataset, datasets.Dataset, str, str, list]:
    """Training and evaluation splits (undecoded images, evaluation rows numbered), their columns, class names."""
    train_data = data.load_split(data_args, data_args.train_split, data_args.streaming)
    eval_split = data.evaluation_split(data_args, data_args.validation_split)
    if eval_split is None:
        raise SystemExit("error: the dataset has no split to evaluate on; name one with --validation_split")
    eval_data = data.load_split(data_args, eval_split, False)
    image_column = data.find_image_column(train_data.features, data_args.image_column)
    label_column = data.find_column(train_data.features, data_args.label_column, data.LABEL_COLUMNS, "label")
    for column in (image_column, label_column):
        data.find_column(eval_data.features, column, (), f"{eval_split} split's")
    names = data.class_names(train_data.features, label_column, train_data)
    train_data = data.limit_samples(train_data, data_args.max_train_samples)
    eval_data = data.limit_samples(eval_data, data_args.max_eval_samples)
    if not len(eval_data):
        raise SystemExit(f"error: the {eval_split!r} split is empty")
    train_data = data.prepare_images(train_data, image_column)
    eval_data = data.with_index(data.prepare_images(eval_data, image_column))
    return train_data, eval_data, image_column, label_column, names


def main() -> None:
    model_args, data_args, args = parse_args()
    accumulation = args.gradient_accumulation_steps if args.protocol == "finetune" else 1
    accelerator = start_run(
        args.output_dir, args.seed, accumulation, args.mixed_precision, args.report_to, args.ddp_timeout
    )
    with dataset_reachable(data_args.dataset_name):
        train_data, eval_data, image_column, label_column, names = load_data(data_args)

    model = build_model(model_args, args, names, data_args)
    channels = model.config.num_channels
    checkpoint = model_args.model_name_or_path
    statistics = data.image_statistics(data_args, model.config, train_data, image_column, checkpoint)
    processor = data.image_processor_for(model.config, statistics)
    evaluation = Evaluation(
        accelerator,
        eval_data,
        data.ImageCollator(data.eval_transform(processor), image_column, label_column, data.INDEX_COLUMN, channels),
        data_args.per_device_eval_batch_size,
        data_args.dataloader_num_workers,
    )
    logger.info(
        "%s on %d classes (%s...), %d processes, %s pooling", args.protocol, len(names), ", ".join(names[:3]),
        accelerator.num_processes, model.config.classifier_pooling,
    )  # fmt: skip
    task = Task(
        accelerator, data_args, args, processor, train_data, evaluation, image_column, label_column, len(names)
    )
    protocol = {"finetune": finetune, "linear_probe": linear_probe, "knn": knn, "frozen": frozen}[args.protocol]
    result = protocol(task, model)

    # ----- output -----
    state = result.state.state_dict() if result.state is not None else {}
    results = {
        "protocol": args.protocol,
        "num_processes": accelerator.num_processes,
        "model_name_or_path": model_args.model_name_or_path or model_args.config_name,
        "pooling": pooling_of(args.protocol, model_args, result.model),
        **result.metrics,
        **{key: value for key, value in state.items() if key not in UNREPRODUCIBLE},
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output = Path(args.output_dir)
        if args.save_predictions:
            write_json_atomically(output / "eval_predictions.json", predictions_record(result.gathered))
        write_json_atomically(output / "eval_results.json", results)
        logger.info("results: %s", result.metrics)
        if result.model is not None:
            card = classification_card(model_args, data_args, args, result.model, results)
            save_hub_folder(result.model, processor, output, card)
            logger.info("saved the classifier to %s", output)
            if args.push_to_hub:
                push_to_hub(args.output_dir, args.hub_model_id, args.hub_token)
    accelerator.end_training()


def pooling_of(protocol: str, model_args: ModelArguments, model: SGMAEForImageClassification | None) -> str:
    if protocol == "frozen":
        return "cls,mean"
    return model_args.probe_pooling if model is None else model.config.classifier_pooling


def predictions_record(gathered: dict[str, torch.Tensor]) -> dict[str, list]:
    """Per validation sample (by index): reference label and top-1 prediction."""
    return {
        "index": gathered["index"].tolist(),
        "label": gathered["labels"].tolist(),
        "prediction": gathered["values"].argmax(dim=1).tolist(),
    }


class FinetuneHooks(TrainingHooks):
    """Fine-tuning's part of the loop: label-smoothed cross-entropy and the evaluation after epochs."""

    def __init__(self, task: Task, model: SGMAEForImageClassification, total_steps: int):
        self.task, self.model, self.total_steps = task, model, total_steps
        self.result: EvaluationResult | None = None
        self.evaluated_at = -1

    def loss(self, model, batch: dict[str, torch.Tensor]):
        logits = model(batch["pixel_values"]).logits
        loss = nn.functional.cross_entropy(
            logits.float(), batch["labels"], label_smoothing=self.task.args.label_smoothing
        )
        return loss, None

    def evaluate(self, step: int) -> None:
        self.model.eval()
        self.result = self.task.evaluation.run(lambda pixels: self.model(pixels).logits, self.task.num_classes)
        self.model.train()
        self.task.accelerator.log(self.result.accuracies(), step=step)
        self.evaluated_at = step

    def after_epoch(self, state: TrainingState) -> None:
        if self.task.args.eval_every_epoch or state.step >= self.total_steps:
            self.evaluate(state.step)
            top1 = self.result.top1
            logger.info("epoch %d: top-1 %s", state.epoch, "n/a" if top1 is None else f"{top1:.4f}")


def finetune(task: Task, model: SGMAEForImageClassification) -> ProtocolResult:
    """End-to-end fine-tuning (MAE recipe): layer-wise lr decay, drop-path, MixUp/CutMix, label smoothing."""
    accelerator, data_args, args, train_data = task.accelerator, task.data_args, task.args, task.train_data
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    steps_per_epoch, total_steps = data.training_length(
        train_data, data_args, global_batch, args.num_train_epochs, args.max_train_steps
    )
    learning_rate = args.base_learning_rate * global_batch / 256
    optimizer = torch.optim.AdamW(
        layer_decay_groups(model, learning_rate, args.weight_decay, args.layer_decay), betas=(0.9, args.adam_beta2)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped: SGMAEForImageClassification = accelerator.unwrap_model(model)
    state = resume_state(accelerator, optimizer, args.output_dir, args.resume_from_checkpoint, {}, total_steps)
    scheduler = cosine_scheduler(optimizer, args.warmup_ratio, total_steps, state.step)
    if accelerator.is_main_process:
        accelerator.init_trackers("sgmae_classification", config={k: str(v) for k, v in asdict(args).items()})
    channels = unwrapped.config.num_channels
    if args.rand_augment_ops and channels not in (1, 3):
        raise SystemExit(f"error: RandAugment takes 1- or 3-channel images, not {channels}; pass --rand_augment_ops 0")
    transform = data.finetune_transform(
        task.processor, args.crop_scale_min, args.rand_augment_ops, args.rand_augment_magnitude, args.random_erasing
    )
    collate = data.MixingCollator(
        data.ImageCollator(transform, task.image_column, task.label_column, num_channels=channels),
        task.num_classes, args.mixup, args.cutmix,
    )  # fmt: skip
    logger.info(
        "fine-tuning %d steps (%d epochs of %d steps), global batch %d, lr %.2e, layer decay %s, drop path %s",
        total_steps, math.ceil(total_steps / steps_per_epoch), steps_per_epoch, global_batch, learning_rate,
        args.layer_decay, unwrapped.config.drop_path_rate,
    )  # fmt: skip

    epoch_batches = partial(data.worker_epoch_batches, train_data, accelerator=accelerator, data_args=data_args,
                            batch_size=args.per_device_train_batch_size, collate=collate, seed=args.seed)  # fmt: skip

    hooks = FinetuneHooks(task, unwrapped, total_steps)
    settings = LoopSettings(
        args.output_dir, args.logging_steps, args.checkpointing_steps, args.save_total_limit, args.max_grad_norm,
        unwrapped.config,
    )  # fmt: skip
    state = train(accelerator, model, optimizer, scheduler, epoch_batches, state, settings, hooks, {})
    if state.skipped_images:
        logger.warning("skipped %d corrupt training images", state.skipped_images)
    if hooks.evaluated_at != state.step:
        hooks.evaluate(state.step)
    unwrapped.eval()
    return ProtocolResult(hooks.result.metrics(), hooks.result.gathered, state, unwrapped)


def train_features(
    task: Task, model: SGMAEForImageClassification, compute: Callable, width: int
) -> dict[str, torch.Tensor]:
    """Frozen features `compute(pixels)` -> [B, width] ("values") and labels of the whole training split (no
    augmentation), each process extracting its shard, gathered onto every process. The model is frozen here."""
    accelerator, data_args = task.accelerator, task.data_args
    model.to(accelerator.device).eval().requires_grad_(False)
    started = time.perf_counter()
    local, skipped = local_pass(
        accelerator,
        data.shard_for_process(task.train_data, accelerator, seed=0, epoch=0, shuffle=False, buffer_size=0),
        data.ImageCollator(
            data.eval_transform(task.processor),
            task.image_column,
            task.label_column,
            num_channels=model.config.num_channels,
        ),
        data_args.per_device_eval_batch_size,
        data_args.dataloader_num_workers,
        compute,
        width,
    )
    skipped = int(accelerator.reduce(torch.tensor(skipped, device=accelerator.device), "sum"))
    if skipped:
        logger.warning("skipped %d corrupt training images", skipped)
    features = gather_samples(accelerator, local, index_key=None)
    if not len(features["values"]):
        raise SystemExit("error: the training split yielded no images")
    logger.info(
        "extracted %d training features of width %d in %.1fs", len(features["values"]),
        features["values"].shape[1], time.perf_counter() - started,
    )  # fmt: skip
    return features


class ProbeHooks(TrainingHooks):
    """The linear probe's part of the loop: cross-entropy on cached features, evaluation after epochs."""

    def __init__(self, task: Task, probe: nn.Sequential, eval_local: dict[str, torch.Tensor]):
        self.task, self.probe, self.eval_local = task, probe, eval_local

    def loss(self, model, batch: dict[str, torch.Tensor]):
        return nn.functional.cross_entropy(model(batch["features"]), batch["labels"]), None

    def scores(self, values: torch.Tensor) -> torch.Tensor:
        self.probe.eval()
        with torch.no_grad():
            scores = self.probe(values.float())
        self.probe.train()
        return scores

    def after_epoch(self, state: TrainingState) -> None:
        if self.task.args.eval_every_epoch:
            scores = self.scores(self.eval_local["values"])
            result = self.task.evaluation.finish({**self.eval_local, "values": scores}, 0)
            self.task.accelerator.log(result.accuracies(), step=state.step)


def train_probe(
    task: Task,
    cached: dict[str, torch.Tensor],
    eval_local: dict[str, torch.Tensor],
    eval_skipped: int,
    output_dir: str,
) -> tuple[nn.Sequential, EvaluationResult, TrainingState]:
    """MAE's linear probe, BatchNorm1d(affine=False) + Linear, trained by the shared loop on cached features.

    The head trains with SGD + momentum 0.9 (instead of MAE's LARS) and a cosine schedule, on every process over all
    features with the global batch; rank 0's head is then broadcast. Checkpoints (and resume) in `output_dir`.
    Returns the head, its scoring of the validation split, and the loop's state.
    """
    accelerator, args = task.accelerator, task.args
    features, labels = cached["values"], cached["labels"]
    width = features.shape[1]
    probe = nn.Sequential(nn.BatchNorm1d(width, affine=False, eps=1e-6), nn.Linear(width, task.num_classes))
    torch.manual_seed(args.seed)
    nn.init.trunc_normal_(probe[1].weight, std=0.01)  # MAE's probe head init
    nn.init.zeros_(probe[1].bias)
    probe[0].running_mean.copy_(features.mean(dim=0))  # exact statistics from the start (short runs)
    probe[0].running_var.copy_(features.var(dim=0) if len(features) > 1 else torch.ones(width))
    probe.to(accelerator.device)

    batch_size = min(args.per_device_train_batch_size * accelerator.num_processes, len(features))
    if batch_size < 2:
        raise SystemExit("error: the linear probe needs at least 2 training images per batch")
    steps_per_epoch = max(len(features) // batch_size, 1)
    total_steps = args.max_train_steps or math.ceil(args.num_train_epochs * steps_per_epoch)
    learning_rate = args.base_learning_rate * batch_size / 256
    optimizer = torch.optim.SGD(probe.parameters(), lr=learning_rate, momentum=0.9, weight_decay=args.weight_decay)
    objects = {"probe": probe, "optimizer": optimizer}
    state = resume_state(accelerator, optimizer, output_dir, args.resume_from_checkpoint, objects, total_steps)
    scheduler = cosine_scheduler(optimizer, args.warmup_ratio, total_steps, state.step)
    logger.info(
        "linear probe: %d steps of batch %d on %d features, lr %.2e (SGD, momentum 0.9)",
        total_steps, batch_size, len(features), learning_rate,
    )  # fmt: skip

    def epoch_batches(state: TrainingState) -> Iterator[dict[str, torch.Tensor]]:
        """Every process trains the same head on all features: a seeded permutation per epoch."""
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(args.seed + state.epoch))
        for batch_index in range(state.samples_in_epoch // batch_size, steps_per_epoch):
            rows = order[batch_index * batch_size : (batch_index + 1) * batch_size].to(accelerator.device)
            yield {"features": features[rows], "labels": labels[rows]}

    hooks = ProbeHooks(task, probe, eval_local)
    settings = LoopSettings(
        output_dir, args.logging_steps, args.checkpointing_steps, args.save_total_limit, args.max_grad_norm,
        count_key="features", sharded=False,
    )  # fmt: skip
    state = train(accelerator, probe, optimizer, scheduler, epoch_batches, state, settings, hooks, objects)

    # every process trained the same head; make it bit-identical (GPU kernels need not be)
    for tensor in [*probe.parameters(), *probe.buffers()]:
        tensor.data.copy_(broadcast(tensor.data.clone(), from_process=0))
    result = task.evaluation.finish({**eval_local, "values": hooks.scores(eval_local["values"])}, eval_skipped)
    return probe, result, state


def linear_probe(task: Task, model: SGMAEForImageClassification) -> ProtocolResult:
    """MAE's linear probe on the frozen encoder (see `train_probe`); features are extracted once (no augmentation)
    and the trained head is folded into the model's classifier (see `fold_probe`)."""
    compute, width = partial(frozen_features, model), model.config.hidden_size
    cached = train_features(task, model, compute, width)
    eval_local, eval_skipped = task.evaluation.local(compute, width)
    probe, probe_result, state = train_probe(task, cached, eval_local, eval_skipped, task.args.output_dir)
    fold_probe(model, probe[0], probe[1])
    model.eval()
    folded = task.evaluation.run(lambda pixels: model(pixels).logits, task.num_classes)
    # the folded classifier must predict what the probe predicted on the cached features
    folded_predictions = folded.gathered["values"].argmax(1)
    agree = (folded_predictions == probe_result.gathered["values"].argmax(1)).float().mean().item()
    metrics = folded.metrics() | {"probe_eval_top1": probe_result.top1, "probe_agreement": agree}
    return ProtocolResult(metrics | {"train_features": len(cached["values"])}, folded.gathered, state, model)


def knn_evaluation(
    task: Task, cached: dict[str, torch.Tensor], eval_local: dict[str, torch.Tensor], eval_skipped: int
) -> EvaluationResult:
    """DINO's weighted cosine kNN of the validation features among the cached training features."""
    args = task.args
    scores = knn_scores(
        cached["values"], cached["labels"], eval_local["values"], task.num_classes, args.knn_k, args.knn_temperature
    )
    return task.evaluation.finish({**eval_local, "values": scores}, eval_skipped)


def knn_settings(args: ClassificationArguments, cached: dict[str, torch.Tensor]) -> dict[str, float | int]:
    """What eval_results.json records beside kNN accuracies: the vote's settings and the bank's size."""
    return {"knn_k": args.knn_k, "knn_temperature": args.knn_temperature, "train_features": len(cached["values"])}


def knn(task: Task, model: SGMAEForImageClassification) -> ProtocolResult:
    """DINO's weighted cosine kNN on frozen, L2-normalised features; nothing is trained and no model is saved."""
    compute, width = partial(frozen_features, model), model.config.hidden_size
    cached = train_features(task, model, compute, width)
    result = knn_evaluation(task, cached, *task.evaluation.local(compute, width))
    return ProtocolResult(result.metrics() | knn_settings(task.args, cached), result.gathered)


def both_poolings(model: SGMAEForImageClassification, pixel_values: torch.Tensor) -> torch.Tensor:
    """[CLS] and mean-pooled features side by side, [B, 2D]: what `frozen_features` gives for each pooling (the
    model is built with mean pooling, so `pooler_output` is the patch mean, `fc_norm` its LayerNorm, and [CLS] the
    last state's first token)."""
    outputs = model.vit(pixel_values)
    return torch.cat([outputs.last_hidden_state[:, 0], model.fc_norm(outputs.pooler_output)], dim=1)


def frozen(task: Task, model: SGMAEForImageClassification) -> ProtocolResult:
    """kNN and the linear probe on [CLS] and on mean-pooled features, from one feature pass over each split (the
    price of one evaluation for four); writes `{pooling}_{knn,linear_probe}_top{1,5}`, saves no model."""
    compute, width = partial(both_poolings, model), model.config.hidden_size
    cached = train_features(task, model, compute, 2 * width)
    eval_local, eval_skipped = task.evaluation.local(compute, 2 * width)
    metrics = {}
    for index, pooling in enumerate(("cls", "mean")):
        columns = slice(index * width, (index + 1) * width)
        pooled_train = {**cached, "values": cached["values"][:, columns]}
        pooled_eval = {**eval_local, "values": eval_local["values"][:, columns]}
        knn_result = knn_evaluation(task, pooled_train, pooled_eval, eval_skipped)
        probe_output = str(Path(task.args.output_dir) / f"probe-{pooling}")
        _, probe_result, state = train_probe(task, pooled_train, pooled_eval, eval_skipped, probe_output)
        metrics |= knn_result.accuracies(f"{pooling}_knn_") | probe_result.accuracies(f"{pooling}_linear_probe_")
    metrics |= knn_result.counts() | knn_settings(task.args, cached)
    return ProtocolResult(metrics, {}, state)  # the state of the last probe trained


if __name__ == "__main__":
    main()
