#!/usr/bin/env python
"""Does self-guided masking learn faster than MAE's random masking? Pre-train both from the same initialisation,
seed, data order and crops, then evaluate kNN and linear-probe accuracy at several epochs.

    python benchmarks/compare_masking.py --dataset_name ../shared/data/cifar10 --epochs 10 --eval_epochs 2,4,6,8,10

Each run is a plain `run_pretraining.py` process (so this measures what users run); every evaluated checkpoint
gets `run_classification.py --protocol frozen` (kNN and linear probe on [CLS] and on mean-pooled features, from one
feature pass) and the analysis toolkit (bi-partition gap, feature variance, attention distance, exploitation rates,
informed-mask centre share, object-part size, Figure-1 panel) as soon as it is written, while the run goes on.

A comparison can take several sittings: checkpoints live in `--runs_dir` (outside the work tree), every finished
evaluation is added to `OUTPUT_DIR/compare_masking.json` at once, and `--stop_after_minutes` ends a sitting at a
checkpoint with its evaluations done. The same command continues: runs resume from their newest checkpoint, the
evaluations in the JSON are kept, and a run whose checkpoints are gone restarts from its seed (bitwise the same run).
The JSON holds every record and, per variant and epoch, the mean and spread over seeds; the tables are printed and
written as Markdown (`compare_masking.md`, as the docs show them), and the learning curves drawn against epoch and
time (with `--schedule_timings`, the variants' schedules as bench_schedule.py measured them side by side; otherwise
the runs' own clocks).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from statistics import fmean
from typing import Literal

REPO = Path(__file__).resolve().parents[1]
POOLED = [(protocol, pooling) for protocol in ("knn", "linear_probe") for pooling in ("cls", "mean")]
ACCURACIES = [f"{protocol}_{pooling}" for protocol, pooling in POOLED]
SUMMARISED = (
    *ACCURACIES, "train_minutes", "centre_masked_share", "object_part_fraction", "bipartition_gap",
    "feature_variance", "attention_distance_last", "exploitation_mask_share", "half_cut_share",
    "object_centre_share", "object_part_fraction_median", "position_share_last",
)  # fmt: skip
# Arguments that do not change what is measured: a sitting may change them and keep the records of earlier ones.
SITTING_ARGUMENTS = {
    "output_dir", "runs_dir", "parallel_runs", "stop_after_minutes", "evaluation_minutes", "evaluate_only",
    "collect_only", "num_workers", "panel_epochs", "schedule_timings",
}  # fmt: skip
POLL_SECONDS = 15.0
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # the checkout's own packages, not an installed copy

from provenance import code_commit  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

from sgmae_training.arguments import parse_script_args  # noqa: E402


@dataclass
class CompareArguments:
    """What to compare (data, variants, seeds, schedule), how to evaluate it, and how this sitting runs."""

    dataset_name: str = field(metadata={"help": "Dataset in the Hub layout with train/test splits."})
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The dataset's configuration (e.g. 112px)."}
    )
    config_name: str = field(default=str(REPO / "configuration/models/sgmae-vit-tiny-patch4-cifar.json"))
    config_overrides: str | None = field(
        default=None, metadata={"help": "Passed to run_pretraining.py for every run."}
    )
    variants: str = field(
        default="mae:--mask_strategy random,sgmae:--mask_strategy self_guided",
        metadata={
            "help": "Comma-separated name:extra-arguments pairs; one pre-training run each per seed. A variant's "
            "--config_overrides (commas allowed) is applied after the common one."
        },
    )
    seeds: str = field(default="0", metadata={"help": "Comma-separated seeds; each variant runs once per seed."})
    epochs: int = 10
    eval_epochs: str | None = field(
        default=None, metadata={"help": "Comma-separated epochs to evaluate, in this order (default: all)."}
    )
    batch_size: int = 256
    base_learning_rate: float = 1.5e-4
    warmup_ratio: float = 0.1
    max_train_samples: int | None = field(default=None, metadata={"help": "Pre-train on a prefix of the split."})
    probe_train_samples: int = field(default=10_000, metadata={"help": "Training images for kNN/probe."})
    probe_eval_samples: int | None = field(default=None, metadata={"help": "Test images (default: all)."})
    probe_epochs: int = field(default=30, metadata={"help": "Linear-probe epochs on cached features."})
    probe_pooling: Literal["cls", "mean"] = field(
        default="mean", metadata={"help": "The pooling the tables lead with (both run)."}
    )
    mixed_precision: str = field(default="auto", metadata={"help": "run_pretraining.py's (auto: bf16 on a GPU)."})
    num_workers: int = 1
    input_path: Literal["workers", "decode_once"] = field(
        default="workers", metadata={"help": "run_pretraining.py's input path."}
    )
    parallel_runs: int = field(
        default=1,
        metadata={
            "help": "Pre-training runs (and then evaluations) at a time; small models leave a GPU mostly idle, so "
            "several can share one. Epoch times of concurrent runs are measured under load."
        },
    )
    evaluate_only: bool = field(
        default=False,
        metadata={
            "help": "Do not pre-train: evaluate the listed epochs that have checkpoints (e.g. while a run is "
            "unfinished)."
        },
    )
    collect_only: bool = field(
        default=False,
        metadata={
            "help": "Run nothing: gather the evaluations already written (e.g. copied back from a GPU machine "
            "without the weights); missing ones are recorded as null."
        },
    )
    output_dir: str = field(
        default=str(REPO / "benchmarks/results/compare_masking"),
        metadata={"help": "Where the JSON, the curves and the panels go (small: meant to be committed)."},
    )
    runs_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the runs' checkpoints and evaluations go (large); default: ~/.cache/sgmae/compare_masking/ "
            "and the output folder's name ($XDG_CACHE_HOME instead of ~/.cache where it is set)."
        },
    )
    stop_after_minutes: float | None = field(
        default=None,
        metadata={
            "help": "End this sitting in about this many minutes: runs stop at a checkpoint early enough for its "
            "evaluation; the same command continues later."
        },
    )
    evaluation_minutes: float = field(
        default=8.0,
        metadata={
            "help": "Minutes a sitting keeps free at its end for the last checkpoint's evaluation (kNN, probe and "
            "analysis of the 112 px Imagenette model take about 4 on two CPU cores next to a pre-training run; "
            "under 1 on a GPU)."
        },
    )
    panel_epochs: str | None = field(
        default=None,
        metadata={
            "help": "Epochs whose Figure-1 panels are copied to --output_dir (default: the first and last of "
            "--eval_epochs)."
        },
    )
    schedule_timings: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated bench_schedule.py JSONs timing these variants' whole schedules side by side on "
            "a quiet machine; the time to the first variant's final probe is then also given on their seconds per "
            "epoch (refresh passes included), not only on the runs' own clocks."
        },
    )

    def __post_init__(self) -> None:
        if self.parallel_runs < 1:
            raise SystemExit("error: --parallel_runs must be at least 1")
        if self.stop_after_minutes is not None and self.stop_after_minutes <= self.evaluation_minutes:
            raise SystemExit(
                f"error: --stop_after_minutes must leave time to evaluate: more than {self.evaluation_minutes:g}"
            )
        if self.runs_dir is None:
            cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
            self.runs_dir = str(cache / "sgmae" / "compare_masking" / Path(self.output_dir).resolve().name)
        missing = [path for path in (self.schedule_timings or "").split(",") if path and not Path(path).is_file()]
        if missing:
            raise SystemExit(f"error: --schedule_timings: no such file: {', '.join(missing)}")


def parse_args() -> CompareArguments:
    (args,) = parse_script_args(HfArgumentParser(CompareArguments))
    return args


def start(command: list[str], log: Path) -> subprocess.Popen:
    """The command in the background, offline, its output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=python_path)
    with log.open("a") as handle:
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: Path) -> None:
    if process.wait() != 0:
        raise SystemExit(f"{process.args[1]} failed; see {log}")


