#!/usr/bin/env python
"""Does data loading starve the model? The step rate of the full `run_pretraining.py` (data loading, decoding,
augmentation, logging) against the model's own training-step rate on an in-memory batch, same config and batch, for
each input path: `workers` (decode and augment each image in DataLoader workers) and `decode_once` (decode the split
once, augment whole batches on the device).

    python -m benchmarks.bench_script --dataset_name ../shared/data/cifar10
    python -m benchmarks.bench_script --dataset_name ../shared/data/imagenette --config_name \
        configuration/models/sgmae-vit-tiny-patch16-224.json --batch_size 32 --steps 10 --max_train_samples 2048 \
        --output benchmarks/results/bench_script_imagenette.json

Both sides use random masking (the data path is the same for both strategies), the same config, batch, precision
(`--mixed_precision auto`: bf16 autocast on a GPU, float32 on the CPU), device (a GPU when there is one) and threads;
runs alternate (model, workers, decode_once, model, ...; `benchmarks/timing.py`) and the table reports medians and
the script / model rate ratio paired per round. Targets: script / model
>= 0.9; decode_once no slower than workers. Writes benchmarks/results/bench_script.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from benchmarks.provenance import REPO, code_commit
from benchmarks.timing import Variant, alternate, median_of, paired_ratio, synchronize
from modeling_sgmae import SGMAEConfig, SGMAEForPreTraining
from sgmae_training.arguments import MIXED_PRECISIONS, parse_script_args
from sgmae_training.engine import resolve_mixed_precision
from sgmae_training.optim import parameter_groups


@dataclass
class BenchArguments:
    """The data and model to time, and how long."""

    dataset_name: str
    dataset_config_name: str | None = None
    config_name: str = str(REPO / "configuration/models/sgmae-vit-tiny-patch4-cifar.json")
    mixed_precision: str = field(default="auto", metadata={"help": f"One of {', '.join(MIXED_PRECISIONS)}."})
    batch_size: int = 64
    steps: int = field(default=30, metadata={"help": "Timed steps per repeat (after 5 warm-up steps)."})
    repeats: int = 2
    num_workers: int = 1
    input_paths: str = field(default="workers,decode_once", metadata={"help": "Comma-separated input paths to time."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    output: str = str(REPO / "benchmarks/results/bench_script.json")

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise SystemExit(f"error: --mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}")


def parse_args() -> BenchArguments:
    (args,) = parse_script_args(HfArgumentParser(BenchArguments))
    return args


def model_seconds_per_image(args: BenchArguments) -> float:
    """Seconds per image of forward + backward + AdamW on one fixed in-memory batch, in the script's precision and
    device."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = SGMAEConfig.from_json_file(args.config_name)
    config.mask_strategy = "random"
    model = SGMAEForPreTraining(config).to(device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    pixels = torch.randn(args.batch_size, config.num_channels, *config.image_height_width, device=device)
    bf16 = resolve_mixed_precision(args.mixed_precision) == "bf16"
    for step in range(5 + args.steps):
        if step == 5:
            synchronize(device)
            started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(pixels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    synchronize(device)
    return (time.perf_counter() - started) / (args.steps * args.batch_size)


def script_seconds_per_image(args: BenchArguments, input_path: str) -> float:
    """Seconds per image of run_pretraining.py over its timed steps: two runs of 5 and 5 + N steps, so start-up and the
    first steps cancel out."""
    seconds, samples = {}, {}
    for steps in (5, 5 + args.steps):
        with tempfile.TemporaryDirectory() as output:
            command = [
                sys.executable, str(REPO / "run_pretraining.py"), "--dataset_name", args.dataset_name,
                "--config_name", args.config_name, "--mask_strategy", "random", "--output_dir", output,
                "--max_train_steps", str(steps), "--per_device_train_batch_size", str(args.batch_size),
                "--dataloader_num_workers", str(args.num_workers), "--checkpointing_steps", "none",
                "--logging_steps", "10", "--input_path", input_path, "--mixed_precision", args.mixed_precision,
            ]  # fmt: skip
            if args.dataset_config_name:
                command += ["--dataset_config_name", args.dataset_config_name]
            if args.max_train_samples:
                command += ["--max_train_samples", str(args.max_train_samples)]
            env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
            subprocess.run(command, env=env, check=True, capture_output=True)
            result = json.loads((Path(output) / "train_results.json").read_text())
            seconds[steps], samples[steps] = result["train_seconds"], result["samples_seen"]
    return (seconds[5 + args.steps] - seconds[5]) / (samples[5 + args.steps] - samples[5])


def main() -> None:
    args = parse_args()
    paths = args.input_paths.split(",")
    model = Variant("model", lambda _noise: model_seconds_per_image(args))
    scripts = [Variant(path, lambda _noise, path=path: script_seconds_per_image(args, path)) for path in paths]
    alternate([model, *scripts], rounds=args.repeats)
    every_round = list(range(args.repeats))
    rates = {variant.name: [1 / seconds for seconds in variant.times] for variant in (model, *scripts)}
    medians = {variant.name: 1 / median_of(variant.times, every_round) for variant in (model, *scripts)}
    ratio = {script.name: paired_ratio(model, script, every_round) for script in scripts}
    print(f"{'':<40}{'img/s (median)':>16}   runs")
    for key in rates:
        label = "model step (in-memory batch)" if key == "model" else f"run_pretraining.py --input_path {key}"
        print(f"{label:<40}{medians[key]:>16.1f}   {', '.join(f'{rate:.1f}' for rate in rates[key])}")
    for path in paths:
        print(f"script ({path}) / model = {ratio[path]:.3f} (target >= 0.9)")
    record = {
        "commit": code_commit(),
        "command": "python " + " ".join(sys.argv),
        "torch_threads": torch.get_num_threads(),
        "config_name": args.config_name,
        "dataset": [args.dataset_name, args.dataset_config_name],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "mixed_precision": resolve_mixed_precision(args.mixed_precision),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "num_workers": args.num_workers,
        "max_train_samples": args.max_train_samples,
        "rates": rates,
        "medians": medians,
        "script_over_model": ratio,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
