"""What a run leaves for users: a Hub-ready folder with its model card, and the upload."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import PreTrainedConfig, PreTrainedModel, ViTImageProcessor

from modeling_sgmae.hub_access import hub_advice, is_hub_id

from .arguments import hub_unreachable
from .checkpoints import checkpoint_dirs
from .data.loading import DataArguments
from .training_state import TrainingState

# The checkpoints an encoder can come from: model_type -> how an error message names them.
CHECKPOINT_KINDS = {"sgmae": "an SG-MAE (pre-training or classification)", "vit_mae": "a transformers ViTMAE"}
CHECKPOINT_TYPES = tuple(CHECKPOINT_KINDS)


def check_checkpoint_kind(
    path: str,
    cache_dir: str | None = None,
    argument: str = "--model_name_or_path",
    kinds: dict[str, str] | None = None,
) -> str:
    """The checkpoint's model_type, or one `error:` line when it is not one of `kinds` (default: an SG-MAE or
    transformers ViTMAE checkpoint), is a folder without config.json, or is a Hub id the Hub cannot give (found out
    with one quick request, not after huggingface_hub's half-minute of retries)."""
    kinds = kinds or CHECKPOINT_KINDS
    wanted = " or ".join(kinds.values())
    unreachable = hub_unreachable(path)
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(path, cache_dir=cache_dir)
    except (OSError, ValueError) as error:
        reason = unreachable or " ".join(str(error).split())  # one line
        if is_hub_id(path):
            raise SystemExit(
                f"error: {path!r} is not a local folder and could not be fetched from the Hub ({reason}); "
                f"{hub_advice(path, reason)}"
            ) from error
        if not Path(path).expanduser().exists():
            reason = "no such file or folder"
        raise SystemExit(f"error: cannot read a model configuration from {path!r}: {reason}") from error
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise SystemExit(
            f"error: {path!r} has no config.json, so it is not a model folder{folder_kind(Path(path))}; "
            f"{argument} needs {wanted} checkpoint"
        )
    model_type = config_dict.get("model_type")
    if model_type not in kinds:
        found = f"is a {model_type!r} checkpoint" if model_type else "has a config.json without a model_type"
        raise SystemExit(f"error: {path!r} {found}; {argument} needs {wanted} checkpoint")
    return model_type


def folder_kind(folder: Path) -> str:
    """What a folder without config.json is, when it is recognisable: `: it is ...`, or nothing."""
    if (folder / "eval_results.json").is_file():
        return ": it is an evaluation's output folder (eval_results.json; knn and frozen save no model)"
    checkpoints = checkpoint_dirs(folder)
    if checkpoints:
        return f": it is a training run without its final model yet; its newest checkpoint is {checkpoints[-1]}"
    if not any(folder.iterdir()):
        return ": it is empty"
    return ""


def masking_schedule(config: PreTrainedConfig, start_step: int | None, finished: bool) -> str:
    """How a run masks, in the words that the training log (before) and the model card (after) share."""
    if config.mask_strategy == "random":
        return "random"
    if start_step is not None:
        return f"self-guided, informed from step {start_step}"
    if finished:  # an automatic start that never fired
        return "self-guided, never started (masks stayed random)"
    return "self-guided, informed once the decoder's mask-token share overtakes the visible share (automatic start)"


def save_hub_folder(
    model: PreTrainedModel, processor: ViTImageProcessor, output_dir: str | Path, model_card: str
) -> None:
    """Weights (safetensors), config with auto_map, the model's .py files, processor config and model card.

    Written to a temporary folder first and moved in file by file (each move atomic), so a run killed while saving
    leaves no truncated file; the output folder's checkpoints are left alone.
    """
    staging = Path(output_dir) / ".tmp-final"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    (staging / "README.md").write_text(model_card, encoding="utf-8")
    for path in staging.iterdir():
        os.replace(path, Path(output_dir) / path.name)
    staging.rmdir()


def write_json_atomically(path: str | Path, record: dict) -> None:
    """A results file that is either complete or absent, whatever moment the run is killed at."""
    temporary = Path(path).with_name(f".tmp-{Path(path).name}")
    temporary.write_text(json.dumps(record, indent=2))
    os.replace(temporary, path)


def model_card(metadata: dict[str, Any], title: str, body: str) -> str:
    """A model card: YAML front matter (library_name, pipeline_tag, tags, datasets, license, ...) and Markdown."""
    import yaml

    front = yaml.safe_dump(metadata, sort_keys=False).strip()
    return f"---\n{front}\n---\n\n# {title}\n\n{body.strip()}\n"


def push_to_hub(output_dir: str, hub_model_id: str, token: str | None = None) -> None:
    """Upload the output folder (needs network access and a token)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(hub_model_id, exist_ok=True)
    api.upload_folder(repo_id=hub_model_id, folder_path=output_dir, ignore_patterns=["checkpoint-*", ".tmp-*", "runs"])


def dataset_id(data_args: DataArguments) -> str:
    """A Hub-style dataset name for the card: the id itself, or a local folder's name."""
    source = data_args.dataset_name or data_args.train_dir or "images"
    return Path(source).name if Path(source).exists() else source


def fine_tuned_metadata(
    model_args, data_args, args, task: dict, tags: list[str], metrics: list[dict]
) -> dict[str, Any]:
    """The front matter of a fine-tuned model's card: the task's pipeline, tags, dataset, `model-index` with the
    metrics, and the base model when it is a Hub id."""
    data_name = dataset_id(data_args)
    dataset = {"name": data_name, "type": data_name, "split": data_args.validation_split}
    if data_args.dataset_config_name:
        dataset["config"] = data_args.dataset_config_name
    results = [{"task": task, "dataset": dataset, "metrics": metrics}]
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": task["type"],
        "license": "apache-2.0",
        "tags": tags,
        "datasets": [data_name],
        "model-index": [{"name": args.hub_model_id or Path(args.output_dir).name, "results": results}],
    }
    base = model_args.model_name_or_path
    if base and not Path(base).exists():
        metadata["base_model"] = base
    return metadata


