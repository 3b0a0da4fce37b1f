#!/usr/bin/env python
"""Does self-guided masking learn faster than MAE's random masking? Pre-train both from the same initialisation,
seed, data order and crops, then evaluate kNN and linear-probe accuracy at several epochs.

    python benchmarks/compare_masking.py --dataset_name ../shared/data/cifar10 --epochs 10 --eval_epochs 2,4,6,8,10

Each run is a plain `run_pretraining.py` process (so this measures what users run); every epoch's checkpoint is then
evaluated with `run_classification.py --protocol knn` and `--protocol linear_probe` on frozen features, and with the
analysis toolkit (bi-partition gap, feature variance, attention distance, exploitation rates). Writes
`compare_masking.json`, prints a table and draws accuracy against epoch and against wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from provenance import code_commit  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_name", required=True, help="Dataset in the Hub layout with train/test splits.")
    parser.add_argument("--config_name", default=str(REPO / "configuration/models/sgmae-vit-tiny-patch4-cifar.json"))
    parser.add_argument("--config_overrides", default=None, help="Passed to run_pretraining.py for every run.")
    parser.add_argument(
        "--variants",
        default="mae:--mask_strategy random,sgmae:--mask_strategy self_guided",
        help="Comma-separated name:extra-arguments pairs; one pre-training run each per seed. A variant's "
        "--config_overrides (commas allowed) is applied after the common one.",
    )
    parser.add_argument("--seeds", default="0", help="Comma-separated seeds; each variant runs once per seed.")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--eval_epochs", default=None, help="Comma-separated epochs to evaluate, in this order (default: all)."
    )
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--base_learning_rate", type=float, default=1.5e-4)
    parser.add_argument("--warmup_ratio", type=float, default=0.1)
    parser.add_argument("--max_train_samples", type=int, default=None, help="Pre-train on a prefix of the split.")
    parser.add_argument("--probe_train_samples", type=int, default=10_000, help="Training images for kNN/probe.")
    parser.add_argument("--probe_eval_samples", type=int, default=None, help="Test images (default: all).")
    parser.add_argument("--probe_epochs", type=int, default=30, help="Linear-probe epochs on cached features.")
    parser.add_argument("--probe_pooling", default="cls", choices=("cls", "mean"), help="kNN/probe features.")
    parser.add_argument("--mixed_precision", default="bf16")
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument(
        "--parallel_runs",
        type=int,
        default=1,
        help="Pre-training runs (and then evaluations) at a time; small models leave a GPU mostly idle, so several "
        "can share one. Epoch times of concurrent runs are measured under load.",
    )
    parser.add_argument(
        "--evaluate_only",
        action="store_true",
        help="Do not pre-train: evaluate the listed epochs that have checkpoints (e.g. while a run is unfinished).",
    )
    parser.add_argument(
        "--collect_only",
        action="store_true",
        help="Run nothing: gather the evaluations already written (e.g. copied back from a GPU machine without the "
        "weights); missing ones are recorded as null.",
    )
    parser.add_argument("--output_dir", default=str(REPO / "benchmarks/results/compare_masking"))
    args = parser.parse_args()
    if args.parallel_runs < 1:
        parser.error("--parallel_runs must be at least 1")
    return args


def run(command: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=python_path)
    with log.open("w") as handle:
        result = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"{command[1]} failed; see {log}")


def split_variants(text: str) -> list[tuple[str, str]]:
    """`name:extra,name:extra` -> pairs; a comma starts a new variant only where `name:` follows it."""
    variants = []
    for item in re.split(r",\s*(?=[\w.-]+:)", text.strip()):
        name, colon, extra = item.partition(":")
        if not colon or not name.strip():
            raise SystemExit(f"error: --variants item {item!r} is not name:extra-arguments")
        variants.append((name.strip(), extra))
    return variants


def split_config_overrides(extra: str) -> tuple[list[str], str | None]:
    """A variant's extra arguments without its --config_overrides (either form), and that value."""
    arguments = shlex.split(extra)
    for at, argument in enumerate(arguments):
        if argument.startswith("--config_overrides="):
            return arguments[:at] + arguments[at + 1 :], argument.partition("=")[2]
        if argument == "--config_overrides":
            if at + 1 == len(arguments):
                raise SystemExit(f"error: --config_overrides without a value in variant arguments {extra!r}")
            return arguments[:at] + arguments[at + 2 :], arguments[at + 1]
    return arguments, None