def run(command: list[str], log: Path) -> None:
    finish(start(command, log), log)


class Sitting:
    """The time this invocation may use (unlimited without --stop_after_minutes)."""

    def __init__(self, minutes: float | None):
        self.end = None if minutes is None else time.time() + 60 * minutes

    def minutes_left(self) -> float:
        return math.inf if self.end is None else (self.end - time.time()) / 60


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


def pretraining_command(args: CompareArguments, name: str, extra: str, seed: int, output: Path) -> list[str]:
    """run_pretraining.py for one variant and seed; it resumes from the newest checkpoint in `output`."""
    command = [
        sys.executable, str(REPO / "run_pretraining.py"), "--dataset_name", args.dataset_name,
        "--config_name", args.config_name, "--output_dir", str(output), "--seed", str(seed),
        "--num_train_epochs", str(args.epochs), "--per_device_train_batch_size", str(args.batch_size),
        "--base_learning_rate", str(args.base_learning_rate), "--warmup_ratio", str(args.warmup_ratio),
        "--mixed_precision", args.mixed_precision, "--dataloader_num_workers", str(args.num_workers),
        "--checkpointing_steps", "epoch", "--save_total_limit", "0", "--logging_steps", "50",
        "--resume_from_checkpoint", "latest", "--input_path", args.input_path,
    ]  # fmt: skip
    command += dataset_config(args)
    extra_arguments, variant_overrides = split_config_overrides(extra)
    command += extra_arguments
    overrides = [value for value in (args.config_overrides, variant_overrides) if value]
    if overrides:
        command += ["--config_overrides", ",".join(overrides)]
    if args.max_train_samples:
        command += ["--max_train_samples", str(args.max_train_samples)]
    return command