def encoder_rows(model_args, backbone: PreTrainedConfig) -> str:
    """The Training table's encoder and architecture rows of a segmentation or detection card."""
    encoder = model_args.model_name_or_path or f"random init ({model_args.config_name})"
    return (
        f"| encoder | {encoder} |\n"
        f"| architecture | {backbone.num_hidden_layers} x {backbone.hidden_size}, patch {backbone.patch_size} |"
    )


def classification_card(model_args, data_args, args, model, results: dict) -> str:
    """The model card of a fine-tuned or probed classifier: front matter with its `model-index` results, usage, results
    and the training table."""
    protocol = {"finetune": "fine-tuning", "linear_probe": "linear probing"}[args.protocol]
    metadata = classification_metadata(model_args, data_args, args, results, protocol)
    body = classification_body(model_args, data_args, args, model.config, results, protocol)
    return model_card(metadata, f"SG-MAE {protocol}: {Path(args.output_dir).name}", body)


def classification_metadata(model_args, data_args, args, results: dict, protocol: str) -> dict[str, Any]:
    """The card's front matter: pipeline, tags, dataset, the base model when it is a Hub id, and `model-index`."""
    metrics = [
        {"type": "accuracy", "value": round(results["eval_top1"], 4), "name": f"Top-1 accuracy ({protocol})"},
        {"type": "top_5_accuracy", "value": round(results["eval_top5"], 4), "name": f"Top-5 accuracy ({protocol})"},
    ]
    task = {"type": "image-classification", "name": "Image Classification"}
    tags = ["sgmae", "mae", "image-classification", "vision", args.protocol.replace("_", "-")]
    return fine_tuned_metadata(model_args, data_args, args, task, tags, metrics)


def classification_body(model_args, data_args, args, config, results: dict, protocol: str) -> str:
    """The card's Markdown: how to use it, its results and how it was trained."""
    name = args.hub_model_id or Path(args.output_dir).name
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

## Results on {dataset_id(data_args)} ({data_args.validation_split}, {results["eval_samples"]} images)
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
        return body + (
            f"| layer decay / drop path | {args.layer_decay} / {config.drop_path_rate} |\n"
            f"| label smoothing / mixup / cutmix | {args.label_smoothing} / {args.mixup} / {args.cutmix} |\n"
        )
    return body + "| probe | BatchNorm1d (no affine) + Linear, folded into one Linear |\n"


