#!/usr/bin/env python
"""Evaluate an SG-MAE (or transformers ViTMAE) encoder on image classification: fine-tuning, linear probing or kNN.

    accelerate launch run_classification.py --protocol finetune --dataset_name uoft-cs/cifar10 \
        --model_name_or_path outputs/sgmae-cifar --output_dir outputs/sgmae-cifar-finetuned
    accelerate launch run_classification.py --protocol linear_probe ...   # frozen encoder, BN + linear head
    accelerate launch run_classification.py --protocol knn ...            # frozen encoder, weighted cosine kNN

`finetune` and `linear_probe` save a Hub-ready SGMAEForImageClassification folder (pipeline("image-classification",
trust_remote_code=True) works on it); every protocol writes eval_results.json (top-1/top-5 over the whole
validation split, each sample counted once). Arguments can also come from one JSON/YAML file:
`python run_classification.py args.yaml`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import datasets
import evaluate
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast, set_seed
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm.auto import tqdm
from transformers import HfArgumentParser, ViTImageProcessor

import modeling_sgmae
from modeling_sgmae import SGMAEConfig, SGMAEForImageClassification
from modeling_sgmae.configuration_sgmae import CLASSIFIER_POOLINGS as POOLINGS
from modeling_sgmae.script_utils import (
    IMAGE_COLUMNS,
    LABEL_COLUMNS,
    DataArguments,
    ImageCollator,
    check_checkpoint_kind,
    check_finite,
    check_launch,
    cosine_schedule,
    epoch_loader,
    eval_transform,
    find_column,
    image_processor_for,
    limit_samples,
    load_checkpoint,
    load_split,
    model_card,
    parse_script_args,
    prepare_images,
    push_to_hub,
    resolve_resume,
    save_checkpoint,
    save_hub_folder,
    shard_for_process,
    synchronized_batches,
    training_length,
)

logger = get_logger("run_classification")  # logs on the main process only
PROTOCOLS = ("finetune", "linear_probe", "knn")
INDEX_COLUMN = "__sample_index__"
METRIC_PATH = Path(modeling_sgmae.__file__).parent / "metrics" / "accuracy"
# MAE's recipes (FINETUNE.md / LINPROBE.md) where a protocol changes the default.
DEFAULTS = {
    "finetune": {"base_learning_rate": 5e-4, "weight_decay": 0.05, "warmup_ratio": 0.05, "num_train_epochs": 100},
    "linear_probe": {"base_learning_rate": 0.1, "weight_decay": 0.0, "warmup_ratio": 0.1, "num_train_epochs": 90},
    "knn": {},
}


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
        default="cls", metadata={"help": "linear_probe/knn feature: 'cls' (MAE, DINO) or 'mean' of the patch tokens."}
    )
    drop_path: float = field(default=0.1, metadata={"help": "finetune: stochastic-depth rate (MAE: 0.1)."})


@dataclass
class ClassificationDataArguments(DataArguments):
    """DataArguments plus the label column."""

    label_column: str | None = field(
        default=None, metadata={"help": f"Label column; auto-detected among {LABEL_COLUMNS} when unset."}
    )
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Images per device when evaluating."})


@dataclass
class ClassificationArguments:
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
    max_grad_norm: float | None = field(default=None, metadata={"help": "Clip gradients to this norm."})
    label_smoothing: float = field(default=0.1, metadata={"help": "finetune: label smoothing."})
    mixup: float = field(default=0.8, metadata={"help": "finetune: MixUp alpha (0 = off)."})
    cutmix: float = field(default=1.0, metadata={"help": "finetune: CutMix alpha (0 = off); one of both per batch."})
    rand_augment_ops: int = field(default=2, metadata={"help": "finetune: RandAugment ops per image (0 = off)."})
    rand_augment_magnitude: int = field(default=9, metadata={"help": "finetune: RandAugment magnitude (of 30)."})
    random_erasing: float = field(default=0.25, metadata={"help": "finetune: RandomErasing probability."})
    crop_scale_min: float = field(default=0.08, metadata={"help": "finetune: RandomResizedCrop minimum scale."})
    knn_k: int = field(default=20, metadata={"help": "knn: neighbours (DINO: 20)."})
    knn_temperature: float = field(default=0.07, metadata={"help": "knn: vote weight exp(cosine / T) (DINO: 0.07)."})
    mixed_precision: str | None = field(default=None, metadata={"help": "no, bf16 or fp16 (default: launcher's)."})
    eval_every_epoch: bool = field(default=True, metadata={"help": "Evaluate after every epoch (always at the end)."})
    checkpointing_steps: str | None = field(default="epoch", metadata={"help": "N (steps), 'epoch' or 'none'."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "Checkpoint folder or 'latest'."})
    save_predictions: bool = field(
        default=False, metadata={"help": "Also write eval_predictions.json (index, label, prediction per sample)."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log loss and lr every N steps."})
    report_to: str = field(default="none", metadata={"help": "Accelerate trackers: tensorboard, none or all."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the output folder to --hub_model_id."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository for --push_to_hub."})
    hub_token: str | None = field(default=None, metadata={"help": "Token for --push_to_hub."})


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
    if data_args.streaming and args.protocol != "finetune":
        raise SystemExit("error: --streaming is only supported with --protocol finetune")
    if args.knn_k < 1 or args.knn_temperature <= 0:
        raise SystemExit("error: --knn_k must be positive and --knn_temperature greater than 0")
    for name, value in DEFAULTS[args.protocol].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


# ----- data ----------------------------------------------------------------------------------------------------------
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


def finetune_transform(processor: ViTImageProcessor, args: ClassificationArguments) -> v2.Compose:
    """MAE fine-tuning augmentation: RandomResizedCrop, flip, RandAugment, normalisation, RandomErasing."""
    size = (processor.size["height"], processor.size["width"])
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(
            size, scale=(args.crop_scale_min, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
        ),
        v2.RandomHorizontalFlip(),
    ]
    if args.rand_augment_ops:
        steps.append(
            v2.RandAugment(
                args.rand_augment_ops, args.rand_augment_magnitude, interpolation=v2.InterpolationMode.BILINEAR
            )
        )
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(processor.image_mean, processor.image_std)]
    if args.random_erasing:
        steps.append(v2.RandomErasing(args.random_erasing, value=0.0))
    return v2.Compose(steps)


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


def with_index(dataset: datasets.Dataset) -> datasets.Dataset:
    """Number the rows 0..N-1 in a column of their own (the identity of a sample across processes)."""
    return dataset.add_column(INDEX_COLUMN, list(range(len(dataset))))


# ----- model ---------------------------------------------------------------------------------------------------------
def build_model(
    model_args: ModelArguments, args: ClassificationArguments, names: list[str], cache_dir: str | None
) -> SGMAEForImageClassification:
    """A classifier for `names`: pooling and drop-path from the protocol, encoder from a checkpoint or a config."""
    overrides = {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}
    if args.protocol == "finetune":
        overrides["drop_path_rate"] = model_args.drop_path
        if model_args.classifier_pooling:
            overrides["classifier_pooling"] = model_args.classifier_pooling
    else:  # frozen encoder: the head reads the probe's feature, nothing is dropped
        overrides["drop_path_rate"] = 0.0
        overrides["classifier_pooling"] = model_args.probe_pooling
    if model_args.model_name_or_path:
        path = model_args.model_name_or_path
        model_type = check_checkpoint_kind(path, cache_dir)
        if model_type == "sgmae":  # a classification checkpoint of other classes gets a new head
            overrides["ignore_mismatched_sizes"] = True
        try:
            model = SGMAEForImageClassification.from_pretrained(path, cache_dir=cache_dir, **overrides)
        except (OSError, ValueError, TypeError) as error:
            raise SystemExit(f"error: cannot load {path!r} as an SG-MAE classifier: {error}") from error
        model.train()
        return model
    try:
        config = SGMAEConfig.from_json_file(model_args.config_name)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot read --config_name {model_args.config_name!r}: {error}") from error
    for key, value in overrides.items():
        setattr(config, key, value)
    config.validate_fields()
    return SGMAEForImageClassification(config)


def layer_decay_groups(model: SGMAEForImageClassification, base_lr: float, weight_decay: float, decay: float):
    """MAE's layer-wise lr decay: depth 0 = embeddings, i + 1 = block i, L + 1 = final norm and head; the lr of a
    depth-d parameter is base_lr x decay^(L + 1 - d). No weight decay on norms, biases, [CLS] and positions."""
    num_layers = model.config.num_hidden_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        name = name.removeprefix(f"{model.base_model_prefix}.")
        block = re.match(r"layers\.(\d+)\.", name)
        depth = 0 if name.startswith("embeddings.") else int(block.group(1)) + 1 if block else num_layers + 1
        no_decay = parameter.ndim <= 1 or name.endswith(("cls_token", "position_embeddings"))
        scale = decay ** (num_layers + 1 - depth)
        group = groups.setdefault(
            (depth, no_decay),
            {
                "params": [],
                "lr": base_lr * scale,
                "lr_scale": scale,
                "weight_decay": 0.0 if no_decay else weight_decay,
            },
        )
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


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


# ----- cross-process evaluation ------------------------------------------------------------------------------------
def gather_samples(accelerator: Accelerator, local: dict[str, torch.Tensor], index_key: str | None = "index"):
    """Gather per-sample tensors (first dim = sample) of all processes, in process order, on every process.

    Processes may hold different numbers of samples: each pads to the largest count and the padding is dropped.
    With `index_key`, rows are then de-duplicated by that per-sample index (first occurrence kept) and sorted by it,
    so every sample counts once whatever the sharding did.
    """
    count = next(iter(local.values())).shape[0]
    counts = accelerator.gather(torch.tensor([count], device=accelerator.device)).tolist()
    largest = max(counts)
    gathered = {}
    for key, tensor in local.items():
        tensor = tensor.to(accelerator.device)
        padding = tensor.new_zeros((largest - count, *tensor.shape[1:]))
        gathered[key] = accelerator.gather(torch.cat([tensor, padding]).contiguous())
    keep = torch.cat([torch.arange(largest) < n for n in counts]).to(accelerator.device)
    gathered = {key: tensor[keep] for key, tensor in gathered.items()}
    if index_key is None:
        return gathered
    indices = gathered[index_key]
    order = torch.argsort(indices, stable=True)
    sorted_indices = indices[order]
    first = torch.ones_like(sorted_indices, dtype=torch.bool)
    first[1:] = sorted_indices[1:] != sorted_indices[:-1]
    return {key: tensor[order[first]] for key, tensor in gathered.items()}


@torch.no_grad()
def local_pass(
    accelerator: Accelerator, data, collate, batch_size: int, num_workers: int, compute: Callable, width: int
) -> tuple[dict[str, torch.Tensor], int]:
    """Run `compute(pixel_values)` -> [B, width] over this process's rows (no collectives inside: the shards of
    different processes may differ in length).

    Returns per-sample `values`, `labels` and `index` (when the collator gives one) and the number of skipped images.
    """
    loader = DataLoader(data, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    keys = ("values", "labels", "index") if collate.extra_columns["index"] else ("values", "labels")
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    skipped = 0
    for batch in loader:
        skipped += int(batch["skipped"])
        if not len(batch["pixel_values"]):
            continue
        with accelerator.autocast():
            parts["values"].append(compute(batch["pixel_values"].to(accelerator.device)).float())
        for key in keys[1:]:
            parts[key].append(batch[key].to(accelerator.device))
    if not parts["values"]:  # an empty shard still takes part in the gathers
        parts = {key: [torch.zeros(0, dtype=torch.long, device=accelerator.device)] for key in keys}
        parts["values"] = [torch.zeros(0, width, device=accelerator.device)]
    return {key: torch.cat(value) for key, value in parts.items()}, skipped


def score_metric(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy through the `evaluate` module shipped with the package."""
    metric = evaluate.load(str(METRIC_PATH))
    return metric.compute(predictions=scores.cpu().numpy(), references=labels.cpu().numpy(), top_k=[5])


