"""Code shared by `run_pretraining.py` and `run_classification.py`: data, transforms, launch checks, checkpoints,
Hub-ready output. Not part of a checkpoint's remote code."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from datasets.distributed import split_dataset_by_node
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from transformers import HfArgumentParser, PreTrainedConfig, PreTrainedModel, ViTImageProcessor

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label")
MAE_MEAN = (0.485, 0.456, 0.406)
MAE_STD = (0.229, 0.224, 0.225)
STATE_FILE = "trainer_state.json"
OBJECTS_FILE = "training_objects.pt"  # state_dicts of what Accelerate does not prepare (scheduler, probe)
CHECKPOINT_TYPES = ("sgmae", "vit_mae")


@dataclass
class DataArguments:
    """Where the images come from (shared by both scripts)."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id or local folder in the Hub layout (e.g. parquet shards)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder for training (class subfolders)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder for evaluation."})
    train_split: str = field(default="train", metadata={"help": "Split used for training."})
    validation_split: str = field(default="test", metadata={"help": "Split used for evaluation/visualisation."})
    image_column: str | None = field(
        default=None, metadata={"help": f"Image column; auto-detected among {IMAGE_COLUMNS} when unset."}
    )
    streaming: bool = field(default=False, metadata={"help": "Stream the training split (IterableDataset)."})
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Shuffle buffer of a streamed split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation images."})
    num_train_samples: int | None = field(
        default=None, metadata={"help": "Size of a streamed training split whose size the dataset does not state."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for datasets and models."})
    dataloader_num_workers: int = field(default=2, metadata={"help": "Data-loading worker processes per device."})


def check_launch(accelerator: Accelerator) -> None:
    """Refuse a launch whose processes are not joined (each would train its own copy on the same data)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but Accelerate sees a single process: the processes are not joined and would "
            "each train an independent copy. On CPU launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
            "--num_processes N` (or the provided configuration/accelerate/cpu_multi_process.yaml)."
        )


def load_split(args: DataArguments, split: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    """Load one split from `dataset_name` or an image folder, with a clear error when it cannot be found."""
    folder = args.train_dir if split == args.train_split else args.validation_dir
    try:
        if args.dataset_name:
            dataset = datasets.load_dataset(
                args.dataset_name, args.dataset_config_name, split=split, streaming=streaming, cache_dir=args.cache_dir
            )
        elif folder:
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"image folder {folder!r} does not exist")
            dataset = datasets.load_dataset(
                "imagefolder", data_dir=folder, split="train", streaming=streaming, cache_dir=args.cache_dir
            )
        else:
            raise ValueError("give --dataset_name or --train_dir/--validation_dir")
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError, ValueError) as error:
        source = args.dataset_name or folder
        raise SystemExit(f"error: cannot load split {split!r} of {source!r}: {error}") from error
    return dataset


def find_column(features: datasets.Features | None, given: str | None, candidates: tuple[str, ...], kind: str) -> str:
    """The named column, or the first of `candidates` present; a clear error otherwise."""
    names = list(features or {})
    if given:
        if names and given not in names:
            raise SystemExit(f"error: {kind} column {given!r} not in the dataset (columns: {names})")
        return given
    for name in candidates:
        if name in names:
            return name
    raise SystemExit(f"error: no {kind} column found among {names}; pass --{kind}_column")


def prepare_images(dataset, image_column: str):
    """Keep images undecoded so a corrupt file can be skipped at collate time instead of killing the run."""
    return dataset.cast_column(image_column, datasets.Image(decode=False))


def decode_image(value: Any) -> Image.Image | None:
    """Decode an image cell (undecoded dict, PIL image or path) to RGB; None when the file is corrupt."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        else:
            image = Image.open(value["path"] if isinstance(value, dict) else value)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        logger.warning("skipping a corrupt image: %s", error)
        return None
    return image if image.mode == "RGB" else image.convert("RGB")


def image_processor_for(config) -> ViTImageProcessor:
    """The processor saved beside the weights: resize to the model's size, MAE (ImageNet) mean/std."""
    height, width = config.image_height_width
    return ViTImageProcessor(
        do_resize=True,
        size={"height": height, "width": width},
        resample=Image.Resampling.BICUBIC,
        image_mean=list(MAE_MEAN),
        image_std=list(MAE_STD),
    )


def train_transform(processor: ViTImageProcessor, scale: tuple[float, float] = (0.2, 1.0)) -> v2.Compose:
    """MAE augmentation: RandomResizedCrop (bicubic), horizontal flip, normalisation."""
    size = (processor.size["height"], processor.size["width"])
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(processor.image_mean, processor.image_std),
        ]
    )