def pretraining_card(
    model_args, data_args, args, model, state: TrainingState, demo: bool, global_batch: int, num_processes: int
) -> str:
    config = model.config
    dataset = "scikit-image sample photographs (demo)" if demo else dataset_id(data_args)
    if data_args.dataset_config_name and not demo:
        dataset += f" ({data_args.dataset_config_name})"
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "image-feature-extraction",
        "license": "apache-2.0",
        "tags": ["sgmae", "mae", "self-supervised-learning", "masked-image-modeling", "vision"],
    }
    if data_args.dataset_name:
        metadata["datasets"] = [dataset_id(data_args)]  # a local folder's name, never its path
    strategy = "self-guided informed masking" if config.mask_strategy == "self_guided" else "random masking (MAE)"
    masking = masking_schedule(config, model.informed_masking_start_step, finished=True)
    loss_text = f"{state.train_loss:.4f}" if state.train_loss is not None else "n/a"
    body = f"""
Self-Guided Masked Autoencoder (SG-MAE, Shin et al., NeurIPS 2024) pre-trained with `run_pretraining.py`
({strategy}). Load it with `trust_remote_code=True`:

```python
from transformers import AutoImageProcessor, AutoModel
processor = AutoImageProcessor.from_pretrained("{args.hub_model_id or args.output_dir}")
model = AutoModel.from_pretrained("{args.hub_model_id or args.output_dir}", trust_remote_code=True)
features = model(**processor(images, return_tensors="pt")).last_hidden_state  # never masks
```

**Try it on your own photos.** The SG-MAE repository's `app.py` opens this checkpoint in a browser page
(`pip install -e ".[demo]"` in a clone, then `python app.py --model <model id>`): upload a photo and see the model's
own masks, as pre-training builds them (the Normalized-Cut bi-partition of its patch features, the informed mask,
the hints and the reconstruction), and move the mask ratio, hint ratio, feature layer, graph and object-part rule to
see how each changes them.

## Training
| | |
|---|---|
| data | {dataset} |
| encoder | {config.num_hidden_layers} x {config.hidden_size}, patch {config.patch_size}, image {config.image_size} |
| decoder | {config.decoder_num_hidden_layers} x {config.decoder_hidden_size} |
| mask ratio | {config.mask_ratio} |
| masking | {masking} |
| optimiser steps | {state.step} of {state.total_steps} (epochs: {state.epoch}) |
| images seen | {state.samples_seen} |
| global batch | {global_batch} ({num_processes} process{"es" if num_processes > 1 else ""}) |
| base lr / weight decay | {args.base_learning_rate} / {args.weight_decay} |
| final training loss | {loss_text} |
"""
    return model_card(metadata, f"SG-MAE: {Path(args.output_dir).name}", body)


def segmentation_card(model_args, data_args, args, model, results: dict) -> str:
    """The model card of run_segmentation.py: the pipeline call, mIoU and pixel accuracy (model-index), the recipe and
    the per-class IoU."""
    name = args.hub_model_id or Path(args.output_dir).name
    data_name, split = dataset_id(data_args), data_args.validation_split
    metrics = [
        {"type": "mean_iou", "value": round(results["eval_mean_iou"], 4), "name": "mIoU"},
        {"type": "accuracy", "value": round(results["eval_overall_accuracy"], 4), "name": "Pixel accuracy"},
    ]
    task = {"type": "image-segmentation", "name": "Semantic Segmentation"}
    tags = ["sgmae", "mae", "upernet", "semantic-segmentation", "vision"]
    metadata = fine_tuned_metadata(model_args, data_args, args, task, tags, metrics)
    ious = results["eval_per_category_iou"].items()
    per_class = "\n".join(f"| {label} | {'n/a' if iou is None else f'{iou:.4f}'} |" for label, iou in ious)
    crop, mode = data_args.crop_size, data_args.eval_mode
    body = f"""
transformers' UperNet on an SG-MAE (Self-Guided Masked Autoencoder, Shin et al., NeurIPS 2024) encoder, fine-tuned
with `run_segmentation.py`. Use it with `trust_remote_code=True`:

```python
from transformers import pipeline
segmenter = pipeline("image-segmentation", model="{name}", trust_remote_code=True)
masks = segmenter("photo.jpg")  # one {{"label", "mask"}} per class present
```

The pipeline resizes an image to {crop}x{crop}; the scores below come from {mode} evaluation (short side {crop},
scored at the original resolution).

## Results on {data_name} ({split}, {results["eval_samples"]} images)
| mIoU | mean accuracy | pixel accuracy |
|---|---|---|
| {results["eval_mean_iou"]:.4f} | {results["eval_mean_accuracy"]:.4f} | {results["eval_overall_accuracy"]:.4f} |

{segmentation_recipe(model_args, data_args, args, model, results)}
## IoU per class
| class | IoU |
|---|---|
{per_class}
"""
    return model_card(metadata, f"SG-MAE UperNet: {Path(args.output_dir).name}", body)