def dataset_config(args: CompareArguments) -> list[str]:
    return ["--dataset_config_name", args.dataset_config_name] if args.dataset_config_name else []


def evaluate(args: CompareArguments, checkpoint: Path) -> dict[str, float | None]:
    """Top-1 accuracies in percent, `{knn,linear_probe}_{cls,mean}`; None under --collect_only when missing."""
    output = checkpoint / "eval-frozen"
    results = output / "eval_results.json"
    if not results.is_file():
        if args.collect_only:
            return dict.fromkeys(ACCURACIES)
        command = [
            sys.executable, str(REPO / "run_classification.py"), "--protocol", "frozen",
            "--model_name_or_path", str(checkpoint), "--dataset_name", args.dataset_name,
            "--output_dir", str(output), "--max_train_samples", str(args.probe_train_samples),
            "--dataloader_num_workers", "0", "--per_device_eval_batch_size", "256", "--seed", "0",
            "--num_train_epochs", str(args.probe_epochs), "--per_device_train_batch_size", "256",
        ]  # fmt: skip
        command += dataset_config(args)
        if args.probe_eval_samples:
            command += ["--max_eval_samples", str(args.probe_eval_samples)]
        output.mkdir(parents=True, exist_ok=True)
        run(command, output / "log.txt")
    written = json.loads(results.read_text())
    return {f"{protocol}_{pooling}": 100 * written[f"{pooling}_{protocol}_top1"] for protocol, pooling in POOLED}


def run_analysis(args: CompareArguments, checkpoint: Path) -> dict:
    output = checkpoint / "analysis"
    if not (output / "analysis.json").is_file():
        if args.collect_only:
            return {}
        command = [
            sys.executable, "-m", "sgmae_training.analyze", "--model", str(checkpoint),
            "--dataset_name", args.dataset_name, "--num_images", "512", "--output_dir", str(output),
        ]  # fmt: skip
        command += dataset_config(args)
        output.mkdir(parents=True, exist_ok=True)
        run(command, output / "log.txt")
    return json.loads((output / "analysis.json").read_text())


def cell(value: float | None, spec: str) -> str:
    """A table cell: the formatted value, or `-` for a missing one."""
    return "-" if value is None else format(value, spec)


def schedule_clocks(paths: str | None, epochs: int) -> dict[str, tuple[list[float], list[float]]]:
    """Per variant timed in a bench_schedule.py JSON: its measured seconds up to the end of each epoch, and those of
    that file's reference variant (the ratio of the two is read within one file, since they ran side by side)."""
    clocks = {}
    for path in (paths or "").split(","):
        if not path:
            continue
        timing = json.loads(Path(path).read_text())
        seconds = {row["variant"]: list(accumulate(row["epoch_s_median"])) for row in timing["rows"]}
        if any(len(cumulative) != epochs for cumulative in seconds.values()):
            raise SystemExit(f"error: --schedule_timings: {path} does not time a {epochs}-epoch schedule")
        for variant, cumulative in seconds.items():
            clocks.setdefault(variant, (cumulative, seconds[timing["reference"]]))
    return clocks


