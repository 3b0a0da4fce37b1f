#!/usr/bin/env python
"""Fine-tune an SG-MAE (or transformers ViTMAE) encoder for object detection and instance segmentation:
transformers' Conditional DETR with its mask head on the SG-MAE backbone and its four-level pyramid
(docs/detection.md says why this head and how it differs from ViTDet's Mask R-CNN recipe).

    accelerate launch -q --config_file configuration/accelerate/single_gpu.yaml run_detection.py \
        --train_dir coco/train2017 --train_annotations coco/annotations/instances_train2017.json \
        --validation_dir coco/val2017 --validation_annotations coco/annotations/instances_val2017.json \
        --model_name_or_path outputs/sgmae-vit-base --output_dir outputs/sgmae-coco

Data come from the Hub's COCO layout (--dataset_name: `image` and `objects` with bbox, category, segmentation) or
image folders with COCO JSON files. Saves a Hub-ready folder (`pipeline("object-detection", trust_remote_code=True)`
and the instance-segmentation pipeline work on it) and eval_results.json (COCO box and mask AP, AP50, AP75, AP by
size, through torchmetrics and pycocotools). Arguments can also come from one JSON/YAML file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from transformers import ConditionalDetrImageProcessor, HfArgumentParser

from modeling_sgmae.detection_sgmae import SGMAEDetrConfig, SGMAEForObjectDetection
from sgmae_training.arguments import LOOP_POSITIVE_ARGUMENTS, check_positive, dataset_reachable, parse_script_args
from sgmae_training.data.detection import (
    OBJECTS_COLUMNS,
    DetectionCollator,
    DetectionDataArguments,
    category_names,
    check_annotations,
    coco_folder_split,
    detection_transform,
)
from sgmae_training.data.images import check_num_channels, image_processor_for, image_statistics
from sgmae_training.data.loading import (
    check_data_arguments,
    find_column,
    find_image_column,
    limit_samples,
    prepare_images,
    training_and_evaluation_splits,
    with_index,
)
from sgmae_training.detection import DetectionArguments, DetectionTask, finetune
from sgmae_training.engine import start_run
from sgmae_training.hub import (
    check_checkpoint_kind,
    detection_card,
    push_to_hub,
    save_hub_folder,
    write_json_atomically,
)
from sgmae_training.pyramid import as_pyramid, encoder_and_config, model_building, with_encoder

logger = logging.getLogger("run_detection")
# An encoder (SG-MAE or ViTMAE) starts a model; a detection checkpoint is continued.
CHECKPOINT_KINDS = {
    "sgmae": "an SG-MAE (pre-training or classification)", "sgmae_detr": "an SG-MAE detection",
    "vit_mae": "a transformers ViTMAE",
}  # fmt: skip


@dataclass
class ModelArguments:
    """Which encoder to fine-tune, and the detection transformer on it."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "SG-MAE pre-training/classification/detection checkpoint, or a ViTMAE one."}
    )
    config_name: str | None = field(
        default=None, metadata={"help": "SGMAEConfig JSON for a randomly initialised encoder (from-scratch baseline)."}
    )
    out_indices: list[int] | None = field(
        default=None, metadata={"help": "Blocks (1-based) feeding the pyramid; default L/3, L/2, 2L/3, L."}
    )
    drop_path: float = field(default=0.1, metadata={"help": "Stochastic-depth rate of the encoder (ViTDet: 0.1)."})
    num_queries: int = field(
        default=100, metadata={"help": "Object queries (DETR: 100; the mask head's memory grows with them)."}
    )
    transformer_layers: int = field(default=6, metadata={"help": "Encoder and decoder layers of the head (6)."})
    transformer_width: int = field(default=256, metadata={"help": "Width of the head, a multiple of 8 (256)."})
    auxiliary_loss: bool = field(default=True, metadata={"help": "DETR's losses after every decoder layer."})


