"""Image classification on an SG-MAE encoder, MAE's and DINO's protocols: end-to-end fine-tuning, the linear probe on
frozen features (trained by the shared loop, then folded into the classifier), weighted cosine kNN, and `frozen`
(kNN and probe on [CLS] and mean-pooled features from one pass). `run_classification.py` prepares a `Task` and
calls one of them."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from torch import nn
from transformers import ViTImageProcessor

from modeling_sgmae import SGMAEForImageClassification

from .arguments import RunArguments
from .data.images import ImageCollator, MixingCollator, eval_transform, finetune_transform
from .data.loaders import shard_for_process, worker_epoch_batches
from .data.loading import LABEL_COLUMNS, DataArguments, training_length
from .engine import LoopSettings, TrainingHooks, resume_state, train
from .evaluation import Evaluation, EvaluationResult, gather_samples, knn_scores, local_pass
from .optim import cosine_scheduler, layer_decay_groups
from .protocol import EvaluatingHooks, finish_training
from .training_state import TrainingState

logger = logging.getLogger(__name__)

PROTOCOLS = ("finetune", "linear_probe", "knn", "frozen")
# MAE's recipes (FINETUNE.md / LINPROBE.md) where a protocol changes the default.
DEFAULTS = {
    "finetune": {"base_learning_rate": 5e-4, "weight_decay": 0.05, "warmup_ratio": 0.05, "num_train_epochs": 100},
    "linear_probe": {"base_learning_rate": 0.1, "weight_decay": 0.0, "warmup_ratio": 0.1, "num_train_epochs": 90},
    "knn": {},
}
DEFAULTS["frozen"] = DEFAULTS["linear_probe"]


@dataclass
class ClassificationDataArguments(DataArguments):
    """DataArguments plus the label column."""

    label_column: str | None = field(
        default=None, metadata={"help": f"Label column; auto-detected among {LABEL_COLUMNS} when unset."}
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


@dataclass
class Task:
    """What run_classification.py prepared for a protocol."""

    accelerator: Accelerator
    data_args: ClassificationDataArguments
    args: ClassificationArguments
    processor: ViTImageProcessor
    train_data: datasets.Dataset | datasets.IterableDataset
    evaluation: Evaluation
    image_column: str
    label_column: str
    num_classes: int


@dataclass
class ProtocolResult:
    """What a protocol hands back to run_classification.py."""

    metrics: dict[str, Any]  # its entries of eval_results.json
    gathered: dict[str, torch.Tensor]  # per validation sample: "index", "labels", scores "values" (frozen: none)
    state: TrainingState | None = None  # the training loop's final state (None: nothing was trained)
    model: SGMAEForImageClassification | None = None  # the classifier to save (None: no model is saved)


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


class FinetuneHooks(EvaluatingHooks):
    """Fine-tuning's part of the loop: label-smoothed cross-entropy and the evaluation after epochs."""

    def __init__(self, task: Task, model: SGMAEForImageClassification, total_steps: int):
        self.task, self.model, self.total_steps = task, model, total_steps
        self.result: EvaluationResult | None = None

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
    steps_per_epoch, total_steps = training_length(
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
    transform = finetune_transform(
        task.processor, args.crop_scale_min, args.rand_augment_ops, args.rand_augment_magnitude, args.random_erasing
    )
    collate = MixingCollator(
        ImageCollator(transform, task.image_column, task.label_column, num_channels=channels),
        task.num_classes, args.mixup, args.cutmix,
    )  # fmt: skip
    logger.info(
        "fine-tuning %d steps (%d epochs of %d steps), global batch %d, lr %.2e, layer decay %s, drop path %s",
        total_steps, math.ceil(total_steps / steps_per_epoch), steps_per_epoch, global_batch, learning_rate,
        args.layer_decay, unwrapped.config.drop_path_rate,
    )  # fmt: skip

    epoch_batches = partial(worker_epoch_batches, train_data, accelerator=accelerator, data_args=data_args,
                            batch_size=args.per_device_train_batch_size, collate=collate, seed=args.seed)  # fmt: skip

    hooks = FinetuneHooks(task, unwrapped, total_steps)
    settings = LoopSettings(
        args.output_dir, args.logging_steps, args.checkpointing_steps, args.save_total_limit, args.max_grad_norm,
        unwrapped.config,
    )  # fmt: skip
    state = train(accelerator, model, optimizer, scheduler, epoch_batches, state, settings, hooks, {})
    finish_training(state, hooks)
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
        shard_for_process(task.train_data, accelerator, seed=0, epoch=0, shuffle=False, buffer_size=0),
        ImageCollator(
            eval_transform(task.processor),
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


def new_probe(features: torch.Tensor, num_classes: int, seed: int) -> nn.Sequential:
    """MAE's probe head, BatchNorm1d(affine=False) + Linear, for `features` [N, D]: the Linear initialised as MAE's
    (seeded), the BatchNorm's running statistics those of `features` from the start (exact for short runs)."""
    width = features.shape[1]
    probe = nn.Sequential(nn.BatchNorm1d(width, affine=False, eps=1e-6), nn.Linear(width, num_classes))
    torch.manual_seed(seed)
    nn.init.trunc_normal_(probe[1].weight, std=0.01)
    nn.init.zeros_(probe[1].bias)
    probe[0].running_mean.copy_(features.mean(dim=0))
    probe[0].running_var.copy_(features.var(dim=0) if len(features) > 1 else torch.ones(width))
    return probe


def feature_batches(
    state: TrainingState, features: dict[str, torch.Tensor], batch_size: int, steps_per_epoch: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of cached `features` ("values", "labels") in the epoch of `state`, past those already trained:
    every process trains the same head on all features, in a seeded permutation per epoch."""
    values = features["values"]
    order = torch.randperm(len(values), generator=torch.Generator().manual_seed(seed + state.epoch))
    for batch_index in range(state.samples_in_epoch // batch_size, steps_per_epoch):
        rows = order[batch_index * batch_size : (batch_index + 1) * batch_size].to(values.device)
        yield {"features": values[rows], "labels": features["labels"][rows]}


def train_probe(
    task: Task,
    cached: dict[str, torch.Tensor],
    eval_local: dict[str, torch.Tensor],
    eval_skipped: int,
    output_dir: str | None,
) -> tuple[nn.Sequential, EvaluationResult, TrainingState]:
    """MAE's linear probe (see `new_probe`) trained by the shared loop on cached features.

    The head trains with SGD + momentum 0.9 (instead of MAE's LARS) and a cosine schedule, on every process over all
    features with the global batch; rank 0's head is then broadcast. Checkpoints (and resume) in `output_dir`; none
    when it is None (`frozen`: its probes train in seconds on features extracted again by a new run).
    Returns the head, its scoring of the validation split, and the loop's state.
    """
    accelerator, args = task.accelerator, task.args
    features = cached["values"]
    probe = new_probe(features, task.num_classes, args.seed).to(accelerator.device)
    batch_size = min(args.per_device_train_batch_size * accelerator.num_processes, len(features))
    if batch_size < 2:
        raise SystemExit("error: the linear probe needs at least 2 training images per batch")
    steps_per_epoch = max(len(features) // batch_size, 1)
    total_steps = args.max_train_steps or math.ceil(args.num_train_epochs * steps_per_epoch)
    learning_rate = args.base_learning_rate * batch_size / 256
    optimizer = torch.optim.SGD(probe.parameters(), lr=learning_rate, momentum=0.9, weight_decay=args.weight_decay)
    objects = {"probe": probe, "optimizer": optimizer}
    folder, resume = (output_dir, args.resume_from_checkpoint) if output_dir else (args.output_dir, None)
    state = resume_state(accelerator, optimizer, folder, resume, objects, total_steps)
    scheduler = cosine_scheduler(optimizer, args.warmup_ratio, total_steps, state.step)
    logger.info(
        "linear probe: %d steps of batch %d on %d features, lr %.2e (SGD, momentum 0.9)",
        total_steps, batch_size, len(features), learning_rate,
    )  # fmt: skip
    epoch_batches = partial(
        feature_batches, features=cached, batch_size=batch_size, steps_per_epoch=steps_per_epoch, seed=args.seed
    )
    hooks = ProbeHooks(task, probe, eval_local)
    checkpoints = (args.checkpointing_steps, args.save_total_limit) if output_dir else ("none", None)
    settings = LoopSettings(
        folder, args.logging_steps, *checkpoints, args.max_grad_norm, count_key="features", sharded=False
    )
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
    price of one evaluation for four); writes `{pooling}_{knn,linear_probe}_top{1,5}`, saves no model and no
    checkpoint."""
    compute, width = partial(both_poolings, model), model.config.hidden_size
    cached = train_features(task, model, compute, 2 * width)
    eval_local, eval_skipped = task.evaluation.local(compute, 2 * width)
    metrics = {}
    for index, pooling in enumerate(("cls", "mean")):
        columns = slice(index * width, (index + 1) * width)
        pooled_train = {**cached, "values": cached["values"][:, columns]}
        pooled_eval = {**eval_local, "values": eval_local["values"][:, columns]}
        knn_result = knn_evaluation(task, pooled_train, pooled_eval, eval_skipped)
        _, probe_result, state = train_probe(task, pooled_train, pooled_eval, eval_skipped, output_dir=None)
        metrics |= knn_result.accuracies(f"{pooling}_knn_") | probe_result.accuracies(f"{pooling}_linear_probe_")
    metrics |= knn_result.counts() | knn_settings(task.args, cached)
    return ProtocolResult(metrics, {}, state)  # the state of the last probe trained