def summarise(records: list[dict], headline: str, clocks: dict | None = None) -> dict:
    """Per variant and epoch, each SUMMARISED value's mean, min and max over seeds and, for the accuracies, the mean
    difference from the first variant over the seeds both have evaluated (paired, so that a seed still to come does not
    shift it); per linear probe (`headline` pooling first) and variant, when its mean probe first reaches the first
    variant's final one (see first_reaching)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for record in records:
        groups.setdefault((record["variant"], record["epoch"]), []).append(record)
    rows = []
    for (variant, epoch), group in groups.items():
        row = {"variant": variant, "epoch": epoch, "seeds": [record["seed"] for record in group]}
        for key in SUMMARISED:
            values = [record[key] for record in group if record.get(key) is not None]
            row[key] = {"mean": fmean(values), "min": min(values), "max": max(values)} if values else None
        rows.append(row)
    reference = records[0]["variant"]
    by_evaluation = {(record["variant"], record["seed"], record["epoch"]): record for record in records}
    for row in rows:
        epoch = row["epoch"]
        pairs = [
            (by_evaluation[row["variant"], seed, epoch], by_evaluation.get((reference, seed, epoch)))
            for seed in row["seeds"]
        ]
        for key in ACCURACIES:
            differences = [run[key] - base[key] for run, base in pairs if base and None not in (run[key], base[key])]
            if differences:
                row[f"delta_{key}"] = fmean(differences)
    probes = [f"linear_probe_{pooling}" for pooling in dict.fromkeys((headline, "cls", "mean"))]
    reached = {probe: first_reaching(rows, reference, probe, clocks or {}) for probe in probes}
    return {"reference": reference, "headline": probes[0], "rows": rows, "reached": reached}


def first_reaching(rows: list[dict], reference: str, probe: str, clocks: dict) -> dict:
    """Per variant, its first evaluation whose mean `probe` is at least the reference variant's final one: the epoch
    and pre-training minutes, both over the reference's final ones, and, for a variant in `clocks`
    (schedule_clocks), the measured seconds to that epoch over the reference's to its final epoch."""
    reference_rows = [row for row in rows if row["variant"] == reference and row[probe] and row["train_minutes"]]
    if not reference_rows:
        return {}
    final = max(reference_rows, key=lambda row: row["epoch"])
    reached = {}
    for variant in dict.fromkeys(row["variant"] for row in rows):
        curve = sorted((row for row in rows if row["variant"] == variant and row[probe]), key=lambda r: r["epoch"])
        first = next((row for row in curve if row[probe]["mean"] >= final[probe]["mean"]), None)
        reached[variant] = first and {
            "epoch": first["epoch"],
            "epoch_ratio": first["epoch"] / final["epoch"],
            "train_minutes": first["train_minutes"]["mean"],
            "time_ratio": first["train_minutes"]["mean"] / final["train_minutes"]["mean"],
        }
        if first and variant in clocks:
            seconds, reference_seconds = clocks[variant]
            reached[variant]["clock_ratio"] = seconds[first["epoch"] - 1] / reference_seconds[final["epoch"] - 1]
    return reached


