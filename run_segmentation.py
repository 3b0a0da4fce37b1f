#!/usr/bin/env python
"""Fine-tune an SG-MAE (or transformers ViTMAE) encoder for semantic segmentation: transformers' UperNet on the
SG-MAE backbone with BEiT / MAE's feature pyramid, MAE's ADE20K recipe by default (docs/segmentation.md).

    # offline: generated shapes, the README's demo model (about a minute on a CPU)
    python -m sgmae_training.data.shapes outputs/shapes && \
    accelerate launch -q --config_file configuration/accelerate/default.yaml run_segmentation.py \
        --train_dir outputs/shapes/train --validation_dir outputs/shapes/validation \
        --label_names_file outputs/shapes/id2label.json --model_name_or_path outputs/sgmae-demo \
        --output_dir outputs/sgmae-demo-shapes --crop_size 32 --head_channels 64 ...   # see docs/segmentation.md
    # ADE20K (needs the dataset, see the docs) from a ViT-B encoder
    accelerate launch -q --config_file configuration/accelerate/single_gpu.yaml run_segmentation.py \
        --dataset_name data/scene_parse_150/scene_parsing --num_labels 150 --reduce_labels \
        --label_names_file configuration/datasets/ade20k-id2label.json \
        --model_name_or_path outputs/sgmae-vit-base-in1k --output_dir outputs/sgmae-ade20k

Saves a Hub-ready SGMAEForSemanticSegmentation folder (`pipeline("image-segmentation", trust_remote_code=True)`
works on it) and eval_results.json (mIoU, per-class IoU and accuracy, pixel accuracy, through the shipped `mean_iou`
metric). Arguments can also come from one JSON/YAML file: `python run_segmentation.py args.yaml`.

The protocol itself is in `sgmae_training/segmentation.py`, the images and maps in
`sgmae_training/data/segmentation.py`; this script prepares their model and data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, SegformerImageProcessor

from modeling_sgmae import SGMAEForSemanticSegmentation, SGMAEUperNetConfig
from sgmae_training.arguments import LOOP_POSITIVE_ARGUMENTS, check_positive, dataset_reachable, parse_script_args
from sgmae_training.data.images import check_num_channels, image_processor_for, image_statistics
from sgmae_training.data.segmentation import (
    SegmentationDataArguments,
    check_segmentation_arguments,
    label_names,
    load_segmentation_data,
)
from sgmae_training.engine import start_run
from sgmae_training.hub import (
    check_checkpoint_kind,
    push_to_hub,
    save_hub_folder,
    segmentation_card,
    write_json_atomically,
)
from sgmae_training.pyramid import as_pyramid, encoder_and_config, model_building, with_encoder
from sgmae_training.segmentation import RECIPE_STEPS, SegmentationArguments, Task, finetune

logger = logging.getLogger("run_segmentation")
# An encoder (SG-MAE or ViTMAE) starts a model; a segmentation checkpoint is continued.
CHECKPOINT_KINDS = {
    "sgmae": "an SG-MAE (pre-training or classification)",
    "sgmae_upernet": "an SG-MAE segmentation",
    "vit_mae": "a transformers ViTMAE",
}


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
def build_model(
    model_args: ModelArguments, data_args: SegmentationDataArguments, names: list[str]
) -> SGMAEForSemanticSegmentation:
    """UperNet on the SG-MAE backbone at the crop size, its encoder from a checkpoint (position table resized to
    the crop's grid) or a config; a segmentation checkpoint is continued (with new heads when its classes differ)."""
    labels = {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}
    path, cache_dir = model_args.model_name_or_path, data_args.cache_dir
    with model_building("segmentation", path or model_args.config_name):
        if path and check_checkpoint_kind(path, cache_dir, kinds=CHECKPOINT_KINDS) == "sgmae_upernet":
            continued = {"ignore_mismatched_sizes": True, "loss_ignore_index": data_args.ignore_index, **labels}
            model = SGMAEForSemanticSegmentation.from_pretrained(path, cache_dir=cache_dir, **continued)
            check_num_channels(data_args.num_channels, model.config.backbone_config, path)
            return model
        encoder, backbone_config = encoder_and_config(path, model_args.config_name, cache_dir, data_args.num_channels)
        as_pyramid(backbone_config, data_args.crop_size, model_args.drop_path, model_args.out_indices)
        config = SGMAEUperNetConfig(
            backbone_config=backbone_config,
            hidden_size=model_args.head_channels,
            use_auxiliary_head=model_args.auxiliary_loss_weight > 0,
            auxiliary_loss_weight=model_args.auxiliary_loss_weight,
            auxiliary_in_channels=backbone_config.hidden_size,
            loss_ignore_index=data_args.ignore_index,
            **labels,
        )
    model = SGMAEForSemanticSegmentation(config)
    return with_encoder(model, model.backbone, encoder)


# ----- main ----------------------------------------------------------------------------------------------------------
def main() -> None:
    model_args, data_args, args = parse_args()
    names = label_names(data_args)
    accumulation = args.gradient_accumulation_steps
    accelerator = start_run(
        args.output_dir, args.seed, accumulation, args.mixed_precision, args.report_to, args.ddp_timeout
    )
    with dataset_reachable(data_args.dataset_name):
        data = load_segmentation_data(data_args)
    model = build_model(model_args, data_args, names)
    backbone_config = model.config.backbone_config
    if data_args.photometric_distortion and backbone_config.num_channels != 3:
        channels = backbone_config.num_channels
        raise SystemExit(
            f"error: --photometric_distortion takes RGB images, not {channels} channels; pass "
            "--photometric_distortion false"
        )
    statistics = image_statistics(
        data_args, backbone_config, data.train, data.image_column, model_args.model_name_or_path
    )
    processor = image_processor_for(backbone_config, statistics)  # MAE's mean/std unless the data need others
    reduced = " (labels reduced)" if data_args.reduce_labels else ""
    columns = (data.image_column, data.mask_column, reduced, accelerator.num_processes)
    logger.info(
        "segmentation of %d classes (%s...), image column %r, mask column %r%s, %d processes",
        len(names),
        ", ".join(names[:3]),
        *columns,
    )
    task = Task(accelerator, data_args, args, model, data, list(processor.image_mean), list(processor.image_std))
    state = finetune(task)

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
        save_outputs(model_args, task, results)
    accelerator.end_training()


def save_outputs(model_args: ModelArguments, task: Task, results: dict) -> None:
    """eval_results.json, and the model folder with its processor (resize to the crop, the training normalisation)
    and model card; uploaded with --push_to_hub."""
    data_args, args = task.data_args, task.args
    output = Path(args.output_dir)
    write_json_atomically(output / "eval_results.json", results)
    logger.info("mIoU %s over %d images", results.get("eval_mean_iou"), results["eval_samples"])
    processor = SegformerImageProcessor(
        size={"height": data_args.crop_size, "width": data_args.crop_size},
        image_mean=task.image_mean,
        image_std=task.image_std,
        do_reduce_labels=data_args.reduce_labels,
    )
    card = segmentation_card(model_args, data_args, args, task.model, results)
    task.model.eval()
    save_hub_folder(task.model, processor, output, card)
    logger.info("saved the segmentation model to %s", output)
    if args.push_to_hub:
        push_to_hub(args.output_dir, args.hub_model_id, args.hub_token)


if __name__ == "__main__":
    main()
