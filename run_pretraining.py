#!/usr/bin/env python
"""Pre-train SG-MAE (or plain MAE with --mask_strategy random) with Accelerate over a `datasets` split or stream.

    accelerate launch run_pretraining.py --dataset_name uoft-cs/cifar10 \
        --config_name configuration/models/sgmae-vit-tiny-patch4-cifar.json --output_dir outputs/sgmae-cifar

With no dataset argument it runs a short demo on photographs shipped with scikit-image (`pip install .[demo]`).
Arguments can also come from one JSON/YAML file: `python run_pretraining.py args.yaml`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from modeling_sgmae import MaskType, SGMAEConfig, SGMAEForPreTraining
from modeling_sgmae.script_utils import (
    IMAGE_COLUMNS,
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
    parameter_groups,
    parse_script_args,
    prepare_images,
    push_to_hub,
    resolve_resume,
    save_checkpoint,
    save_hub_folder,
    save_mask_panel,
    synchronized_batches,
    train_transform,
    training_length,
)

logger = logging.getLogger("run_pretraining")
DEMO_CONFIG = Path(__file__).parent / "configuration" / "models" / "sgmae-vit-tiny-patch4-cifar.json"


@dataclass
class ModelArguments:
    """Which model to pre-train and how it masks."""

    config_name: str | None = field(
        default=None, metadata={"help": "SGMAEConfig JSON (e.g. configuration/models/*.json) for a new model."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue from an SG-MAE or transformers ViTMAE checkpoint."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "Comma-separated config fields, e.g. 'hint_ratio=0.1,mask_feature_layer=6'."}
    )
    mask_strategy: str | None = field(default=None, metadata={"help": "random (MAE) or self_guided (SG-MAE)."})
    informed_masking_start: float | None = field(
        default=None, metadata={"help": "Fraction of the schedule after which masks are informed (default 0.125)."}
    )
    informed_masking_start_epoch: float | None = field(
        default=None, metadata={"help": "Epoch at which masks become informed (overrides the fraction)."}
    )
    informed_masking_start_step: int | None = field(
        default=None, metadata={"help": "Optimiser step at which masks become informed (overrides the fraction)."}
    )
    informed_masking_auto_start: bool = field(
        default=False, metadata={"help": "Start when the decoder's mask-token attention overtakes visible tokens."}
    )


@dataclass
class PretrainingArguments:
    """Optimisation, schedule, logging and output."""

    output_dir: str = field(default="outputs/sgmae-demo", metadata={"help": "Where checkpoints and the model go."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, data order, augmentation and masks."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Images per device per step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    num_train_epochs: float = field(default=3, metadata={"help": "Epochs (ignored if --max_train_steps is set)."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Total optimiser steps."})
    base_learning_rate: float = field(default=1.5e-4, metadata={"help": "lr = base_lr x global batch / 256."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on norms/biases/tokens)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (beta1 is 0.9)."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Share of the schedule in linear warm-up (MAE: 0.1)."})
    max_grad_norm: float | None = field(default=None, metadata={"help": "Clip gradients to this norm."})
    mixed_precision: str | None = field(default=None, metadata={"help": "no, bf16 or fp16 (default: launcher's)."})
    checkpointing_steps: str | None = field(default="epoch", metadata={"help": "N (steps), 'epoch' or 'none'."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "Checkpoint folder or 'latest'."})
    logging_steps: int = field(default=10, metadata={"help": "Log loss, lr and masking statistics every N steps."})
    visualization_steps: int | None = field(
        default=None, metadata={"help": "Write a mask/reconstruction PNG every N steps (always at the end)."}
    )
    exploitation_check_steps: int | None = field(
        default=None, metadata={"help": "Measure decoder exploitation rates every N steps (default: 4 per epoch)."}
    )
    report_to: str = field(default="none", metadata={"help": "Accelerate trackers: tensorboard, none or all."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the output folder to --hub_model_id."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository for --push_to_hub."})
    hub_token: str | None = field(default=None, metadata={"help": "Token for --push_to_hub."})


def parse_args() -> tuple[ModelArguments, DataArguments, PretrainingArguments]:
    return parse_script_args(HfArgumentParser((ModelArguments, DataArguments, PretrainingArguments)))


def demo_dataset() -> datasets.Dataset:
    """Photographs shipped with scikit-image, repeated so that a short run sees many random crops of them."""
    try:
        from skimage import data as samples
    except ImportError as error:
        raise SystemExit(
            "error: the demo needs scikit-image (`pip install .[demo]`) or pass --dataset_name"
        ) from error
    from PIL import Image

    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"]
    images = [Image.fromarray(getattr(samples, name)()).convert("RGB") for name in names]
    images = [image.resize((128, 128 * image.height // image.width)) for image in images]
    return datasets.Dataset.from_dict({"image": images * 256})


def build_model(model_args: ModelArguments) -> SGMAEForPreTraining:
    overrides = {}
    if model_args.config_overrides:
        for item in model_args.config_overrides.split(","):
            key, _, value = item.partition("=")
            overrides[key.strip()] = json.loads(value) if value.strip()[:1] in "0123456789-[{tfn" else value.strip()
    for name in ("mask_strategy", "informed_masking_start", "informed_masking_start_step"):
        if getattr(model_args, name) is not None:
            overrides[name] = getattr(model_args, name)
    if model_args.informed_masking_auto_start:
        overrides["informed_masking_auto_start"] = True
    if model_args.model_name_or_path:
        check_checkpoint_kind(model_args.model_name_or_path)
        return SGMAEForPreTraining.from_pretrained(model_args.model_name_or_path, **overrides)
    config_file = model_args.config_name or DEMO_CONFIG
    config = SGMAEConfig.from_json_file(config_file)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise SystemExit(f"error: unknown config field {key!r} in --config_overrides")
        setattr(config, key, value)
    config.validate_fields()
    return SGMAEForPreTraining(config)


def main() -> None:
    model_args, data_args, args = parse_args()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
    )
    check_launch(accelerator)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    if not accelerator.is_main_process:
        datasets.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)

    # ----- data -----
    demo = not (data_args.dataset_name or data_args.train_dir)
    if demo:
        train_data = eval_data = demo_dataset()
        data_args.streaming = False
    else:
        train_data = load_split(data_args, data_args.train_split, data_args.streaming)
        has_eval = data_args.dataset_name or data_args.validation_dir
        eval_data = load_split(data_args, data_args.validation_split, False) if has_eval else None
    image_column = find_column(train_data.features, data_args.image_column, IMAGE_COLUMNS, "image")
    train_data = prepare_images(limit_samples(train_data, data_args.max_train_samples), image_column)
    probe_source = eval_data if eval_data is not None else (None if data_args.streaming else train_data)
    probe_rows = [probe_source[index] for index in range(min(8, len(probe_source)))] if probe_source else None
    # ----- model and optimisation -----
    model = build_model(model_args)
    config = model.config
    processor = image_processor_for(config)
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    steps_per_epoch, total_steps = training_length(
        train_data, data_args, global_batch, args.num_train_epochs, args.max_train_steps
    )
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    if model_args.informed_masking_start_epoch is not None:
        config.informed_masking_start_step = round(model_args.informed_masking_start_epoch * steps_per_epoch)
        config.validate_fields()
    learning_rate = args.base_learning_rate * global_batch / 256
    optimizer = torch.optim.AdamW(
        parameter_groups(model, args.weight_decay), lr=learning_rate, betas=(0.9, args.adam_beta2)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(round(args.warmup_ratio * total_steps), total_steps)
    )
    # The scheduler is stepped once per optimiser step by hand (a prepared one steps once per process).
    model, optimizer = accelerator.prepare(model, optimizer)
    objects = {"scheduler": scheduler}  # checkpointed beside Accelerate's state
    unwrapped: SGMAEForPreTraining = accelerator.unwrap_model(model)

    state = {
        "step": 0,
        "epoch": 0,
        "samples_in_epoch": 0,
        "samples_seen": 0,
        "skipped_images": 0,
        "train_seconds": 0.0,
    }
    resume_path = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        state = load_checkpoint(accelerator, resume_path, objects)
        logger.info("resumed from %s at step %d (epoch %d)", resume_path, state["step"], state["epoch"])
    unwrapped.set_training_progress(state["step"], total_steps)
    if accelerator.is_main_process:
        accelerator.init_trackers("sgmae_pretraining", config={k: str(v) for k, v in asdict(args).items()})

    collate = ImageCollator(train_transform(processor), image_column)
    probe = ImageCollator(eval_transform(processor), image_column)(probe_rows) if probe_rows else None
    exploitation_every = args.exploitation_check_steps or max(steps_per_epoch // 4, 1)
    start = unwrapped.informed_masking_start_step
    if config.mask_strategy == "random":
        phases = ""
    elif start is None:
        phases = ", informed once the decoder's mask-token share overtakes the visible share (automatic start)"
    else:
        phases = f", informed from step {start}"
    logger.info(
        "training %d steps (%d epochs of %d steps), global batch %d, lr %.2e, %s masking%s",
        total_steps, num_epochs, steps_per_epoch, global_batch, learning_rate, config.mask_strategy, phases,
    )  # fmt: skip

    progress = tqdm(total=total_steps, initial=state["step"], disable=not accelerator.is_main_process)
    window = {"loss": 0.0, "micro": 0, "informed": 0, "fallback": 0, "images": 0, "part": 0, "density": 0.0}
    logs: dict[str, float] = {}
    started, samples_at_start, seconds_at_start = time.perf_counter(), state["samples_seen"], state["train_seconds"]
    model.train()
    while state["step"] < total_steps:
        loader = epoch_loader(
            train_data, accelerator, state, data_args, args.per_device_train_batch_size, collate, args.seed
        )
        epoch_start = state["samples_in_epoch"]
        for batch in synchronized_batches(loader, accelerator):
            if state["step"] >= total_steps:  # checked before training, so a schedule ending with an epoch ends it
                break
            unwrapped.set_training_progress(state["step"], total_steps)
            with accelerator.accumulate(model):
                outputs = model(batch["pixel_values"])
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            check_finite(outputs.loss.detach(), state["step"], args.output_dir)
            counts = accelerator.reduce(
                torch.tensor([len(batch["pixel_values"]), int(batch["skipped"])], device=accelerator.device), "sum"
            )
            state["samples_in_epoch"] += int(counts[0])
            state["samples_seen"] += int(counts[0])
            state["skipped_images"] += int(counts[1])
            window["loss"] += outputs.loss.item()
            window["micro"] += 1
            window["images"] += len(outputs.mask_type)
            window["informed"] += int((outputs.mask_type == MaskType.INFORMED).sum())
            window["fallback"] += int((outputs.mask_type == MaskType.FALLBACK).sum())
            informed = outputs.object_part_size >= 0
            window["part"] += int(outputs.object_part_size[informed].sum())
            window["density"] += float(outputs.edge_density[informed].sum())
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state["step"] += 1
            state["train_seconds"] = seconds_at_start + time.perf_counter() - started
            progress.update(1)
            step = state["step"]
            if step % args.logging_steps == 0 or step == total_steps:
                num_informed = max(window["informed"], 1)
                logs = {
                    "loss": window["loss"] / window["micro"],
                    "lr": scheduler.get_last_lr()[0],
                    "img_per_s": (state["samples_seen"] - samples_at_start) / (time.perf_counter() - started),
                    "informed_share": window["informed"] / window["images"],
                    "fallback_share": window["fallback"] / window["images"],
                    "object_part_size": window["part"] / num_informed,
                    "edge_density": window["density"] / num_informed,
                }
                progress.set_postfix(
                    loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.1e}", img_s=f"{logs['img_per_s']:.0f}",
                    phase="informed" if unwrapped.informed_masking_active else "random",
                )  # fmt: skip
                accelerator.log(logs, step=step)
                window = dict.fromkeys(window, 0)
            if probe is not None and config.mask_strategy == "self_guided" and step % exploitation_every == 0:
                waiting = unwrapped.informed_masking_start_step is None
                rates = unwrapped.record_exploitation_rates(probe["pixel_values"].to(accelerator.device))
                if waiting and unwrapped.informed_masking_start_step is not None:
                    logger.info(
                        "automatic start: informed masks from step %d (decoder mask-token share %.3f > visible %.3f)",
                        unwrapped.informed_masking_start_step, float(rates[:, 1].mean()), float(rates[:, 0].mean()),
                    )  # fmt: skip
                accelerator.log(
                    {
                        "exploitation_visible": float(rates[:, 0].mean()),
                        "exploitation_mask": float(rates[:, 1].mean()),
                    },
                    step=step,
                )
            if probe is not None and args.visualization_steps and step % args.visualization_steps == 0:
                visualize(accelerator, unwrapped, probe, processor, Path(args.output_dir) / f"masks-step{step}.png")
            if args.checkpointing_steps not in (None, "none", "epoch") and step % int(args.checkpointing_steps) == 0:
                save_checkpoint(accelerator, args.output_dir, state, args.save_total_limit, objects, config)
        else:  # the epoch ran to its end
            if epoch_start == state["samples_in_epoch"] == 0:
                raise SystemExit("error: the training split yielded no full batch of images")
            state["epoch"] += 1
            state["samples_in_epoch"] = 0
            if args.checkpointing_steps == "epoch":
                save_checkpoint(accelerator, args.output_dir, state, args.save_total_limit, objects, config)
    progress.close()
    unwrapped.set_training_progress(state["step"], total_steps)  # the saved model says how far it was trained
    if state["skipped_images"]:
        logger.warning("skipped %d corrupt images", state["skipped_images"])

    # ----- output -----
    accelerator.wait_for_everyone()
    final_loss = logs.get("loss")
    if accelerator.is_main_process:
        if probe is not None:
            visualize(accelerator, unwrapped, probe, processor, Path(args.output_dir) / "masks.png")
        card = pretraining_card(model_args, data_args, args, unwrapped, state, total_steps, final_loss, demo)
        save_hub_folder(unwrapped, processor, args.output_dir, card)
        (Path(args.output_dir) / "train_results.json").write_text(
            json.dumps(
                {
                    **state,
                    "total_steps": total_steps,
                    "num_processes": accelerator.num_processes,
                    "final_loss": final_loss,
                },
                indent=2,
            )
        )
        logger.info("saved the model to %s", args.output_dir)
        if args.push_to_hub:
            push_to_hub(args.output_dir, args.hub_model_id, args.hub_token)
    accelerator.end_training()


def visualize(accelerator, model: SGMAEForPreTraining, probe: dict, processor, path: Path) -> None:
    if accelerator.is_main_process:
        save_mask_panel(model, probe["pixel_values"].to(accelerator.device), processor, path)


def pretraining_card(model_args, data_args, args, model, state, total_steps, final_loss, demo: bool) -> str:
    config = model.config
    dataset = "scikit-image sample photographs (demo)" if demo else data_args.dataset_name or data_args.train_dir
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "image-feature-extraction",
        "license": "apache-2.0",
        "tags": ["sgmae", "mae", "self-supervised-learning", "masked-image-modeling", "vision"],
    }
    if data_args.dataset_name:
        metadata["datasets"] = [data_args.dataset_name]
    strategy = "self-guided informed masking" if config.mask_strategy == "self_guided" else "random masking (MAE)"
    start = model.informed_masking_start_step
    loss_text = f"{final_loss:.4f}" if final_loss is not None else "n/a"
    body = f"""
Self-Guided Masked Autoencoder (SG-MAE, Shin et al., NeurIPS 2024) pre-trained with `run_pretraining.py`
({strategy}). Load it with `trust_remote_code=True`:

```python
from transformers import AutoModel, AutoImageProcessor
model = AutoModel.from_pretrained("{args.hub_model_id or args.output_dir}", trust_remote_code=True)
```

## Training
| | |
|---|---|
| data | {dataset} |
| encoder | {config.num_hidden_layers} x {config.hidden_size}, patch {config.patch_size}, image {config.image_size} |
| decoder | {config.decoder_num_hidden_layers} x {config.decoder_hidden_size} |
| mask ratio | {config.mask_ratio} |
| masking | {config.mask_strategy}; informed from step {start if start is not None else "n/a"} |
| optimiser steps | {state["step"]} of {total_steps} (epochs: {state["epoch"]}) |
| images seen | {state["samples_seen"]} |
| global batch | {args.per_device_train_batch_size * args.gradient_accumulation_steps} per process |
| base lr / weight decay | {args.base_learning_rate} / {args.weight_decay} |
| final training loss | {loss_text} |
"""
    return model_card(metadata, f"SG-MAE: {Path(args.output_dir).name}", body)


if __name__ == "__main__":
    main()