def plot(summary: dict, path: Path, clocks: dict) -> None:
    """Learning curves: mean over seeds, the band spanning the seeds; mean pooling solid, [CLS] dashed. Against epochs,
    and against time: the measured schedule time where `clocks` (schedule_clocks) times every variant, as a share of
    the reference's whole schedule, else the runs' own clocks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 7))
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2)
    variants = list(dict.fromkeys(row["variant"] for row in summary["rows"]))
    measured = all(name in clocks for name in variants)

    def time_of(row: dict) -> float:
        if not measured:
            return row["train_minutes"]["mean"]
        seconds, reference_seconds = clocks[row["variant"]]
        return seconds[row["epoch"] - 1] / reference_seconds[-1]

    reference = summary["reference"]
    time_label = f"measured schedule time ({reference}'s = 1)" if measured else "pre-training wall-clock (min)"
    for variant_index, name in enumerate(variants):
        rows = sorted((row for row in summary["rows"] if row["variant"] == name), key=lambda row: row["epoch"])
        color = f"C{variant_index % 10}"
        for pooling, style in (("mean", "-"), ("cls", "--")):
            for row_index, protocol in enumerate(("linear_probe", "knn")):
                key = f"{protocol}_{pooling}"
                points = [row for row in rows if row[key] and row["train_minutes"]]
                for column, x_of in enumerate((lambda r: r["epoch"], time_of)):
                    axis = axes[row_index, column]
                    x = [x_of(row) for row in points]
                    axis.plot(x, [row[key]["mean"] for row in points], style, marker="o", color=color,
                              label=f"{name}, {pooling}")  # fmt: skip
                    axis.fill_between(x, [row[key]["min"] for row in points], [row[key]["max"] for row in points],
                                      color=color, alpha=0.15)  # fmt: skip
                    axis.set_xlabel("epoch" if column == 0 else time_label)
                    axis.set_ylabel(f"{protocol} top-1 (%)")
                    axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(str(path), dpi=110)


def print_tables(records: list[dict], summary: dict, headline: str) -> None:
    other = "cls" if headline == "mean" else "mean"
    keys = (f"knn_{headline}", f"linear_probe_{headline}", f"knn_{other}", f"linear_probe_{other}")
    keys += ("centre_masked_share",)
    names = ("kNN", "probe", "kNN*", "probe*", "centre")
    print(f"per run ({headline} pooling; * the other pooling)")
    print(f"{'variant':<12}{'seed':>5}{'epoch':>6}{'minutes':>9}" + "".join(f"{name:>8}" for name in names))
    for r in records:
        cells = [cell(r[key], ".3f" if key == "centre_masked_share" else ".2f") for key in keys]
        print(f"{r['variant']:<12}{r['seed']:>5}{r['epoch']:>6}{r['train_minutes']:>9.1f}"
              + "".join(f"{c:>8}" for c in cells))  # fmt: skip
    print(f"\nmean over seeds [min, max]; delta: minus {summary['reference']}, paired by seed, mean over seeds")
    print(f"{'variant':<12}{'epoch':>6}{'probe':>22}{'delta':>8}{'kNN':>22}{'delta':>8}")
    for row in summary["rows"]:
        cells = []
        for key in (f"linear_probe_{headline}", f"knn_{headline}"):
            value = row[key]
            cells.append(f"{value['mean']:.2f} [{value['min']:.2f}, {value['max']:.2f}]" if value else "-")
            cells.append(cell(row.get(f"delta_{key}"), "+.2f"))
        print(f"{row['variant']:<12}{row['epoch']:>6}" + "".join(f"{c:>22}" if i % 2 == 0 else f"{c:>8}"
                                                         for i, c in enumerate(cells)))  # fmt: skip
    for probe, reached in summary["reached"].items():
        print(f"\nfirst reaching {summary['reference']}'s final {probe}: {json.dumps(reached)}")


ANALYSIS_COLUMNS = {
    "centre_masked_share": ("centre share", ".3f"), "object_part_fraction": ("object part", ".3f"),
    "half_cut_share": ("half cuts", ".2f"), "position_share_last": ("position share", ".2f"),
    "attention_distance_last": ("attn dist last (px)", ".1f"), "feature_variance": ("feature variance", ".3f"),
}  # fmt: skip


def table_row(cells: list[str]) -> str:
    """One Markdown table line."""
    return "| " + " | ".join(cells) + " |"


def target_table(summary: dict, poolings: list[str]) -> list[str]:
    """Markdown lines: each variant against the reference on the comparison's targets, per pooling: the evaluated
    epochs where its mean probe leads by at least 1 point, those where its mean kNN trails, and whether it first
    reaches the reference's final probe within 0.8x the epochs (and the measured time, where timed), naming the
    reference's own first epoch at that probe where it is earlier than its final one (its curve has levelled off)."""
    reference = summary["reference"]
    lines = [f"Targets against {reference}, per pooling (the Δ of the first table at each evaluated epoch):", ""]
    header = ["variant", "pooling", f"probe ≥ {reference} + 1", f"kNN below {reference}", f"{reference}'s final probe"]
    lines += [table_row(header), "|" + "---|" * len(header)]
    for variant in dict.fromkeys(row["variant"] for row in summary["rows"]):
        if variant == reference:
            continue
        rows = sorted((row for row in summary["rows"] if row["variant"] == variant), key=lambda row: row["epoch"])
        for pooling in poolings:
            probe, knn = f"delta_linear_probe_{pooling}", f"delta_knn_{pooling}"
            compared = [row for row in rows if probe in row]
            ahead = [str(row["epoch"]) for row in compared if row[probe] >= 1.0]
            behind = [str(row["epoch"]) for row in rows if knn in row and row[knn] < 0]
            reached_by = summary["reached"].get(f"linear_probe_{pooling}", {})
            first, own = reached_by.get(variant), reached_by.get(reference)
            reached = "not reached" if first is None else f"epoch {first['epoch']}, " + ", ".join(
                f"{first[key]:.2f}x the {unit} ({'met' if first[key] <= 0.8 else 'not met'})"
                for key, unit in (("epoch_ratio", "epochs"), ("clock_ratio", "measured time")) if key in first
            ) + (f"; {reference} itself: epoch {own['epoch']}" if own and own["epoch_ratio"] < 1 else "")  # fmt: skip
            cells = [variant, "[CLS]" if pooling == "cls" else "mean"]
            cells += [f"{len(ahead)} of {len(compared)} epochs" + (f" ({', '.join(ahead)})" if ahead else "")]
            cells += [", ".join(behind) or "none", reached]
            lines.append(table_row(cells))
    return lines