def run_all(pool: ThreadPoolExecutor, function, items: list) -> list:
    """function(item) for every item on the pool; the first failure cancels the items not yet started."""
    futures = [pool.submit(function, item) for item in items]
    try:
        return [future.result() for future in futures]
    except BaseException:
        for future in futures:
            future.cancel()
        raise


def pretrain(args: argparse.Namespace, name: str, extra: str, seed: int, output: Path) -> None:
    if (output / "train_results.json").is_file():
        return  # finished earlier: this benchmark resumes where it stopped
    command = [
        sys.executable, str(REPO / "run_pretraining.py"), "--dataset_name", args.dataset_name,
        "--config_name", args.config_name, "--output_dir", str(output), "--seed", str(seed),
        "--num_train_epochs", str(args.epochs), "--per_device_train_batch_size", str(args.batch_size),
        "--base_learning_rate", str(args.base_learning_rate), "--warmup_ratio", str(args.warmup_ratio),
        "--mixed_precision", args.mixed_precision, "--dataloader_num_workers", str(args.num_workers),
        "--checkpointing_steps", "epoch", "--save_total_limit", "0", "--logging_steps", "50",
        "--resume_from_checkpoint", "latest",
    ]  # fmt: skip
    extra_arguments, variant_overrides = split_config_overrides(extra)
    command += extra_arguments
    overrides = [value for value in (args.config_overrides, variant_overrides) if value]
    if overrides:
        command += ["--config_overrides", ",".join(overrides)]
    if args.max_train_samples:
        command += ["--max_train_samples", str(args.max_train_samples)]
    run(command, output / f"pretrain-{name}-seed{seed}.log")


def evaluate(args: argparse.Namespace, checkpoint: Path, protocol: str) -> float | None:
    """Top-1 accuracy in percent; None under --collect_only when the checkpoint has no such evaluation."""
    output = checkpoint / (f"eval-{protocol}" + ("" if args.probe_pooling == "cls" else "-mean"))
    results = output / "eval_results.json"
    if not results.is_file():
        if args.collect_only:
            return None
        command = [
            sys.executable, str(REPO / "run_classification.py"), "--protocol", protocol,
            "--model_name_or_path", str(checkpoint), "--dataset_name", args.dataset_name,
            "--output_dir", str(output), "--max_train_samples", str(args.probe_train_samples),
            "--dataloader_num_workers", "0", "--per_device_eval_batch_size", "256", "--seed", "0",
            "--probe_pooling", args.probe_pooling,
        ]  # fmt: skip
        if args.probe_eval_samples:
            command += ["--max_eval_samples", str(args.probe_eval_samples)]
        if protocol == "linear_probe":
            command += ["--num_train_epochs", str(args.probe_epochs), "--per_device_train_batch_size", "256"]
        output.mkdir(parents=True, exist_ok=True)
        run(command, output / "log.txt")
    return 100 * json.loads(results.read_text())["eval_top1"]


def analyse(args: argparse.Namespace, checkpoint: Path) -> dict:
    output = checkpoint / "analysis"
    if not (output / "analysis.json").is_file():
        if args.collect_only:
            return {}
        command = [
            sys.executable, "-m", "sgmae_training.analyze", "--model", str(checkpoint),
            "--dataset_name", args.dataset_name, "--num_images", "512", "--output_dir", str(output),
        ]  # fmt: skip
        output.mkdir(parents=True, exist_ok=True)
        run(command, output / "log.txt")
    return json.loads((output / "analysis.json").read_text())


def cell(value: float | None, spec: str) -> str:
    """A table cell: the formatted value, or `-` for a missing one."""
    return "-" if value is None else format(value, spec)