def parse_args() -> tuple[ModelArguments, DetectionDataArguments, DetectionArguments]:
    parsed = parse_script_args(HfArgumentParser((ModelArguments, DetectionDataArguments, DetectionArguments)))
    validate_args(*parsed)
    return parsed


def validate_args(model_args: ModelArguments, data_args: DetectionDataArguments, args: DetectionArguments) -> None:
    """Clear errors for bad choices, before anything is loaded."""
    if not (model_args.model_name_or_path or model_args.config_name):
        raise SystemExit("error: give --model_name_or_path (a checkpoint) or --config_name (a from-scratch baseline)")
    folders = (("train", data_args.train_dir, data_args.train_annotations),
               ("validation", data_args.validation_dir, data_args.validation_annotations))  # fmt: skip
    for split, folder, coco_file in folders:
        if bool(folder) != bool(coco_file) and not data_args.dataset_name:
            raise SystemExit(f"error: --{split}_dir and --{split}_annotations (a COCO JSON file) go together")
    if data_args.streaming:
        raise SystemExit("error: --streaming is not supported for detection (annotations are checked up front)")
    if args.num_train_epochs <= 0:
        raise SystemExit(f"error: --num_train_epochs must be positive, got {args.num_train_epochs}")
    if model_args.transformer_width % 8:
        raise SystemExit(f"error: --transformer_width must be a multiple of 8, got {model_args.transformer_width}")
    if not 0 <= model_args.drop_path < 1 or not 0 < args.layer_decay <= 1 or not 0 < data_args.crop_scale_min <= 1:
        raise SystemExit("error: --drop_path must be in [0, 1), --layer_decay and --crop_scale_min in (0, 1]")
    args.check()
    check_positive(args, LOOP_POSITIVE_ARGUMENTS)
    check_positive(model_args, ("num_queries", "transformer_layers"))
    check_positive(args, ("eval_every_epochs",), minimum=0)
    check_data_arguments(data_args, ("image_size", "per_device_eval_batch_size"))


# ----- data ----------------------------------------------------------------------------------------------------------
def load_data(data_args: DetectionDataArguments) -> tuple[datasets.Dataset, datasets.Dataset, str, str, list[str]]:
    """Training and evaluation splits (undecoded images, evaluation rows numbered, every annotation checked),
    their image and objects columns and the category names."""
    if data_args.dataset_name:
        train_data, eval_data, eval_split, image_column = training_and_evaluation_splits(data_args)
        objects_column = find_column(train_data.features, data_args.objects_column, OBJECTS_COLUMNS, "objects")
        find_column(eval_data.features, objects_column, (), f"{eval_split} split's")
        names = category_names(train_data.features, objects_column, train_data)
    else:
        train_data, names = coco_folder_split(data_args.train_dir, data_args.train_annotations)
        eval_data, _ = coco_folder_split(data_args.validation_dir, data_args.validation_annotations)
        eval_split, image_column, objects_column = "validation", "image", "objects"
    train_data = limit_samples(train_data, data_args.max_train_samples)
    eval_data = limit_samples(eval_data, data_args.max_eval_samples)
    if not len(eval_data):
        raise SystemExit(f"error: the {eval_split!r} split is empty")
    image_column = find_image_column(train_data.features, image_column)
    for split, data in ((data_args.train_split, train_data), (eval_split, eval_data)):
        check_annotations(prepare_images(data, image_column), split, image_column, objects_column, len(names))
    return prepare_images(train_data, image_column), with_index(prepare_images(eval_data, image_column)), \
        image_column, objects_column, names  # fmt: skip