def markdown_report(records: list[dict], summary: dict, headline: str) -> str:
    """The tables of the docs: means over seeds with the difference from the first variant (accuracies, `headline`
    pooling first, then the analysis columns), every evaluation per seed, the targets, and when each variant first
    reaches the first variant's final probe. Minus signs are U+2212, as in the docs' prose."""

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec).replace("-", "\u2212")

    other = "mean" if headline == "cls" else "cls"
    accuracies = [f"{protocol}_{pooling}" for protocol in ("linear_probe", "knn") for pooling in (headline, other)]
    titles = [f"{'probe' if key.startswith('linear') else 'kNN'}, {'[CLS]' if key.endswith('cls') else 'mean'}"
              for key in accuracies]  # fmt: skip
    lines = [f"Means over seeds [min, max]; Δ: minus {summary['reference']}, paired by seed, mean over seeds.", ""]
    header = ["variant", "epoch", *(f"{title} (Δ)" for title in titles), *(t for t, _ in ANALYSIS_COLUMNS.values())]
    lines += [table_row(header), "|" + "---|" * len(header)]
    for row in summary["rows"]:
        cells = [row["variant"], str(row["epoch"])]
        for key in accuracies:
            value, delta = row[key], row.get(f"delta_{key}")
            text = f"{value['mean']:.2f} [{value['min']:.2f}, {value['max']:.2f}]" if value else "-"
            shown = delta is not None and row["variant"] != summary["reference"]
            cells.append(text + (f" ({number(delta, '+.2f')})" if shown else ""))
        cells += [number(row[key] and row[key]["mean"], spec) for key, (_, spec) in ANALYSIS_COLUMNS.items()]
        lines.append(table_row(cells))
    lines += ["", "Every evaluation (pre-training minutes: the run's own clock, on a machine it may have shared).", ""]
    header = ["variant", "seed", "epoch", *titles, "centre share", "object part", "pre-training min"]
    lines += [table_row(header), "|" + "---|" * len(header)]
    for record in records:
        cells = [record["variant"], str(record["seed"]), str(record["epoch"])]
        cells += [number(record[key], ".2f") for key in accuracies]
        cells += [number(record[key], ".3f") for key in ("centre_masked_share", "object_part_fraction")]
        lines.append(table_row([*cells, number(record["train_minutes"], ".1f")]))
    lines += ["", *target_table(summary, [headline, other]), ""]
    for probe, reached in summary["reached"].items():
        lines.append(f"First reaching {summary['reference']}'s final {probe} (mean of seeds):")
        for variant, first in reached.items():
            found = "not within the evaluated epochs" if first is None else (
                f"epoch {first['epoch']} ({first['epoch_ratio']:.2f}x the epochs, "
                f"{first['time_ratio']:.2f}x the minutes"
                + (f", {first['clock_ratio']:.2f}x the measured schedule time)" if "clock_ratio" in first else ")")
            )  # fmt: skip
            lines.append(f"- {variant}: {found}")
        lines.append("")
    return "\n".join(lines)


