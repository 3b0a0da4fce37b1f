#!/usr/bin/env python
"""Does self-guided masking learn faster than MAE's random masking? Pre-train both from the same initialisation,
seed, data order and crops, then evaluate kNN and linear-probe accuracy at several epochs.

    python -m benchmarks.compare_masking --dataset_name ../shared/data/cifar10 --epochs 10 --eval_epochs 2,4,6,8,10

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

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from transformers import HfArgumentParser

from benchmarks.masking_report import plot, print_tables
from benchmarks.masking_runs import CompareArguments, Records, Sitting, run_all, run_and_evaluate, split_variants
from sgmae_training.arguments import parse_script_args


def parse_args() -> CompareArguments:
    (args,) = parse_script_args(HfArgumentParser(CompareArguments))
    return args


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
