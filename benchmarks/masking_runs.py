"""The runs of a masking comparison: one `run_pretraining.py` process per variant and seed, each evaluated checkpoint
given kNN, linear probe and the analysis toolkit while the run goes on, and the records kept across sittings.
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
from pathlib import Path
from typing import Literal

from benchmarks.masking_report import ACCURACIES, POOLED, markdown_report, schedule_clocks, summarise
from benchmarks.provenance import REPO, code_commit

# Arguments that do not change what is measured: a sitting may change them and keep the records of earlier ones.
SITTING_ARGUMENTS = {
    "output_dir", "runs_dir", "parallel_runs", "stop_after_minutes", "evaluation_minutes", "evaluate_only",
    "collect_only", "num_workers", "panel_epochs", "schedule_timings", "seeds", "keep_checkpoints",
}  # fmt: skip
POLL_SECONDS = 15.0


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
    keep_checkpoints: Literal["all", "evaluated"] = field(
        default="all",
        metadata={
            "help": "evaluated: delete each checkpoint that is neither an evaluation epoch's nor a run's newest as "
            "the runs go on (a large model's 100 epoch checkpoints would fill a lent machine's disk)."
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
                key
                for key, value in vars(args).items()
                if key not in SITTING_ARGUMENTS and key in earlier["args"] and earlier["args"][key] != value
            )
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
        if args.keep_checkpoints == "evaluated":
            prune_unevaluated(folder, eval_epochs)
        if not running:
            break
        time.sleep(POLL_SECONDS)
    if process is not None:
        finish(process, log)
    for epoch in waiting:
        if args.collect_only or epoch not in epoch_checkpoints(folder):
            print(f"not yet evaluated: {name} seed {seed} epoch {epoch}")


def prune_unevaluated(folder: Path, eval_epochs: list[int]) -> None:
    """Delete a run's complete checkpoints that are neither at an evaluation epoch nor its newest (it resumes
    there)."""
    checkpoints = epoch_checkpoints(folder)
    for epoch, checkpoint in checkpoints.items():
        if epoch not in eval_epochs and epoch != max(checkpoints):
            shutil.rmtree(checkpoint, ignore_errors=True)


def copy_panel(args: CompareArguments, name: str, seed: int, epoch: int, checkpoint: Path) -> None:
    panel = checkpoint / "analysis" / "figure_panel.png"
    if epoch in args.panel_epochs and panel.is_file():
        shutil.copyfile(panel, Path(args.output_dir) / f"figure_panel_{name}_seed{seed}_epoch{epoch}.png")