def evaluate_checkpoint(args: CompareArguments, name: str, seed: int, epoch: int, checkpoint: Path) -> dict:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    metrics = run_analysis(args, checkpoint)
    mask_shares = metrics.get("exploitation_rate_mask")
    accuracies = evaluate(args, checkpoint)
    return {
        "variant": name,
        "seed": seed,
        "epoch": epoch,
        "step": state["step"],
        "train_minutes": state["train_seconds"] / 60,
        **accuracies,
        "bipartition_gap": metrics.get("bipartition_gap"),
        "cosine_gap": metrics.get("bipartition_cosine_gap"),
        "feature_variance": metrics.get("feature_variance"),
        "attention_distance_last": metrics["attention_distance"][-1] if metrics else None,
        "exploitation_mask_share": sum(mask_shares) / len(mask_shares) if mask_shares else None,
        "centre_masked_share": metrics.get("informed_mask_centre_share"),
        "object_part_fraction": metrics.get("object_part_fraction"),
        "object_part_fraction_median": metrics.get("object_part_fraction_median"),
        "half_cut_share": metrics.get("half_cut_share"),
        "object_centre_share": metrics.get("object_centre_share"),
        "part_overlap": metrics.get("part_overlap"),
        "part_overlap_chance": metrics.get("part_overlap_chance"),
        "position_share_last": metrics["position_share"][-1] if metrics.get("position_share") else None,
        "reconstruction_loss": metrics.get("reconstruction_loss"),
        "commit": code_commit(),  # sittings may run different commits (a run's own sitting trains and evaluates it)
    }


class Records:
    """The evaluations measured so far, in this sitting or an earlier one, written to the JSON after each new one."""

    def __init__(self, args: CompareArguments, runs: list[tuple[str, str, int]]):
        self.args, self.path = args, Path(args.output_dir) / "compare_masking.json"
        self.order = {(name, seed): index for index, (name, _, seed) in enumerate(runs)}
        self.lock = threading.Lock()
        self.command = shlex.join(["python", *sys.argv])
        self.device = device_name()
        self.by_key: dict[tuple[str, int, int], dict] = {}
        # read once, before any run trains: a file timing another schedule is refused at the start, not hours in
        self.clocks = schedule_clocks(args.schedule_timings, args.epochs)
        if self.path.is_file():
            earlier = json.loads(self.path.read_text())
            differing = sorted(
                key for key, value in vars(args).items()
                if key not in SITTING_ARGUMENTS and key in earlier["args"] and earlier["args"][key] != value
            )  # fmt: skip
            if differing:
                raise SystemExit(
                    f"error: {self.path} holds a comparison with other settings ({', '.join(differing)}); "
                    "choose another --output_dir"
                )
            self.by_key = {(r["variant"], r["seed"], r["epoch"]): r for r in earlier["records"]}

    def __contains__(self, key: tuple[str, int, int]) -> bool:
        return key in self.by_key

    def add(self, record: dict) -> None:
        with self.lock:
            self.by_key[record["variant"], record["seed"], record["epoch"]] = record
            self.write()

    def sorted(self) -> list[dict]:
        key = lambda record: (self.order.get((record["variant"], record["seed"]), math.inf), record["epoch"])  # noqa: E731
        return sorted(self.by_key.values(), key=key)

    def write(self) -> dict:
        records = self.sorted()
        summary = summarise(records, self.args.probe_pooling, self.clocks) if records else {"rows": [], "reached": {}}
        written = {"command": self.command, "device": self.device, "args": vars(self.args), "commit": code_commit()}
        written |= {"records": records, "summary": summary}
        temporary = self.path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(written, indent=2))
        temporary.replace(self.path)
        if records:
            self.path.with_suffix(".md").write_text(markdown_report(records, summary, self.args.probe_pooling))
        return summary


