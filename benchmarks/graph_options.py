#!/usr/bin/env python
"""Which features, graph, split and object rule cut a model's own patch features best? docs/method.md §3 steps 1-4.

    python -m benchmarks.graph_options --dataset_name ../shared/data/cifar10 \\
        --checkpoints outputs/compare10/mae-seed0/checkpoint-*
    python -m benchmarks.graph_options --options mask_quality --dataset_name ../shared/data/imagenette \\
        --dataset_config_name 112px --split validation --num_images 256 --fiedler_solver eigh \\
        --checkpoints RUNS/mae/checkpoint-* RUNS/sgmae/checkpoint-* \\
        --output benchmarks/results/mask_quality_imagenette196.json

For each checkpoint (grouped by run, in training order), the patch features of the first `--num_images` images of
the split are cut with every option of the chosen set, always on the same images:
- `graphs` (the original set): every graph (`similarity`, `binary_fixed` at tau, `binary_mean`) with every object
  rule (`max_abs`, `smaller`);
- `mask_quality` (issue 32): one factor at a time from the config's masking (`today`) and from the same with each
  position's mean feature over the images removed (`centred`): the feature source (after the final LayerNorm, an
  earlier block, the last block's attention keys), the centring mean (over all images, or per batch of
  `--batch_size` as per-step masks would have it), the graph (binary at the image mean, at a per-image quantile,
  k-nearest neighbours), the split (mean or zero) and the object rule (`max_abs` or `smaller`); plus any
  `--option NAME=field=value,...` given.

Reported per option: whether the cut follows position (the share of "half" cuts, where the object part and the rest
lie >= 85 % on opposite sides of a midline; the share of object parts >= 85 % on one side), the object part's size
(median and quartiles, as a share of the patches) and its share inside the central region, the share of the central
patches that the informed mask hides (a random mask: the mask ratio), how alike the object parts of different images
are (mean pairwise IoU, next to its value for the same sizes placed at random: a cut that follows position stands
well above it), the cosine gap (mean cosine of patch pairs
inside a part minus across parts, on the features that were cut), the edge density and the images without a cut;
per checkpoint, the position share of every block's features (`PositionShare`). Writes JSON (with the code's
commit) and, with `--markdown`, a table; with `--panel_dir`, Figure-1 panels of `--panel_options`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import torch
from transformers import HfArgumentParser

from benchmarks.provenance import REPO, code_commit
from modeling_sgmae import SGMAEForPreTraining
from modeling_sgmae.analysis import (
    PositionShare,
    feature_statistics,
    figure_panel,
    full_image_encoding,
    masking_position_mean,
)
from sgmae_training.analyze import load_image_processor, probe_batch
from sgmae_training.arguments import parse_script_args

GRAPHS = ("similarity", "binary_fixed", "binary_mean")
RULES = ("max_abs", "smaller")
# The masking before issue 32, spelled out: a checkpoint saved before then lacks the new fields, so it would load
# with the new defaults.
TODAY = {
    "mask_feature_source": "hidden",
    "feature_centering": "none",
    "graph_edges": "similarity",
    "partition_split": "mean",
    "foreground_rule": "max_abs",
}
CENTRED = TODAY | {"feature_centering": "position_mean"}
BATCH_CENTRED = "batch"  # pseudo-field of an option: centre each batch of --batch_size images by its own mean


def one_factor_options(base_name: str, base: dict, num_layers: int) -> dict[str, dict]:
    """The options that change one factor of `base` (config overrides)."""
    factors = {
        "layernorm": {"mask_feature_source": "layernorm"},
        f"block {num_layers - 1}": {"mask_feature_layer": num_layers - 1},
        f"block {num_layers // 2}": {"mask_feature_layer": num_layers // 2},
        "keys": {"mask_feature_source": "keys"},
        "binary_mean": {"graph_edges": "binary_mean"},
        "quantile 0.8": {"graph_edges": "binary_quantile", "graph_quantile": 0.8},
        "knn 10": {"graph_edges": "knn", "graph_knn": 10},
        "split zero": {"partition_split": "zero"},
        "smaller": {"foreground_rule": "smaller"},
        "inner": {"foreground_rule": "inner"},
    }
    return {f"{base_name} + {name}": base | change for name, change in factors.items()}


def option_set(name: str, num_layers: int, extra: list[str], graph_threshold: float) -> dict[str, dict]:
    """Option name -> config overrides (plus BATCH_CENTRED) for `--options`, and the `--option`s given."""
    if name == "graphs":
        options = {
            f"{graph} / {rule}": {"graph_edges": graph, "foreground_rule": rule, "graph_threshold": graph_threshold}
            for graph, rule in itertools.product(GRAPHS, RULES)
        }
    else:
        options = {"today": dict(TODAY)}
        options |= one_factor_options("today", TODAY, num_layers)
        options["centred"] = dict(CENTRED)
        options["centred per batch"] = CENTRED | {BATCH_CENTRED: True}
        options |= one_factor_options("centred", CENTRED, num_layers)
    for text in extra:
        option_name, _, assignments = text.partition("=")
        options[option_name] = parse_assignments(assignments)
    return options


def parse_assignments(text: str) -> dict:
    """`field=value,field=value` -> dict, values parsed as JSON where they parse (numbers, true), else strings."""
    overrides = {}
    for assignment in filter(None, text.split(",")):
        field, _, value = assignment.partition("=")
        try:
            overrides[field.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field.strip()] = value.strip()
    return overrides


@dataclass
class GraphOptionsArguments:
    """Which checkpoints and images, which option grid, and where the results go."""

    dataset_name: str = field(metadata={"help": "Dataset in the Hub layout (a local folder offline)."})
    checkpoints: list[str] = field(metadata={"help": "Pre-training checkpoints or model folders."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    split: str = field(default="test", metadata={"help": "The split the images come from."})
    num_images: int = field(default=512, metadata={"help": "The first N images of the split."})
    batch_size: int = field(default=128, metadata={"help": "Images per forward pass (and per-batch mean)."})
    options: Literal["graphs", "mask_quality"] = field(default="graphs", metadata={"help": "The option grid."})
    option: list[str] = field(default_factory=list, metadata={"help": "Extra options: NAME=field=value,field=value"})
    only: list[str] | None = field(default=None, metadata={"help": "Run only these option names."})
    graph_threshold: float = field(default=0.2, metadata={"help": "tau of the binary_fixed graph."})
    fiedler_solver: Literal["lanczos", "power", "eigh"] | None = field(
        default=None, metadata={"help": "Default: the config's."}
    )
    output: str = field(default=str(REPO / "benchmarks/results/graph_options.json"), metadata={"help": "JSON path."})
    markdown: str | None = field(default=None, metadata={"help": "Also write the table as Markdown here."})
    panel_dir: str | None = field(default=None, metadata={"help": "Write Figure-1 panels of --panel_options here."})
    panel_options: list[str] = field(default_factory=lambda: ["today"], metadata={"help": "Options with panels."})
    panel_images: int = field(default=6, metadata={"help": "Images per panel."})


def parse_args() -> GraphOptionsArguments:
    (args,) = parse_script_args(HfArgumentParser(GraphOptionsArguments))
    return args


def training_position(checkpoint: Path) -> tuple[int, float | None]:
    """(step, epoch) from a checkpoint's trainer state; (-1, None) for a plain model folder."""
    state_file = checkpoint / "trainer_state.json"
    if not state_file.is_file():
        return -1, None
    state = json.loads(state_file.read_text())
    return state["step"], state["epoch"]