def eval_transform(processor: ViTImageProcessor) -> v2.Compose:
    """Resize (bicubic) and normalise, as the saved image processor does."""
    size = (processor.size["height"], processor.size["width"])
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(processor.image_mean, processor.image_std),
        ]
    )


class ImageCollator:
    """Decode, transform and stack a list of rows; corrupt images are dropped (and counted).

    With `label_column` / `index_column`, each kept row's label / index comes along as `labels` / `index`.
    """

    def __init__(
        self,
        transform: Callable,
        image_column: str,
        label_column: str | None = None,
        index_column: str | None = None,
    ):
        self.transform = transform
        self.image_column = image_column
        self.extra_columns = {"labels": label_column, "index": index_column}

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        pixels = []
        extras: dict[str, list] = {key: [] for key, column in self.extra_columns.items() if column}
        for row in rows:
            image = decode_image(row[self.image_column])
            if image is None:
                continue
            pixels.append(self.transform(image))
            for key in extras:
                extras[key].append(row[self.extra_columns[key]])
        batch = {
            "pixel_values": torch.stack(pixels) if pixels else torch.empty(0),
            "skipped": torch.tensor(len(rows) - len(pixels)),
        }
        return batch | {key: torch.tensor(values, dtype=torch.long) for key, values in extras.items()}


def shard_for_process(dataset, accelerator: Accelerator, seed: int, epoch: int, shuffle: bool, buffer_size: int):
    """This process's share of one epoch: shuffled with the same seed on every rank, then split without overlap."""
    if shuffle:
        if isinstance(dataset, datasets.IterableDataset):
            dataset = dataset.shuffle(seed=seed, buffer_size=buffer_size)
            dataset.set_epoch(epoch)
        else:
            dataset = dataset.shuffle(seed=seed + epoch)
    if accelerator.num_processes > 1:
        dataset = split_dataset_by_node(dataset, rank=accelerator.process_index, world_size=accelerator.num_processes)
    return dataset


def skip_samples(dataset, count: int):
    """Drop the first `count` rows (resuming inside an epoch)."""
    if count == 0:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.skip(count)
    return dataset.select(range(min(count, len(dataset)), len(dataset)))


def epoch_loader(
    train_data, accelerator: Accelerator, state: dict, data_args: DataArguments, batch_size: int, collate, seed: int
) -> DataLoader:
    """This process's loader for the epoch in `state`, past the samples it already trained on.

    Full batches only (MAE's drop_last), and a generator of its own, so that building a loader draws nothing from
    the global RNG: a resumed run sees the same crops and masks as an uninterrupted one.
    """
    epoch_data = shard_for_process(train_data, accelerator, seed, state["epoch"], True, data_args.shuffle_buffer_size)
    epoch_data = skip_samples(epoch_data, state["samples_in_epoch"] // accelerator.num_processes)
    return DataLoader(
        epoch_data,
        batch_size=batch_size,
        collate_fn=collate,
        num_workers=data_args.dataloader_num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed + state["epoch"]),
    )