def plot(records: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 7))
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2)
    variants = list(dict.fromkeys(r["variant"] for r in records))
    seeds = sorted({r["seed"] for r in records})
    for variant_index, name in enumerate(variants):
        for seed_index, seed in enumerate(seeds):
            runs = [r for r in records if r["variant"] == name and r["seed"] == seed]
            style = ["-", "--", ":", "-."][seed_index % 4]
            for row, metric in enumerate(("linear_probe", "knn")):
                points = [r for r in runs if r[metric] is not None]
                for column, x_key in enumerate(("epoch", "train_minutes")):
                    axis = axes[row, column]
                    axis.plot([r[x_key] for r in points], [r[metric] for r in points], style, marker="o",
                              color=f"C{variant_index % 10}", label=f"{name} seed {seed}")  # fmt: skip
                    axis.set_xlabel("epoch" if x_key == "epoch" else "pre-training wall-clock (min)")
                    axis.set_ylabel(f"{metric} top-1 (%)")
                    axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(str(path), dpi=110)


def evaluate_checkpoint(args: argparse.Namespace, name: str, seed: int, epoch: int, checkpoint: Path) -> dict:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    metrics = analyse(args, checkpoint)
    mask_shares = metrics.get("exploitation_rate_mask")
    return {
        "variant": name,
        "seed": seed,
        "epoch": epoch,
        "step": state["step"],
        "probe_pooling": args.probe_pooling,
        "train_minutes": state["train_seconds"] / 60,
        "knn": evaluate(args, checkpoint, "knn"),
        "linear_probe": evaluate(args, checkpoint, "linear_probe"),
        "bipartition_gap": metrics.get("bipartition_gap"),
        "cosine_gap": metrics.get("bipartition_cosine_gap"),
        "feature_variance": metrics.get("feature_variance"),
        "attention_distance_last": metrics["attention_distance"][-1] if metrics else None,
        "exploitation_mask_share": sum(mask_shares) / len(mask_shares) if mask_shares else None,
        "centre_masked_share": metrics.get("informed_mask_centre_share"),
        "reconstruction_loss": metrics.get("reconstruction_loss"),
    }


def main() -> None:
    args = parse_args()
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    variants = split_variants(args.variants)
    runs = [(name, extra, int(seed)) for seed in args.seeds.split(",") for name, extra in variants]
    eval_epochs = [int(e) for e in args.eval_epochs.split(",")] if args.eval_epochs else range(1, args.epochs + 1)
    eval_epochs = list(dict.fromkeys(eval_epochs))
    with ThreadPoolExecutor(args.parallel_runs) as pool:
        if not (args.evaluate_only or args.collect_only):
            run_all(pool, lambda job: pretrain(args, job[0], job[1], job[2], root / f"{job[0]}-seed{job[2]}"), runs)
        checkpoints = {}
        for name, _, seed in runs:
            for checkpoint in (root / f"{name}-seed{seed}").glob("checkpoint-*"):
                epoch = json.loads((checkpoint / "trainer_state.json").read_text())["epoch"]
                checkpoints[name, seed, epoch] = checkpoint
        # Epoch-major, in the order given: an interrupted benchmark has evaluated every run at the first epochs.
        jobs = [(name, seed, epoch) for epoch in eval_epochs for name, _, seed in runs]
        for job in jobs:
            if job not in checkpoints:
                print(f"warning: no checkpoint of {job[0]} seed {job[1]} at epoch {job[2]}; not evaluated")
        jobs = [job for job in jobs if job in checkpoints]
        records = run_all(pool, lambda job: evaluate_checkpoint(args, *job, checkpoints[job]), jobs)
    order = {(name, seed): index for index, (name, _, seed) in enumerate(runs)}
    records.sort(key=lambda record: (order[record["variant"], record["seed"]], record["epoch"]))
    (root / "compare_masking.json").write_text(
        json.dumps({"args": vars(args), "commit": code_commit(), "records": records}, indent=2)
    )
    header = f"{'variant':<12}{'seed':>5}{'epoch':>6}{'minutes':>9}{'kNN':>8}{'probe':>8}{'gap':>8}{'featvar':>8}"
    print(header)
    for r in records:
        cells = [
            cell(r[key], spec)
            for key, spec in (
                ("knn", ".2f"),
                ("linear_probe", ".2f"),
                ("bipartition_gap", ".3f"),
                ("feature_variance", ".3f"),
            )
        ]
        print(f"{r['variant']:<12}{r['seed']:>5}{r['epoch']:>6}{r['train_minutes']:>9.1f}"
              + "".join(f"{c:>8}" for c in cells))  # fmt: skip
    plot(records, root / "compare_masking.png")


if __name__ == "__main__":
    main()