class Evaluation:
    """The validation split, sharded without overlap; `run` scores it once across processes."""

    def __init__(self, accelerator, data: datasets.Dataset, collate, batch_size: int, num_workers: int):
        self.accelerator = accelerator
        self.expected = len(data)
        self.shard = shard_for_process(data, accelerator, seed=0, epoch=0, shuffle=False, buffer_size=0)
        self.collate, self.batch_size, self.num_workers = collate, batch_size, num_workers

    def local(self, compute: Callable, width: int) -> tuple[dict[str, torch.Tensor], int]:
        args = (self.shard, self.collate, self.batch_size, self.num_workers, compute, width)
        return local_pass(self.accelerator, *args)

    def finish(self, local: dict[str, torch.Tensor], skipped: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Gather local scores ("values") with labels and indices; metrics and counts (on every process)."""
        gathered = gather_samples(self.accelerator, local)
        raw = int(self.accelerator.reduce(torch.tensor(len(local["index"]), device=self.accelerator.device), "sum"))
        skipped = int(self.accelerator.reduce(torch.tensor(skipped, device=self.accelerator.device), "sum"))
        results = {"eval_samples": len(gathered["index"]), "eval_duplicates_dropped": raw - len(gathered["index"])}
        results |= {"eval_expected_samples": self.expected, "eval_skipped_images": skipped}
        if self.accelerator.is_main_process and len(gathered["index"]):
            metrics = score_metric(gathered["values"], gathered["labels"])
            results |= {"eval_top1": metrics["accuracy"], "eval_top5": metrics["top5_accuracy"]}
        return results, gathered

    def run(self, compute: Callable, width: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        return self.finish(*self.local(compute, width))


# ----- kNN -----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 256,
) -> torch.Tensor:
    """DINO's weighted kNN: the k most cosine-similar training features vote with weight exp(cosine / T).

    train_features: [N, D], train_labels: [N], features: [M, D] (normalised here); returns class votes [M, C].
    """
    bank = nn.functional.normalize(train_features.float(), dim=1)
    k = min(k, len(bank))
    scores = []
    for chunk in nn.functional.normalize(features.float(), dim=1).split(chunk_size):
        similarity, neighbours = (chunk @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
        scores.append(votes.scatter_add_(1, train_labels[neighbours], weights))
    return torch.cat(scores) if scores else features.new_zeros(0, num_classes)


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
def main() -> None:
    model_args, data_args, args = parse_args()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps if args.protocol == "finetune" else 1,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
    )
    check_launch(accelerator)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        datasets.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)

    # ----- data -----
    train_data = load_split(data_args, data_args.train_split, data_args.streaming)
    eval_data = load_split(data_args, data_args.validation_split, False)
    image_column = find_column(train_data.features, data_args.image_column, IMAGE_COLUMNS, "image")
    label_column = find_column(train_data.features, data_args.label_column, LABEL_COLUMNS, "label")
    for column in (image_column, label_column):
        find_column(eval_data.features, column, (), f"{data_args.validation_split} split's")
    names = class_names(train_data.features, label_column, train_data)
    train_data = limit_samples(train_data, data_args.max_train_samples)
    eval_data = limit_samples(eval_data, data_args.max_eval_samples)
    if not len(eval_data):
        raise SystemExit(f"error: the {data_args.validation_split!r} split is empty")
    train_data = prepare_images(train_data, image_column)
    eval_data = with_index(prepare_images(eval_data, image_column))

    # ----- model -----
    model = build_model(model_args, args, names, data_args.cache_dir)
    processor = image_processor_for(model.config)
    evaluation = Evaluation(
        accelerator,
        eval_data,
        ImageCollator(eval_transform(processor), image_column, label_column, INDEX_COLUMN),
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
    protocol = {"finetune": finetune, "linear_probe": linear_probe, "knn": knn}[args.protocol]
    results, gathered, state, model = protocol(task, model)

    # ----- output -----
    results = {
        "protocol": args.protocol,
        "num_processes": accelerator.num_processes,
        "model_name_or_path": model_args.model_name_or_path or model_args.config_name,
        "pooling": model_args.probe_pooling if model is None else model.config.classifier_pooling,
        **results,
        **{key: value for key, value in state.items() if key != "samples_in_epoch"},
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output = Path(args.output_dir)
        if args.save_predictions:
            (output / "eval_predictions.json").write_text(json.dumps(predictions_record(gathered)))
        (output / "eval_results.json").write_text(json.dumps(results, indent=2))
        logger.info("eval: %s", {key: value for key, value in results.items() if key.startswith("eval_")})
        if model is not None:
            card = classification_card(model_args, data_args, args, model, results)
            save_hub_folder(model, processor, output, card)
            logger.info("saved the classifier to %s", output)
            if args.push_to_hub:
                push_to_hub(args.output_dir, args.hub_model_id, args.hub_token)
    accelerator.end_training()


def predictions_record(gathered: dict[str, torch.Tensor]) -> dict[str, list]:
    """Per validation sample (by index): reference label and top-1 prediction."""
    return {
        "index": gathered["index"].tolist(),
        "label": gathered["labels"].tolist(),
        "prediction": gathered["values"].argmax(dim=1).tolist(),
    }


def finetune(task: Task, model: SGMAEForImageClassification) -> tuple[dict, dict, dict, SGMAEForImageClassification]:
    """End-to-end fine-tuning (MAE recipe): layer-wise lr decay, drop-path, MixUp/CutMix, label smoothing."""
    accelerator, data_args, args, train_data = task.accelerator, task.data_args, task.args, task.train_data
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    steps_per_epoch, total_steps = training_length(
        train_data, data_args, global_batch, args.num_train_epochs, args.max_train_steps
    )
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    learning_rate = args.base_learning_rate * global_batch / 256
    optimizer = torch.optim.AdamW(
        layer_decay_groups(model, learning_rate, args.weight_decay, args.layer_decay), betas=(0.9, args.adam_beta2)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(round(args.warmup_ratio * total_steps), total_steps)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    objects = {"scheduler": scheduler}  # checkpointed beside Accelerate's state
    unwrapped: SGMAEForImageClassification = accelerator.unwrap_model(model)

    state = {"step": 0, "epoch": 0, "samples_in_epoch": 0, "samples_seen": 0, "skipped_images": 0}
    resume_path = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        state = load_checkpoint(accelerator, resume_path, objects)
        logger.info("resumed from %s at step %d (epoch %d)", resume_path, state["step"], state["epoch"])
    save_checkpoint_now = partial(
        save_checkpoint, accelerator, args.output_dir, state, args.save_total_limit, objects, unwrapped.config
    )
    if accelerator.is_main_process:
        accelerator.init_trackers("sgmae_classification", config={k: str(v) for k, v in asdict(args).items()})
    collate = MixingCollator(
        ImageCollator(finetune_transform(task.processor, args), task.image_column, task.label_column),
        task.num_classes,
        args.mixup,
        args.cutmix,
    )
    logger.info(
        "fine-tuning %d steps (%d epochs of %d steps), global batch %d, lr %.2e, layer decay %s, drop path %s",
        total_steps, num_epochs, steps_per_epoch, global_batch, learning_rate, args.layer_decay,
        unwrapped.config.drop_path_rate,
    )  # fmt: skip

    def evaluate_now() -> tuple[dict, dict]:
        unwrapped.eval()
        results, gathered = task.evaluation.run(lambda pixels: unwrapped(pixels).logits, task.num_classes)
        unwrapped.train()
        accelerator.log(
            {key: value for key, value in results.items() if key.startswith("eval_top")}, step=state["step"]
        )
        return results, gathered

    progress = tqdm(total=total_steps, initial=state["step"], disable=not accelerator.is_main_process)
    window_loss, window_micro = 0.0, 0
    started, samples_at_start = time.perf_counter(), state["samples_seen"]
    results, gathered, evaluated_at = {}, {}, -1
    model.train()
    while state["step"] < total_steps:
        loader = epoch_loader(
            train_data, accelerator, state, data_args, args.per_device_train_batch_size, collate, args.seed
        )
        epoch_start = state["samples_in_epoch"]
        for batch in synchronized_batches(loader, accelerator):
            if state["step"] >= total_steps:  # checked here, so that a run ending with its epoch ends the epoch
                break
            with accelerator.accumulate(model):
                logits = model(batch["pixel_values"]).logits
                loss = nn.functional.cross_entropy(
                    logits.float(), batch["labels"], label_smoothing=args.label_smoothing
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            check_finite(loss.detach(), state["step"], args.output_dir)
            counts = accelerator.reduce(
                torch.tensor([len(batch["pixel_values"]), int(batch["skipped"])], device=accelerator.device), "sum"
            )
            state["samples_in_epoch"] += int(counts[0])
            state["samples_seen"] += int(counts[0])
            state["skipped_images"] += int(counts[1])
            window_loss, window_micro = window_loss + loss.item(), window_micro + 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state["step"] += 1
            progress.update(1)
            if state["step"] % args.logging_steps == 0 or state["step"] == total_steps:
                logs = {
                    "loss": window_loss / window_micro,
                    "lr": scheduler.get_last_lr()[-1],
                    "img_per_s": (state["samples_seen"] - samples_at_start) / (time.perf_counter() - started),
                }
                progress.set_postfix(
                    loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.1e}", img_s=f"{logs['img_per_s']:.0f}"
                )
                accelerator.log(logs, step=state["step"])
                state["train_loss"] = logs["loss"]
                window_loss, window_micro = 0.0, 0
            if (
                args.checkpointing_steps not in (None, "none", "epoch")
                and state["step"] % int(args.checkpointing_steps) == 0
            ):
                save_checkpoint_now()
        else:  # the epoch ran to its end
            if epoch_start == state["samples_in_epoch"] == 0:
                raise SystemExit("error: the training split yielded no full batch of images")
            state["epoch"] += 1
            state["samples_in_epoch"] = 0
            if args.eval_every_epoch or state["step"] >= total_steps:
                results, gathered = evaluate_now()
                evaluated_at = state["step"]
                if accelerator.is_main_process:
                    logger.info("epoch %d: top-1 %.4f", state["epoch"], results.get("eval_top1", float("nan")))
            if args.checkpointing_steps == "epoch":
                save_checkpoint_now()
    progress.close()
    if state["skipped_images"]:
        logger.warning("skipped %d corrupt training images", state["skipped_images"])
    if evaluated_at != state["step"]:
        results, gathered = evaluate_now()
    unwrapped.eval()
    state["total_steps"] = total_steps
    return results, gathered, state, unwrapped


def train_features(task: Task, model: SGMAEForImageClassification) -> dict[str, torch.Tensor]:
    """Frozen features ("values") and labels of the whole training split (no augmentation), each process
    extracting its shard, gathered onto every process. The model is frozen here."""
    accelerator, data_args = task.accelerator, task.data_args
    model.to(accelerator.device).eval().requires_grad_(False)
    started = time.perf_counter()
    local, skipped = local_pass(
        accelerator,
        shard_for_process(task.train_data, accelerator, seed=0, epoch=0, shuffle=False, buffer_size=0),
        ImageCollator(eval_transform(task.processor), task.image_column, task.label_column),
        data_args.per_device_eval_batch_size,
        data_args.dataloader_num_workers,
        lambda pixels: frozen_features(model, pixels),
        model.config.hidden_size,
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


def linear_probe(
    task: Task, model: SGMAEForImageClassification
) -> tuple[dict, dict, dict, SGMAEForImageClassification]:
    """MAE's linear probe on the frozen encoder: BatchNorm1d(affine=False) + Linear on cached features.

    Features are extracted once (no augmentation); the head trains with SGD + momentum 0.9 (instead of MAE's LARS)
    and a cosine schedule, on every process over all features with the global batch, then rank 0's head is
    broadcast. The trained head is folded into the model's classifier (see `fold_probe`).
    """
    accelerator, args, evaluation, width = task.accelerator, task.args, task.evaluation, model.config.hidden_size
    train = train_features(task, model)
    eval_local, eval_skipped = evaluation.local(lambda pixels: frozen_features(model, pixels), width)
    features, labels = train["values"], train["labels"]

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
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(round(args.warmup_ratio * total_steps), total_steps)
    )
    objects = {"probe": probe, "optimizer": optimizer, "scheduler": scheduler}
    state = {"step": 0, "epoch": 0, "samples_seen": 0}
    resume_path = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        state = load_checkpoint(accelerator, resume_path, objects)
        logger.info("resumed from %s at step %d (epoch %d)", resume_path, state["step"], state["epoch"])
    logger.info(
        "linear probe: %d steps of batch %d on %d features, lr %.2e (SGD, momentum 0.9)",
        total_steps, batch_size, len(features), learning_rate,
    )  # fmt: skip

    def probe_scores(values: torch.Tensor) -> torch.Tensor:
        probe.eval()
        with torch.no_grad():
            scores = probe(values.float())
        probe.train()
        return scores

    probe.train()
    progress = tqdm(total=total_steps, initial=state["step"], disable=not accelerator.is_main_process)
    while state["step"] < total_steps:
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(args.seed + state["epoch"]))
        for batch_index in range(state["step"] - state["epoch"] * steps_per_epoch, steps_per_epoch):
            if state["step"] >= total_steps:  # checked here, so that a run ending with its epoch ends the epoch
                break
            rows = order[batch_index * batch_size : (batch_index + 1) * batch_size].to(accelerator.device)
            loss = nn.functional.cross_entropy(probe(features[rows]), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            if args.max_grad_norm:
                nn.utils.clip_grad_norm_(probe.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            check_finite(loss.detach(), state["step"], args.output_dir)
            state["step"] += 1
            state["samples_seen"] += len(rows)
            progress.update(1)
            if state["step"] % args.logging_steps == 0 or state["step"] == total_steps:
                state["train_loss"] = loss.item()
                accelerator.log({"loss": loss.item(), "lr": scheduler.get_last_lr()[0]}, step=state["step"])
                progress.set_postfix(loss=f"{loss.item():.4f}")
            steps = args.checkpointing_steps
            if steps not in (None, "none", "epoch") and state["step"] % int(steps) == 0:
                save_checkpoint(accelerator, args.output_dir, state, args.save_total_limit, objects)
        else:
            state["epoch"] += 1
            if args.eval_every_epoch:
                epoch_results, _ = evaluation.finish({**eval_local, "values": probe_scores(eval_local["values"])}, 0)
                accelerator.log(
                    {k: v for k, v in epoch_results.items() if k.startswith("eval_top")}, step=state["step"]
                )
            if args.checkpointing_steps == "epoch":
                save_checkpoint(accelerator, args.output_dir, state, args.save_total_limit, objects)
    progress.close()

    # every process trained the same head; make it bit-identical (GPU kernels need not be), then fold it
    for tensor in [*probe.parameters(), *probe.buffers()]:
        tensor.data.copy_(broadcast(tensor.data.clone(), from_process=0))
    probe_results, probe_gathered = evaluation.finish(
        {**eval_local, "values": probe_scores(eval_local["values"])}, eval_skipped
    )
    fold_probe(model, probe[0], probe[1])
    model.eval()
    results, gathered = evaluation.run(lambda pixels: model(pixels).logits, task.num_classes)
    # the folded classifier must predict what the probe predicted on the cached features
    agree = (gathered["values"].argmax(1) == probe_gathered["values"].argmax(1)).float().mean().item()
    results |= {"probe_eval_top1": probe_results.get("eval_top1"), "probe_agreement": agree}
    state |= {"total_steps": total_steps, "train_features": len(features)}
    return results, gathered, state, model


def knn(task: Task, model: SGMAEForImageClassification) -> tuple[dict, dict, dict, None]:
    """DINO's weighted cosine kNN on frozen, L2-normalised features; nothing is trained and no model is saved."""
    args = task.args
    train = train_features(task, model)
    local, skipped = task.evaluation.local(lambda pixels: frozen_features(model, pixels), model.config.hidden_size)
    local["values"] = knn_scores(
        train["values"], train["labels"], local["values"], task.num_classes, args.knn_k, args.knn_temperature
    )
    results, gathered = task.evaluation.finish(local, skipped)
    results |= {"knn_k": args.knn_k, "knn_temperature": args.knn_temperature, "train_features": len(train["values"])}
    return results, gathered, {}, None


def dataset_id(data_args: DataArguments) -> str:
    """A Hub-style dataset name for the card: the id itself, or a local folder's name."""
    source = data_args.dataset_name or data_args.train_dir or "images"
    return Path(source).name if Path(source).exists() else source


def classification_card(model_args, data_args, args, model, results: dict) -> str:
    config = model.config
    protocol = {"finetune": "fine-tuning", "linear_probe": "linear probing"}[args.protocol]
    name = args.hub_model_id or Path(args.output_dir).name
    data_name = dataset_id(data_args)
    metrics = [
        {"type": "accuracy", "value": round(results["eval_top1"], 4), "name": f"Top-1 accuracy ({protocol})"},
        {"type": "top_5_accuracy", "value": round(results["eval_top5"], 4), "name": f"Top-5 accuracy ({protocol})"},
    ]
    dataset = {"name": data_name, "type": data_name, "split": data_args.validation_split}
    if data_args.dataset_config_name:
        dataset["config"] = data_args.dataset_config_name
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "image-classification",
        "license": "apache-2.0",
        "tags": ["sgmae", "mae", "image-classification", "vision", args.protocol.replace("_", "-")],
        "datasets": [data_name],
    }
    base = model_args.model_name_or_path
    if base and not Path(base).exists():
        metadata["base_model"] = base
    metadata["model-index"] = [
        {
            "name": name,
            "results": [
                {"task": {"type": "image-classification", "name": "Image Classification"}, "dataset": dataset,
                 "metrics": metrics}
            ],
        }
    ]  # fmt: skip
    labels = ", ".join(config.id2label[i] for i in range(min(config.num_labels, 10)))
    steps = f"{results.get('step', 0)} of {results.get('total_steps', 0)}"
    image = config.image_size
    body = f"""
SG-MAE (Self-Guided Masked Autoencoder, Shin et al., NeurIPS 2024) encoder evaluated by {protocol} with
`run_classification.py`. Use it with `trust_remote_code=True`:

```python
from transformers import pipeline
classifier = pipeline("image-classification", model="{name}", trust_remote_code=True)
```

## Results on {data_name} ({data_args.validation_split}, {results["eval_samples"]} images)
| top-1 | top-5 |
|---|---|
| {results["eval_top1"]:.4f} | {results["eval_top5"]:.4f} |

## Training
| | |
|---|---|
| protocol | {protocol} |
| encoder | {model_args.model_name_or_path or "random init (" + str(model_args.config_name) + ")"} |
| architecture | {config.num_hidden_layers} x {config.hidden_size}, patch {config.patch_size}, image {image} |
| head | {config.classifier_pooling} pooling{" + LayerNorm" if config.classifier_pooling == "mean" else ""} |
| classes | {config.num_labels} ({labels}{", ..." if config.num_labels > 10 else ""}) |
| optimiser steps | {steps} |
| base lr / weight decay | {args.base_learning_rate} / {args.weight_decay} |
"""
    if args.protocol == "finetune":
        body += (
            f"| layer decay / drop path | {args.layer_decay} / {config.drop_path_rate} |\n"
            f"| label smoothing / mixup / cutmix | {args.label_smoothing} / {args.mixup} / {args.cutmix} |\n"
        )
    else:
        body += "| head | BatchNorm1d (no affine) + Linear, folded into one Linear |\n"
    return model_card(metadata, f"SG-MAE {protocol}: {Path(args.output_dir).name}", body)


if __name__ == "__main__":
    main()