def synchronized_batches(loader, accelerator: Accelerator) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches on the device until any process runs out, so that ranks never wait on each other forever.

    For training only: the batches of the processes that did not run out are dropped, so an evaluation must not
    use it (see run_classification.py's `Evaluation`, which counts every sample once).
    """
    iterator = iter(loader)
    while True:
        batch = next(iterator, None)
        if accelerator.num_processes > 1:
            exhausted = torch.tensor([batch is None], device=accelerator.device, dtype=torch.float32)
            if accelerator.reduce(exhausted, reduction="sum").item() > 0:
                return
        elif batch is None:
            return
        yield {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}


def limit_samples(dataset, count: int | None):
    """The first `count` rows (all when None), for a split or a stream."""
    if not count:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(count)
    return dataset.select(range(min(count, len(dataset))))


def training_length(
    dataset, data_args: DataArguments, global_batch: int, num_train_epochs: float, max_train_steps: int | None
) -> tuple[int, int]:
    """(optimiser steps per epoch, total steps) for full global batches; a clear error for an unsized stream."""
    num_samples = data_args.num_train_samples
    if num_samples is None and isinstance(dataset, datasets.Dataset):
        num_samples = len(dataset)
    elif num_samples is None:
        splits = dataset.info.splits or {}
        num_samples = splits[data_args.train_split].num_examples if data_args.train_split in splits else None
    if data_args.max_train_samples:  # a stream's `take` leaves its stated size unchanged
        num_samples = min(num_samples or data_args.max_train_samples, data_args.max_train_samples)
    if num_samples is None and max_train_steps is None:
        raise SystemExit("error: the stream does not say its size: pass --num_train_samples or --max_train_steps")
    if num_samples is not None and num_samples < global_batch:
        raise SystemExit(f"error: {num_samples} training images do not fill one global batch of {global_batch}")
    steps_per_epoch = num_samples // global_batch if num_samples is not None else max_train_steps
    return steps_per_epoch, max_train_steps or math.ceil(num_train_epochs * steps_per_epoch)


def parse_script_args(parser: HfArgumentParser) -> tuple:
    """Dataclasses from the command line, or from a single .json / .yaml file argument."""
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(sys.argv[1])
    if len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(sys.argv[1])
    return parser.parse_args_into_dataclasses()


def check_checkpoint_kind(path: str, cache_dir: str | None = None) -> str:
    """The checkpoint's model_type, or a clear error when it is not an SG-MAE or transformers ViTMAE checkpoint."""
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(path, cache_dir=cache_dir)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot read a model configuration from {path!r}: {error}") from error
    model_type = config_dict.get("model_type")
    if model_type not in CHECKPOINT_TYPES:
        raise SystemExit(
            f"error: {path!r} is a {model_type!r} checkpoint; --model_name_or_path needs an SG-MAE (pre-training or "
            "classification) or a transformers ViTMAE checkpoint"
        )
    return model_type


# ----- checkpoints -------------------------------------------------------------------------------------------------
def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (their state file is written last), oldest first."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_resume(output_dir: str, resume_from_checkpoint: str | None) -> Path | None:
    """`latest` picks the newest complete checkpoint in output_dir (None when there is none yet)."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not (path / STATE_FILE).is_file():
        raise SystemExit(f"error: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str,
    state: dict,
    save_total_limit: int | None,
    objects: dict[str, Any],
    config=None,
) -> Path:
    """Write `checkpoint-<step>` atomically: everything goes to a temporary folder that is renamed when complete.

    Accelerate saves what it prepared (model, optimizer) and the RNG states; `objects` (scheduler, probe, ...) are
    saved by state_dict to OBJECTS_FILE, which `load_checkpoint` reads with `weights_only=True`, unlike Accelerate's
    `register_for_checkpointing` files. With `config`, its config.json is written too, so the checkpoint also loads
    with `from_pretrained`.
    """
    final = Path(output_dir) / f"checkpoint-{state['step']}"
    temporary = Path(output_dir) / f".tmp-checkpoint-{state['step']}"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save({name: value.state_dict() for name, value in objects.items()}, temporary / OBJECTS_FILE)
        if config is not None:
            config.save_pretrained(temporary)
        (temporary / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        if save_total_limit:
            for old in checkpoint_dirs(output_dir)[:-save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, objects: dict[str, Any]) -> dict:
    """Restore model, optimizer, RNG states and `objects`; return the saved trainer state."""
    if not (path / OBJECTS_FILE).is_file():
        raise SystemExit(
            f"error: {path} has no {OBJECTS_FILE}: it was written by an older version, whose scheduler state only "
            "loads by unpickling arbitrary code; start a new run from its weights (--model_name_or_path PATH)"
        )
    accelerator.load_state(str(path))
    saved = torch.load(path / OBJECTS_FILE, map_location="cpu", weights_only=True)
    for name, value in objects.items():
        value.load_state_dict(saved[name])
    return json.loads((path / STATE_FILE).read_text())


def check_finite(loss: torch.Tensor, step: int, output_dir: str) -> None:
    """Stop with a clear message on a NaN/inf loss; checkpoints already written are left untouched."""
    if not torch.isfinite(loss).item():
        found = checkpoint_dirs(output_dir)
        last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
        raise SystemExit(
            f"error: the loss became {loss.item()} at step {step}; stopping ({last}). "
            "Lower the learning rate, enable --max_grad_norm or use bf16 instead of fp16."
        )


def cosine_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up then half-cosine decay to 0, as a LambdaLR factor."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """MAE's AdamW groups: no decay on norms, biases, tokens and position tables (1-D or token parameters)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        skip = parameter.ndim <= 1 or name.endswith(("cls_token", "mask_token", "position_embeddings"))
        (no_decay if skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----- Hub-ready output --------------------------------------------------------------------------------------------
def save_hub_folder(
    model: PreTrainedModel, processor: ViTImageProcessor, output_dir: str | Path, model_card: str
) -> None:
    """Weights (safetensors), config with auto_map, the model's .py files, processor config and model card."""
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    Path(output_dir, "README.md").write_text(model_card, encoding="utf-8")


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


# ----- visualisation -----------------------------------------------------------------------------------------------
def save_mask_panel(model, pixel_values: torch.Tensor, processor: ViTImageProcessor, path: Path) -> None:
    """PNG, one row per image: input, random mask, NCut bi-partition, informed mask, with hints, reconstruction."""
    from .analysis import figure_panel

    panel = figure_panel(model, pixel_values, processor.image_mean, processor.image_std)
    Image.fromarray(panel.grid()).save(path)