@contextlib.contextmanager
def overridden(config, overrides: dict):
    """Set config fields for the duration of the block, then restore them."""
    saved = {name: getattr(config, name) for name in overrides}
    for name, value in overrides.items():
        setattr(config, name, value)
    try:
        yield config
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


@torch.no_grad()
def masking_features(model, chunks: list[torch.Tensor], batch_centred: bool) -> torch.Tensor:
    """The masking's features of all images [B, N, D] under the model's current config: centred (when the config
    says so) by the mean over all images, or with `batch_centred` by each chunk's own mean."""
    centring = model.config.feature_centering == "position_mean"
    mean = masking_position_mean(model, chunks) if centring and not batch_centred else None
    features = []
    for chunk in chunks:
        tokens, cls_token, _ = model.vit.embeddings(chunk)
        features.append(model.vit.masking_features(tokens, cls_token, mean).float())
    return torch.cat(features)


@torch.no_grad()
def position_shares(model, chunks: list[torch.Tensor]) -> dict[str, list[float]]:
    share = PositionShare()
    for chunk in chunks:
        tokens, cls_token, _ = model.vit.embeddings(chunk)
        _, hidden_states, _ = model.vit.encode(tokens, cls_token, output_hidden_states=True)
        share.update([hidden[:, 1:] for hidden in hidden_states[1:]])
    return share.result()


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = (  # (title, key, format)
    ("half", "half_cut_share", ".2f"),
    ("1-side", "one_sided_part_share", ".2f"),
    ("part med", "object_part_fraction_median", ".2f"),
    ("part IQR", None, ""),
    ("part ctr", "object_centre_share", ".2f"),
    ("mask ctr", "informed_mask_centre_share", ".3f"),
    ("overlap", "part_overlap", ".2f"),
    ("chance", "part_overlap_chance", ".2f"),
    ("cos gap", "bipartition_cosine_gap", ".3f"),
    ("edges", "edge_density", ".2f"),
    ("no cut", "num_images_without_cut", "d"),
)


def row_cells(record: dict) -> list[str]:
    cells = []
    for _, key, spec in COLUMNS:
        if key is None:
            low, high = record["object_part_fraction_q25"], record["object_part_fraction_q75"]
            cells.append("-" if low is None else f"{low:.2f}-{high:.2f}")
        else:
            cells.append(cell(record[key], spec))
    return cells