# ----- model ---------------------------------------------------------------------------------------------------------
def build_model(model_args: ModelArguments, data_args: DetectionDataArguments, names: list[str]):
    """Conditional DETR on the SG-MAE backbone at the image size, its encoder from a checkpoint (position table
    resized to the image's grid) or a config; a detection checkpoint is continued (new heads when its classes
    differ)."""
    labels = {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}
    path, cache_dir = model_args.model_name_or_path, data_args.cache_dir
    with model_building("detection", path or model_args.config_name):
        if path and check_checkpoint_kind(path, cache_dir, kinds=CHECKPOINT_KINDS) == "sgmae_detr":
            model = SGMAEForObjectDetection.from_pretrained(path, cache_dir=cache_dir, ignore_mismatched_sizes=True,
                                                            **labels)  # fmt: skip
            check_num_channels(data_args.num_channels, model.config.backbone_config, path)
            return model
        encoder, backbone_config = encoder_and_config(path, model_args.config_name, cache_dir, data_args.num_channels)
        as_pyramid(backbone_config, data_args.image_size, model_args.drop_path, model_args.out_indices)
        width, depth = model_args.transformer_width, model_args.transformer_layers
        config = SGMAEDetrConfig(
            backbone_config=backbone_config, num_queries=model_args.num_queries, d_model=width,
            encoder_layers=depth, decoder_layers=depth, encoder_ffn_dim=8 * width, decoder_ffn_dim=8 * width,
            auxiliary_loss=model_args.auxiliary_loss, **labels,
        )  # fmt: skip
    model = SGMAEForObjectDetection(config)
    return with_encoder(model, model.sgmae_backbone, encoder)


# ----- main ----------------------------------------------------------------------------------------------------------
def main() -> None:
    model_args, data_args, args = parse_args()
    accelerator = start_run(
        args.output_dir, args.seed, args.gradient_accumulation_steps, args.mixed_precision, args.report_to,
        args.ddp_timeout,
    )  # fmt: skip
    with dataset_reachable(data_args.dataset_name):
        train_data, eval_data, image_column, objects_column, names = load_data(data_args)
    model = build_model(model_args, data_args, names)
    backbone_config = model.config.backbone_config
    if backbone_config.num_channels != 3:
        raise SystemExit(f"error: detection takes RGB images, not {backbone_config.num_channels} channels")
    statistics = image_statistics(data_args, backbone_config, train_data, image_column, model_args.model_name_or_path)
    processor = image_processor_for(backbone_config, statistics)  # MAE's mean/std unless the data need others
    mean, std, size = list(processor.image_mean), list(processor.image_std), data_args.image_size
    train_collate = DetectionCollator(
        detection_transform(size, True, data_args.crop_scale_min, data_args.horizontal_flip), mean, std,
        image_column, objects_column,
    )  # fmt: skip
    eval_collate = DetectionCollator(detection_transform(size, False, 1.0, False), mean, std, image_column,
                                     objects_column, keep_targets=True)  # fmt: skip
    logger.info(
        "detection of %d categories (%s...), image column %r, objects column %r, %d processes", len(names),
        ", ".join(names[:3]), image_column, objects_column, accelerator.num_processes,
    )  # fmt: skip
    task = DetectionTask(accelerator, data_args, args, model, eval_data, eval_collate)
    state = finetune(task, train_data, train_collate)

    # ----- output -----
    results = {
        "model_name_or_path": model_args.model_name_or_path or model_args.config_name,
        "num_processes": accelerator.num_processes,
        "image_size": size,
        **task.results,
        **state.results(),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output = Path(args.output_dir)
        write_json_atomically(output / "eval_results.json", results)
        logger.info("box AP %s, mask AP %s over %d images", results["eval_box_ap"], results["eval_mask_ap"],
                    results["eval_samples"])  # fmt: skip
        detector_processor = ConditionalDetrImageProcessor(
            size={"height": size, "width": size}, image_mean=mean, image_std=std, do_pad=False
        )
        card = detection_card(model_args, data_args, args, task.model, results)
        task.model.eval()
        save_hub_folder(task.model, detector_processor, output, card)
        logger.info("saved the detection model to %s", output)
        if args.push_to_hub:
            push_to_hub(args.output_dir, args.hub_model_id, args.hub_token)
    accelerator.end_training()


if __name__ == "__main__":
    main()
