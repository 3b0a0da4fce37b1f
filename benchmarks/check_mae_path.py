#!/usr/bin/env python
"""Is MAE's training path unchanged since a commit? Train the first steps of the same MAE run with that commit's code
and with this checkout's, and compare the checkpoints bitwise.

    python -m benchmarks.check_mae_path --commit ae7b06e --dataset_name ../shared/data/imagenette \
        --dataset_config_name 112px --output benchmarks/results/imagenette196/mae_path_check.json

The run is the 196-patch comparison's MAE arm (compare_masking.py's preset and arguments: 112 px / patch 8, 4 + 2
blocks, batch 128, base lr 1e-3, decode-once input, its 30-epoch schedule), stopped at its first checkpoint after
`--steps` steps. Equal parameters, optimizer moments and losses there mean that the committed MAE runs of that commit
are the runs this checkout would train, so they may stand in for a new MAE arm. Buffers are listed apart: they hold
the informed-masking schedule's state (renamed since ae7b06e), which random masking never reads. The commit's code
is checked out into a temporary git worktree; the JSON records both commits, the steps and every tensor that
differs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import HfArgumentParser

from benchmarks.provenance import REPO, code_commit
from sgmae_training.arguments import parse_script_args

PRESET = "image_size=112,patch_size=8,num_hidden_layers=4,decoder_num_hidden_layers=2"


@dataclass
class CheckArguments:
    """The commit to compare with, the run compared and where the verdict goes."""

    dataset_name: str = field(metadata={"help": "Imagenette in the Hub layout (a local folder)."})
    output: Path = field(metadata={"help": "Where the JSON goes."})
    commit: str = field(default="ae7b06e", metadata={"help": "The commit whose MAE runs are to stand in."})
    dataset_config_name: str = field(default="112px", metadata={"help": "The dataset's configuration."})
    steps: int = field(default=2, metadata={"help": "Optimiser steps to compare (the first checkpoint)."})
    epochs: int = field(default=30, metadata={"help": "The schedule length of the run compared."})
    seed: int = field(default=0, metadata={"help": "The run's seed."})


def parse_args() -> CheckArguments:
    (args,) = parse_script_args(HfArgumentParser(CheckArguments))
    return args


def train_first_steps(code: Path, args: CheckArguments, output_dir: Path) -> Path:
    """The MAE arm's command with `code`'s run_pretraining.py, stopped at checkpoint-<steps>."""
    command = [
        sys.executable, str(code / "run_pretraining.py"), "--dataset_name", str(Path(args.dataset_name).resolve()),
        "--dataset_config_name", args.dataset_config_name,
        "--config_name", str(code / "configuration/models/sgmae-vit-tiny-patch4-cifar.json"),
        "--config_overrides", PRESET, "--mask_strategy", "random", "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "128", "--base_learning_rate", "1e-3", "--num_train_epochs", str(args.epochs),
        "--input_path", "decode_once", "--seed", str(args.seed), "--checkpointing_steps", str(args.steps),
        "--stop_after_minutes", "1e-5", "--logging_steps", "1", "--mixed_precision", "no",
    ]  # fmt: skip
    environment = {"PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run(command, check=True, cwd=code, env=os.environ | environment)
    return output_dir / f"checkpoint-{args.steps}"


def compare(expected: Path, actual: Path) -> dict:
    """Tensors of the two checkpoints' parameters and optimizer states that are not bitwise equal, their losses, and
    the buffers that differ (the informed-masking schedule's state, which random masking never reads)."""
    from modeling_sgmae import SGMAEConfig, SGMAEForPreTraining

    parameters = {name for name, _ in SGMAEForPreTraining(SGMAEConfig.from_pretrained(actual)).named_parameters()}
    weights = (load_file(expected / "model.safetensors"), load_file(actual / "model.safetensors"))
    differing = [
        key
        for key in sorted(set(weights[0]) | set(weights[1]))
        if key not in weights[0] or key not in weights[1] or not torch.equal(weights[0][key], weights[1][key])
    ]
    moments = [
        torch.load(path / "optimizer.bin", map_location="cpu", weights_only=True) for path in (expected, actual)
    ]
    differing_moments = [
        f"optimizer.state.{index}.{name}"
        for index, state in moments[0]["state"].items()
        for name, value in state.items()
        if not torch.equal(value, moments[1]["state"][index][name])
    ]
    losses = [json.loads((path / "trainer_state.json").read_text())["train_loss"] for path in (expected, actual)]
    return {
        "differing_parameters": [key for key in differing if key in parameters] + differing_moments,
        "differing_buffers": [key for key in differing if key not in parameters],
        "parameters_compared": len(parameters),
        "losses": losses,
    }


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        worktree = scratch / "code"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.commit], check=True)
        try:
            expected = train_first_steps(worktree, args, scratch / "committed")
            actual = train_first_steps(REPO, args, scratch / "checkout")
            result = compare(expected, actual)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=False)
    unchanged = not result["differing_parameters"] and result["losses"][0] == result["losses"][1]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": code_commit(),
        "compared_with": args.commit,
        "steps": args.steps,
        "epochs": args.epochs,
        "seed": args.seed,
        "unchanged": unchanged,
        **result,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    verdict = "bitwise the same" if unchanged else f"DIFFERENT ({len(result['differing_parameters'])} tensors)"
    print(f"MAE path after {args.steps} steps, {args.commit} vs this checkout: {verdict}; losses {result['losses']}")


if __name__ == "__main__":
    main()
