#!/usr/bin/env python
"""How many epochs of a comparison fit in the time left of a GPU budget, from the model step rate just measured.

    python benchmarks/gpu_plan.py bench_script_gpu.json --seconds_left 400 --runs 6 --steps_per_epoch 73 \
        --batch_size 128 --max_epochs 100 --bench_model_json bench_model_gpu.json --bench_model_config imagenette196
    # prints: EPOCHS EVAL_EPOCHS

A run's cost is its steps at the rate of one model step (`medians.model` of bench_script.py's JSON, images/s),
times the self-guided / random step-time ratio that bench_model.py measured for the same model on the same device
(with cached masks, the default: the cached step's ratio plus the refresh passes, a tenth of the schedule apart, each
charged as its measured time over a random step's, per image; else the per-step source's `self_guided_last` ratio;
SELF_GUIDED_COST where neither was measured), charged to every run; the
runs share the device but are counted as if they did not overlap at all, an upper bound, so the epochs chosen fit
even if one run already fills the device.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

# Without a measurement on the device: SG-MAE's pre-training wall-clock over MAE's in the 64-patch CPU comparison
# (compare_masking_imagenette64.json: 1.39 and 1.43).
SELF_GUIDED_COST = 1.4
EVALUATION_SECONDS = 90  # kept for the last checkpoints' kNN, probe and analysis (GPU)
EVAL_SHARES = (0.1, 0.25, 0.5, 0.75, 1.0)


# Refresh passes of the cached masks over a run: at the start (a quarter of the schedule), then every tenth of it.
REFRESHES = 8


def self_guided_cost(bench_model_json: str | None, config: str, epochs: int = 100) -> tuple[float, str]:
    """The self-guided / random step-time ratio bench_model.py measured for `config` (at least 1), and its source.

    Cached masks (measurement 4): the cached step's ratio, plus REFRESHES passes over the data in `epochs` epochs,
    each image's pass costing the refresh's time over a random step's (same batch size)."""
    try:
        with open(bench_model_json or "") as handle:
            rows = json.load(handle)["results"]
        row = next(row for row in rows if row["config"] == config)
    except (OSError, ValueError, KeyError, StopIteration):  # bench_model.py cut short or not run
        return SELF_GUIDED_COST, "not measured here: the 64-patch CPU comparison's"
    if "cached" in row:
        cached = row["cached"]
        refresh = cached["refresh"]["lanczos"]["median_s"] / cached["random_median_step_s"]
        cost = cached["cached_ratio_vs_random"] + REFRESHES * refresh / max(epochs, 1)
        return max(1.0, cost), f"measured for {config}, cached masks with {REFRESHES} refreshes"
    if "self_guided" in row:
        return max(1.0, row["self_guided"]["self_guided"]["self_guided_last"]["ratio_vs_random"]), (
            f"measured for {config}"
        )
    return SELF_GUIDED_COST, "not measured here: the 64-patch CPU comparison's"


def plan(
    rate: float, seconds_left: float, runs: int, steps_per_epoch: int, batch_size: int, max_epochs: int,
    cost: float = SELF_GUIDED_COST,
):  # fmt: skip
    """(epochs, evaluation epochs, seconds one epoch of all runs takes at most)."""
    epoch_seconds = runs * cost * steps_per_epoch * batch_size / rate
    fit = int((seconds_left - EVALUATION_SECONDS) / epoch_seconds)
    epochs = max(1, min(max_epochs, fit // 10 * 10 if fit >= 10 else fit))
    evaluations = list(dict.fromkeys(max(1, round(epochs * share)) for share in EVAL_SHARES))
    return epochs, evaluations, epoch_seconds


@dataclass
class PlanArguments:
    """The budget and the comparison to fit in it (bench_script.py's JSON is the one positional argument)."""

    seconds_left: float
    runs: int
    steps_per_epoch: int
    batch_size: int
    max_epochs: int
    bench_model_json: str | None = field(
        default=None, metadata={"help": "bench_model.py's JSON from the same device."}
    )
    bench_model_config: str = field(default="imagenette196", metadata={"help": "Its config for the compared model."})


def main() -> None:
    parser = HfArgumentParser(PlanArguments, description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_script_json")  # positional: a dataclass field can only be a --flag
    values = vars(parser.parse_args())  # argparse's own usage error for an unknown or missing option
    bench_script_json = values.pop("bench_script_json")
    args = PlanArguments(**values)
    with open(bench_script_json) as handle:
        rate = json.load(handle)["medians"]["model"]
    cost, source = self_guided_cost(args.bench_model_json, args.bench_model_config, args.max_epochs)
    epochs, evaluations, epoch_seconds = plan(
        rate, args.seconds_left, args.runs, args.steps_per_epoch, args.batch_size, args.max_epochs, cost
    )
    print(
        f"plan: model step {rate:.0f} img/s; self-guided cost {cost:.2f}x ({source}); "
        f"{args.runs} runs take at most {epoch_seconds:.1f} s an epoch; "
        f"{args.seconds_left:.0f} s left: {epochs} epochs, evaluated at {evaluations}",
        file=sys.stderr,
    )
    print(epochs, ",".join(map(str, evaluations)))


if __name__ == "__main__":
    main()