def print_table(records: list[dict]) -> None:
    titles = [title for title, _, _ in COLUMNS]
    print(f"{'run':<8}{'epoch':>6}  {'option':<30}" + "".join(f"{title:>10}" for title in titles))
    for r in records:
        epoch = "-" if r["epoch"] is None else f"{r['epoch']:g}"
        print(f"{r['run']:<8}{epoch:>6}  {r['option'][:30]:<30}" + "".join(f"{c:>10}" for c in row_cells(r)))


def markdown_table(records: list[dict]) -> str:
    titles = [title for title, _, _ in COLUMNS]
    lines = ["| run | epoch | option | " + " | ".join(titles) + " |", "|---|---|---|" + "---|" * len(titles)]
    for r in records:
        epoch = "-" if r["epoch"] is None else f"{r['epoch']:g}"
        lines.append(f"| {r['run']} | {epoch} | {r['option']} | " + " | ".join(row_cells(r)) + " |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def option_records(args: GraphOptionsArguments, model, chunks: list, hidden, options: dict, where: dict) -> list:
    """One record per masking option asked for: the feature statistics of the cut under that option."""
    records = []
    for name, overrides in options.items():
        if args.only is not None and name not in args.only:
            continue
        fields = {key: value for key, value in overrides.items() if key != BATCH_CENTRED}
        with overridden(model.config, fields) as config:
            features = masking_features(model, chunks, overrides.get(BATCH_CENTRED, False))
            summary = feature_statistics(hidden, config, None, features).summary()
        records.append(where | {"option": name, "overrides": overrides, **summary})
        print_table(records[-1:])
    return records


def write_panels(
    args: GraphOptionsArguments, model, processor, pixel_values, chunks, options: dict, where: dict
) -> dict:
    """Figure-1 panels of the first images under each of --panel_options, and their per-image measures by option."""
    Path(args.panel_dir).mkdir(parents=True, exist_ok=True)
    panels = {}
    for name in args.panel_options:
        fields = {key: value for key, value in options[name].items() if key != BATCH_CENTRED}
        with overridden(model.config, fields):
            mean = masking_position_mean(model, chunks) if model.config.feature_centering == "position_mean" else None
            panel = figure_panel(
                model,
                pixel_values[: args.panel_images],
                tuple(processor.image_mean),
                tuple(processor.image_std),
                position_mean=mean,
            )
        slug = name.replace(" + ", "_").replace(" ", "_")
        path = Path(args.panel_dir) / f"figure_panel_{where['run']}_epoch{where['epoch']:g}_{slug}.png"
        panel.save(path)
        panels[name] = {
            "file": path.name,
            "object_part_size": panel.object_part_size.tolist(),
            "half_cut": panel.half_cut.tolist(),
            "object_centre_share": [finite_or_none(v) for v in panel.object_centre_share.tolist()],
            "centre_masked_share": [finite_or_none(v) for v in panel.centre_masked_share.tolist()],
        }
        print(f"wrote {path}", flush=True)
    return panels


def main() -> None:
    args = parse_args()
    dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.split)
    records, checkpoints = [], []
    positions = {path: training_position(path) for path in map(Path, args.checkpoints)}
    for checkpoint in sorted(positions, key=lambda path: (str(path.parent), positions[path])):
        model = SGMAEForPreTraining.from_pretrained(checkpoint).eval()
        if args.fiedler_solver:
            model.config.fiedler_solver = args.fiedler_solver
        processor = load_image_processor(str(checkpoint), model.config)
        pixel_values, _ = probe_batch(dataset, None, args.num_images, processor, model.config)
        chunks = list(pixel_values.split(args.batch_size))
        hidden = torch.cat([full_image_encoding(model, chunk)[0] for chunk in chunks])
        step, epoch = positions[checkpoint]
        where = {"checkpoint": str(checkpoint), "run": checkpoint.parent.name, "step": step, "epoch": epoch}
        shares = position_shares(model, chunks)
        checkpoints.append(where | shares)
        print(
            f"{checkpoint} (epoch {epoch}): position share per block "
            + ", ".join(f"{v:.2f}" for v in shares["position_share"])
            + "; same-position cosine "
            + ", ".join(f"{v:.2f}" for v in shares["same_position_cosine"])
            + "; within-image cosine "
            + ", ".join(f"{v:.2f}" for v in shares["within_image_cosine"]),
            flush=True,
        )
        options = option_set(args.options, model.config.num_hidden_layers, args.option, args.graph_threshold)
        records += option_records(args, model, chunks, hidden, options, where)
        if args.panel_dir:
            checkpoints[-1]["panels"] = write_panels(args, model, processor, pixel_values, chunks, options, where)
    print()
    print_table(records)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    written = {
        "command": "python " + " ".join(sys.argv),
        "commit": code_commit(),
        "num_images": args.num_images,
        "checkpoints": checkpoints,
        "records": records,
    }
    Path(args.output).write_text(json.dumps(written, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(records))


if __name__ == "__main__":
    main()