def segmentation_recipe(model_args, data_args, args, model, results: dict) -> str:
    """The segmentation card's Training table: encoder, architecture, crops, pyramid, schedule."""
    backbone = model.config.backbone_config
    return f"""## Training
| | |
|---|---|
{encoder_rows(model_args, backbone)}
| crops | {backbone.image_size} x {backbone.image_size}, {data_args.eval_mode} evaluation |
| pyramid | blocks {backbone.out_indices}, strides p/4, p/2, p, 2p; UperNet width {model.config.hidden_size} |
| optimiser steps | {results.get("step", 0)} of {results.get("total_steps", 0)} |
| lr / weight decay | {args.learning_rate} / {args.weight_decay} (AdamW) |
| layer decay / drop path | {args.layer_decay} / {backbone.drop_path_rate} |
| schedule | {args.warmup_steps} warm-up steps, poly power {args.poly_power} |
"""


def detection_card(model_args, data_args, args, model, results: dict) -> str:
    """The model card of a detection run: the pipeline calls, box and mask AP (model-index), the recipe."""
    backbone = model.config.backbone_config
    name = args.hub_model_id or Path(args.output_dir).name
    data_name = dataset_id(data_args)
    metrics = [
        {"type": "map", "value": round(results[f"eval_{kind}_ap"], 4), "name": f"AP ({label})"}
        for kind, label in (("box", "boxes"), ("mask", "masks"))
    ]
    task = {"type": "object-detection", "name": "Object Detection"}
    tags = ["sgmae", "mae", "conditional-detr", "object-detection", "instance-segmentation", "vision"]
    metadata = fine_tuned_metadata(model_args, data_args, args, task, tags, metrics)

    def row(kind: str) -> str:
        names = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
        values = [results.get(f"eval_{kind}_{metric}") for metric in names]
        return " | ".join("n/a" if value is None else f"{value:.4f}" for value in values)

    head = model.config
    layers = f"{head.encoder_layers} + {head.decoder_layers} layers of width {head.d_model}"
    body = f"""
transformers' Conditional DETR with its mask head on an SG-MAE (Self-Guided Masked Autoencoder, Shin et al., NeurIPS
2024) encoder, fine-tuned with `run_detection.py`. It predicts boxes and an instance mask per box. Use it with
`trust_remote_code=True`:

```python
from transformers import pipeline
detector = pipeline("object-detection", model="{name}", trust_remote_code=True)
boxes = detector("photo.jpg", threshold=0.5)  # one {{"score", "label", "box"}} per object
```

The instance masks are the model's `pred_masks` (one per query, logits at a quarter of the input's resolution):
upsample a detection's query mask to the image and keep the pixels above 0, as the evaluation below did.

Images are resized to {backbone.image_size}x{backbone.image_size}; boxes and masks come back in the image's own
pixels.

## Results on {data_name} ({data_args.validation_split}, {results["eval_samples"]} images, COCO metrics)
| | AP | AP50 | AP75 | AP small | AP medium | AP large |
|---|---|---|---|---|---|---|
| boxes | {row("box")} |
| masks | {row("mask")} |

## Training
| | |
|---|---|
{encoder_rows(model_args, backbone)}
| pyramid | blocks {backbone.out_indices}, strides p/4, p/2, p, 2p |
| head | Conditional DETR, {head.num_queries} queries, {layers} |
| optimiser steps | {results.get("step", 0)} of {results.get("total_steps", 0)} |
| lr / weight decay / layer decay | {args.learning_rate} / {args.weight_decay} / {args.layer_decay} (AdamW) |
"""
    return model_card(metadata, f"SG-MAE Conditional DETR: {Path(args.output_dir).name}", body)
