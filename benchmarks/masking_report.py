"""The report of a masking comparison, from its records alone: means and spreads over seeds, paired differences from
the first variant, when each variant first reaches its final probe, the Markdown tables and the learning curves.

    python -m benchmarks.masking_report benchmarks/results/imagenette196_cached/compare_masking.json [--check]

regenerates the summary in the JSON and the Markdown tables beside it from the JSON's records (`--check`: writes
nothing, exits 1 when either would change), so the committed tables are never written by hand.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from itertools import accumulate
from pathlib import Path
from statistics import fmean

POOLED = [(protocol, pooling) for protocol in ("knn", "linear_probe") for pooling in ("cls", "mean")]
ACCURACIES = [f"{protocol}_{pooling}" for protocol, pooling in POOLED]
SUMMARISED = (
    *ACCURACIES, "train_minutes", "centre_masked_share", "object_part_fraction", "bipartition_gap",
    "feature_variance", "attention_distance_last", "exploitation_mask_share", "half_cut_share",
    "object_centre_share", "object_part_fraction_median", "position_share_last",
)  # fmt: skip


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
                    means = [row[key]["mean"] for row in points]
                    axis.plot(x, means, style, marker="o", color=color, label=f"{name}, {pooling}")
                    low, high = ([row[key][bound] for row in points] for bound in ("min", "max"))
                    axis.fill_between(x, low, high, color=color, alpha=0.15)
                    axis.set_xlabel("epoch" if column == 0 else time_label)
                    axis.set_ylabel(f"{protocol} top-1 (%)")
                    axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    figure.tight_layout()
    save_compact(figure, path)


def save_compact(figure, path: Path) -> None:
    """The figure as a PNG of 256 colours: the curves stay sharp at a third of the bytes (the tree travels to lent
    machines)."""
    from PIL import Image

    drawn = io.BytesIO()
    figure.savefig(drawn, format="png", dpi=110)
    Image.open(drawn).convert("RGB").quantize(256).save(path, format="PNG", optimize=True)


def print_tables(records: list[dict], summary: dict, headline: str) -> None:
    other = "cls" if headline == "mean" else "mean"
    keys = (f"knn_{headline}", f"linear_probe_{headline}", f"knn_{other}", f"linear_probe_{other}")
    keys += ("centre_masked_share",)
    names = ("kNN", "probe", "kNN*", "probe*", "centre")
    print(f"per run ({headline} pooling; * the other pooling)")
    print(f"{'variant':<12}{'seed':>5}{'epoch':>6}{'minutes':>9}" + "".join(f"{name:>8}" for name in names))
    for r in records:
        cells = [cell(r[key], ".3f" if key == "centre_masked_share" else ".2f") for key in keys]
        print(
            f"{r['variant']:<12}{r['seed']:>5}{r['epoch']:>6}{r['train_minutes']:>9.1f}"
            + "".join(f"{c:>8}" for c in cells)
        )
    print(f"\nmean over seeds [min, max]; delta: minus {summary['reference']}, paired by seed, mean over seeds")
    print(f"{'variant':<12}{'epoch':>6}{'probe':>22}{'delta':>8}{'kNN':>22}{'delta':>8}")
    for row in summary["rows"]:
        cells = []
        for key in (f"linear_probe_{headline}", f"knn_{headline}"):
            value = row[key]
            cells.append(f"{value['mean']:.2f} [{value['min']:.2f}, {value['max']:.2f}]" if value else "-")
            cells.append(cell(row.get(f"delta_{key}"), "+.2f"))
        print(
            f"{row['variant']:<12}{row['epoch']:>6}"
            + "".join(f"{c:>22}" if i % 2 == 0 else f"{c:>8}" for i, c in enumerate(cells))
        )
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
            reached = (
                "not reached"
                if first is None
                else f"epoch {first['epoch']}, "
                + ", ".join(
                    f"{first[key]:.2f}x the {unit} ({'met' if first[key] <= 0.8 else 'not met'})"
                    for key, unit in (("epoch_ratio", "epochs"), ("clock_ratio", "measured time"))
                    if key in first
                )
                + (f"; {reference} itself: epoch {own['epoch']}" if own and own["epoch_ratio"] < 1 else "")
            )
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
    titles = [
        f"{'probe' if key.startswith('linear') else 'kNN'}, {'[CLS]' if key.endswith('cls') else 'mean'}"
        for key in accuracies
    ]
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
            found = (
                "not within the evaluated epochs"
                if first is None
                else (
                    f"epoch {first['epoch']} ({first['epoch_ratio']:.2f}x the epochs, "
                    f"{first['time_ratio']:.2f}x the minutes"
                    + (f", {first['clock_ratio']:.2f}x the measured schedule time)" if "clock_ratio" in first else ")")
                )
            )
            lines.append(f"- {variant}: {found}")
        lines.append("")
    return "\n".join(lines)


def checked_out(paths: str | None) -> str | None:
    """Comma-separated timing files as this checkout holds them: one recorded by its path in another checkout of
    the repository is read from this one's benchmarks/results/ under the same name."""
    if not paths:
        return paths
    results = Path(__file__).resolve().parent / "results"
    return ",".join(path if Path(path).is_file() else str(results / Path(path).name) for path in paths.split(","))


def regenerated(path: Path) -> tuple[str, str]:
    """The JSON at `path` with its summary recomputed from its records, and the Markdown tables from them."""
    written = json.loads(path.read_text())
    args, records = written["args"], written["records"]
    clocks = schedule_clocks(checked_out(args.get("schedule_timings")), args["epochs"])
    summary = summarise(records, args["probe_pooling"], clocks) if records else {"rows": [], "reached": {}}
    text = json.dumps(written | {"summary": summary}, indent=2)
    return text, markdown_report(records, summary, args["probe_pooling"]) if records else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, nargs="+", help="compare_masking.json files")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file would change")
    options = parser.parse_args()
    changed = []
    for path in options.json:
        text, markdown = regenerated(path)
        for target, content in ((path, text), (path.with_suffix(".md"), markdown)):
            if not target.is_file() or target.read_text() != content:
                changed.append(str(target))
                if not options.check:
                    target.write_text(content)
    if changed:
        print(("would change: " if options.check else "regenerated: ") + ", ".join(changed))
    sys.exit(1 if changed and options.check else 0)


if __name__ == "__main__":
    main()
