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

The protocols themselves are in `sgmae_training/classification.py`; this script prepares their data and model.
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import HfArgumentParser, ViTImageProcessor

from modeling_sgmae import SGMAEConfig, SGMAEForImageClassification
from sgmae_training.arguments import LOOP_POSITIVE_ARGUMENTS, check_positive, dataset_reachable, parse_script_args
from sgmae_training.classification import (
    DEFAULTS,
    PROTOCOLS,
    ClassificationArguments,
    ClassificationDataArguments,
    ProtocolResult,
    Task,
    finetune,
    frozen,
    knn,
    linear_probe,
)
from sgmae_training.data.images import (
    ImageCollator,
    check_num_channels,
    eval_transform,
    image_processor_for,
    image_statistics,
)
from sgmae_training.data.loading import (
    INDEX_COLUMN,
    LABEL_COLUMNS,
    DataArguments,
    check_data_arguments,
    class_names,
    find_column,
    limit_samples,
    prepare_images,
    training_and_evaluation_splits,
    with_index,
)
from sgmae_training.data.loading import POSITIVE_ARGUMENTS as DATA_POSITIVE_ARGUMENTS
from sgmae_training.engine import start_run
from sgmae_training.evaluation import Evaluation
from sgmae_training.hub import (
    check_checkpoint_kind,
    classification_card,
    push_to_hub,
    save_hub_folder,
    write_json_atomically,
)

logger = logging.getLogger("run_classification")
POOLINGS = typing.get_args(SGMAEConfig.__annotations__["classifier_pooling"])  # the config's Literal choices


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
    if args.resume_from_checkpoint and args.protocol in ("knn", "frozen"):
        trains = "it trains nothing" if args.protocol == "knn" else "its probes train in seconds on the features"
        raise SystemExit(
            f"error: --protocol {args.protocol} keeps no checkpoints to resume from ({trains}); "
            "run it again without --resume_from_checkpoint"
        )
    if data_args.streaming and args.protocol != "finetune":
        raise SystemExit("error: --streaming is only supported with --protocol finetune")
    if args.knn_k < 1 or args.knn_temperature <= 0:
        raise SystemExit("error: --knn_k must be positive and --knn_temperature greater than 0")
    args.check()
    check_positive(args, LOOP_POSITIVE_ARGUMENTS)
    check_data_arguments(data_args, (*DATA_POSITIVE_ARGUMENTS, "per_device_eval_batch_size"))
    for name, value in DEFAULTS[args.protocol].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


# ----- data ----------------------------------------------------------------------------------------------------------
def load_data(data_args: ClassificationDataArguments) -> tuple[datasets.Dataset, datasets.Dataset, str, str, list]:
    """Training and evaluation splits (undecoded images, evaluation rows numbered), their columns, class names."""
    train_data, eval_data, eval_split, image_column = training_and_evaluation_splits(data_args)
    label_column = find_column(train_data.features, data_args.label_column, LABEL_COLUMNS, "label")
    for column in (image_column, label_column):
        find_column(eval_data.features, column, (), f"{eval_split} split's")
    names = class_names(train_data.features, label_column, train_data)
    train_data = limit_samples(train_data, data_args.max_train_samples)
    eval_data = limit_samples(eval_data, data_args.max_eval_samples)
    if not len(eval_data):
        raise SystemExit(f"error: the {eval_split!r} split is empty")
    train_data = prepare_images(train_data, image_column)
    eval_data = with_index(prepare_images(eval_data, image_column))
    return train_data, eval_data, image_column, label_column, names


# ----- model ---------------------------------------------------------------------------------------------------------
def build_model(
    model_args: ModelArguments, args: ClassificationArguments, names: list[str], data_args: DataArguments
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
            with new_head_report_silenced(args.protocol in ("knn", "frozen")):
                model = SGMAEForImageClassification.from_pretrained(path, cache_dir=cache_dir, **overrides)
        except (OSError, ValueError, TypeError, SafetensorError, StrictDataclassError) as error:
            reason = " ".join(str(error).split())  # one line (strict config errors span two)
            raise SystemExit(f"error: cannot load {path!r} as an SG-MAE classifier: {reason}") from error
        check_num_channels(data_args.num_channels, model.config, path)
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


class NewHeadReportFilter(logging.Filter):
    """Drops transformers' load report when all it says is that the head is new (MISSING, "consider training"):
    kNN and `frozen` never use the classifier, and the head's LayerNorm of mean pooling stays as initialised, the
    identity, as in MAE's probe (see `frozen_features`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        cells = [[cell.strip() for cell in line.split("|")] for line in message.splitlines() if line.count("|") >= 2]
        rows = [(key, status) for key, status, *_ in cells if key != "Key"]
        return not all(key.startswith(("classifier.", "fc_norm.")) and "MISSING" in status for key, status in rows)


@contextmanager
def new_head_report_silenced(silenced: bool) -> Iterator[None]:
    """While loading: without transformers' report of a new classifier head when `silenced` (see NewHeadReportFilter);
    any other load report is still shown."""
    loader_logger = logging.getLogger("transformers.modeling_utils")
    report_filter = NewHeadReportFilter()
    if silenced:
        loader_logger.addFilter(report_filter)
    try:
        yield
    finally:
        loader_logger.removeFilter(report_filter)


# ----- main ----------------------------------------------------------------------------------------------------------
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
    statistics = image_statistics(data_args, model.config, train_data, image_column, checkpoint)
    processor = image_processor_for(model.config, statistics)
    evaluation = Evaluation(
        accelerator,
        eval_data,
        ImageCollator(eval_transform(processor), image_column, label_column, INDEX_COLUMN, channels),
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

    results = {
        "protocol": args.protocol,
        "num_processes": accelerator.num_processes,
        "model_name_or_path": model_args.model_name_or_path or model_args.config_name,
        "pooling": pooling_of(args.protocol, model_args, result.model),
        **result.metrics,
        **(result.state.results() if result.state is not None else {}),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        logger.info("results: %s", result.metrics)
        logger.info("for comparison, %s", chance_level(len(names)))
        save_outputs(model_args, data_args, args, result, results, processor)
    accelerator.end_training()


def chance_level(num_classes: int) -> str:
    """What guessing scores, to read the accuracies against."""
    return f"chance on {num_classes} classes: top-1 {1 / num_classes:.3f}, top-5 {min(5 / num_classes, 1):.3f}"


def save_outputs(
    model_args: ModelArguments,
    data_args: ClassificationDataArguments,
    args: ClassificationArguments,
    result: ProtocolResult,
    results: dict,
    processor: ViTImageProcessor,
) -> None:
    """eval_results.json (and eval_predictions.json), then the classifier's Hub folder when the protocol made one,
    and its upload."""
    output = Path(args.output_dir)
    if args.save_predictions:
        write_json_atomically(output / "eval_predictions.json", predictions_record(result.gathered))
    write_json_atomically(output / "eval_results.json", results)
    if result.model is not None:
        card = classification_card(model_args, data_args, args, result.model, results)
        save_hub_folder(result.model, processor, output, card)
        logger.info("saved the classifier to %s", output)
        if args.push_to_hub:
            push_to_hub(args.output_dir, args.hub_model_id, args.hub_token)


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


if __name__ == "__main__":
    main()
