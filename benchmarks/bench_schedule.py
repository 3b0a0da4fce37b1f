#!/usr/bin/env python
"""Whole pre-training schedules of a comparison's variants, timed against each other on one machine.

    python -m benchmarks.bench_schedule <compare_masking.py's arguments> --max_train_samples 512 --rounds 2 \\
        --output benchmarks/results/bench_schedule_imagenette196.json

`bench_model.py` times one step and `bench_refresh.py` one refresh pass; a run's wall-clock also holds the refresh
passes' share of the schedule, data loading and checkpoints. Here each round runs every variant's
`run_pretraining.py` once (the command `compare_masking.py` builds, first seed), one at a time, in turn, the order
reversed every other round, and reads the loop's own clock from each epoch's checkpoint (`train_seconds`: steps,
data, refresh passes and checkpoints, not start-up). Reported per variant: the median total seconds and the median
over rounds of its ratio to the first variant, and the seconds of each epoch, where the refreshes show. With
`--max_train_samples` the schedule keeps its shape (epochs, informed start, a refresh every tenth of the schedule)
on fewer images, so each part keeps its share of the run. compare_masking.py's evaluation and sitting arguments are
accepted and unused, so its command line can be reused as it is.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from transformers import HfArgumentParser

from benchmarks.compare_masking import CompareArguments
from benchmarks.masking_runs import epoch_checkpoints, pretraining_command, run, split_variants
from benchmarks.provenance import code_commit
from benchmarks.timing import Variant, alternate, cpu_pressure, median_of, paired_ratio
from sgmae_training.arguments import parse_script_args


@dataclass
class ScheduleArguments:
    """How many rounds, and where the result goes."""

    output: Path = field(metadata={"help": "Where the JSON goes."})
    rounds: int = field(default=2, metadata={"help": "Runs of each variant, alternating with the others."})

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise SystemExit("error: --rounds must be at least 1")


def epoch_seconds(folder: Path) -> list[float]:
    """The loop's seconds in each epoch of a finished run, from its epoch checkpoints' cumulative clock."""
    checkpoints = epoch_checkpoints(folder)
    totals = [
        json.loads((checkpoints[epoch] / "trainer_state.json").read_text())["train_seconds"]
        for epoch in sorted(checkpoints)
    ]
    return [later - earlier for earlier, later in zip([0.0, *totals], totals, strict=False)]


def schedule_variants(compare: CompareArguments, runs_dir: Path) -> tuple[list[Variant], dict[str, list]]:
    """One variant per compared masking: a turn runs its whole schedule (first seed) and returns the loop's own
    seconds; the seconds of each epoch are kept, per variant, in the returned lists."""
    seed = int(compare.seeds.split(",")[0])
    epochs: dict[str, list[list[float]]] = {}

    def whole_schedule(name: str, extra: str) -> float:
        folder = runs_dir / f"{name}-round{len(epochs[name])}"
        print(f"round {len(epochs[name]) + 1}: {name}", flush=True)
        run(pretraining_command(compare, name, extra, seed, folder), folder / "pretrain.log")
        epochs[name].append(epoch_seconds(folder))
        shutil.rmtree(folder)
        return sum(epochs[name][-1])

    variants = []
    for name, extra in split_variants(compare.variants):
        epochs[name] = []
        variants.append(Variant(name, lambda _noise, name=name, extra=extra: whole_schedule(name, extra)))
    return variants, epochs


def main() -> None:
    compare, args = parse_script_args(HfArgumentParser((CompareArguments, ScheduleArguments)))
    runs_dir = Path(compare.runs_dir) / "bench_schedule"
    shutil.rmtree(runs_dir, ignore_errors=True)
    pressure_before = cpu_pressure()
    variants, epochs = schedule_variants(compare, runs_dir)
    alternate(variants, rounds=args.rounds, reverse_odd_rounds=True)
    every_round = list(range(args.rounds))
    reference = variants[0].name
    rows = [
        {
            "variant": variant.name,
            "total_s_median": median_of(variant.times, every_round),
            "ratio_to_reference_median": paired_ratio(variant, variants[0], every_round),
            "ratio_to_reference_per_round": [
                mine / base for mine, base in zip(variant.times, variants[0].times, strict=True)
            ],
            "epoch_s_median": [median(column) for column in zip(*epochs[variant.name], strict=True)],
        }
        for variant in variants
    ]
    print(f"whole schedule, {compare.epochs} epochs, {args.rounds} round(s); ratio: to {reference}, paired per round")
    print(f"{'variant':<14}{'seconds':>10}{'ratio':>8}   per round")
    for row in rows:
        rounds = ", ".join(f"{ratio:.3f}" for ratio in row["ratio_to_reference_per_round"])
        print(f"{row['variant']:<14}{row['total_s_median']:>10.1f}{row['ratio_to_reference_median']:>8.3f}   {rounds}")
    report = {
        "command": " ".join(["python", *sys.argv]),
        "commit": code_commit(),
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "cpu_pressure_avg60": {"before": pressure_before, "after": cpu_pressure()},
        "reference": reference,
        "rows": rows,
        "epoch_s": epochs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