def device_name() -> str:
    """The accelerator the runs train on (the pre-training script takes a GPU when there is one), or the CPU's."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


def epoch_checkpoints(folder: Path) -> dict[int, Path]:
    """The complete checkpoints of a run by epoch (written at epoch ends by pretraining_command)."""
    found = {}
    for checkpoint in folder.glob("checkpoint-*"):
        if (checkpoint / "trainer_state.json").is_file():
            found[json.loads((checkpoint / "trainer_state.json").read_text())["epoch"]] = checkpoint
    return found


def run_and_evaluate(
    args: CompareArguments, sitting: Sitting, records: Records, eval_epochs: list[int], run: tuple[str, str, int]
) -> None:
    """Pre-train one variant and seed (resuming), evaluating each evaluation epoch's checkpoint as soon as it is
    written; within the sitting, leaving time for the last evaluation."""
    name, extra, seed = run
    folder = Path(args.runs_dir) / f"{name}-seed{seed}"
    waiting = [epoch for epoch in eval_epochs if (name, seed, epoch) not in records]
    process, log = None, folder / "pretrain.log"
    minutes = sitting.minutes_left() - args.evaluation_minutes
    trained = (folder / "train_results.json").is_file()
    if waiting and not (trained or args.evaluate_only or args.collect_only) and minutes > 1:
        command = pretraining_command(args, name, extra, seed, folder)
        process = start(command + ([] if math.isinf(minutes) else ["--stop_after_minutes", f"{minutes:.1f}"]), log)
    while True:
        running = process is not None and process.poll() is None
        checkpoints = epoch_checkpoints(folder)
        for epoch in [epoch for epoch in waiting if epoch in checkpoints]:
            if sitting.minutes_left() < args.evaluation_minutes / 2:
                break
            record = evaluate_checkpoint(args, name, seed, epoch, checkpoints[epoch])
            if record["knn_mean"] is None:
                continue  # --collect_only, and not evaluated where the run was
            records.add(record)
            waiting.remove(epoch)
            copy_panel(args, name, seed, epoch, checkpoints[epoch])
        if not running:
            break
        time.sleep(POLL_SECONDS)
    if process is not None:
        finish(process, log)
    for epoch in waiting:
        if args.collect_only or epoch not in epoch_checkpoints(folder):
            print(f"not yet evaluated: {name} seed {seed} epoch {epoch}")


def copy_panel(args: CompareArguments, name: str, seed: int, epoch: int, checkpoint: Path) -> None:
    panel = checkpoint / "analysis" / "figure_panel.png"
    if epoch in args.panel_epochs and panel.is_file():
        shutil.copyfile(panel, Path(args.output_dir) / f"figure_panel_{name}_seed{seed}_epoch{epoch}.png")


def main() -> None:
    args = parse_args()
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    variants = split_variants(args.variants)
    runs = [(name, extra, int(seed)) for seed in args.seeds.split(",") for name, extra in variants]
    eval_epochs = [int(e) for e in args.eval_epochs.split(",")] if args.eval_epochs else range(1, args.epochs + 1)
    eval_epochs = list(dict.fromkeys(eval_epochs))
    panel_epochs = args.panel_epochs.split(",") if args.panel_epochs else [eval_epochs[0], eval_epochs[-1]]
    args.panel_epochs = [int(epoch) for epoch in panel_epochs]
    records, sitting = Records(args, runs), Sitting(args.stop_after_minutes)
    with ThreadPoolExecutor(args.parallel_runs) as pool:
        run_all(pool, lambda run: run_and_evaluate(args, sitting, records, eval_epochs, run), runs)
    summary = records.write()
    missing = len(runs) * len(eval_epochs) - len(records.by_key)
    if records.by_key:
        print_tables(records.sorted(), summary, args.probe_pooling)
        plot(summary, Path(args.output_dir) / "compare_masking.png", records.clocks)
    if missing:
        print(f"\n{missing} evaluations still to come; the same command continues (runs in {args.runs_dir})")


if __name__ == "__main__":
    main()
