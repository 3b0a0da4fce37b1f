#!/usr/bin/env python
"""Which affinity graph and object rule cut a model's own patch features best? docs/method.md §3 steps 2 and 4.

    python benchmarks/graph_options.py --dataset_name ../shared/data/cifar10 \\
        --checkpoints outputs/compare10/mae-seed0/checkpoint-*

For each checkpoint (grouped by run, in training order), the last-block patch features of the first `--num_images`
test images are cut with every graph (`similarity`, `binary_fixed` at tau, `binary_mean`) and object rule
(`max_abs`, `smaller`). Reported per option: the cosine gap (mean cosine similarity of patch pairs inside a part
minus across parts; the same scale for every graph, higher = a cleaner cut), the object-part size, the share of the
central patches that the informed mask hides (random masks: the mask ratio), the graph's edge density and the images
without a usable cut. Followed over a run's checkpoints, the gap shows when clusters emerge.
Writes JSON, prints a table.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
from pathlib import Path

import datasets
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance import code_commit  # noqa: E402

from modeling_sgmae import SGMAEForPreTraining  # noqa: E402
from modeling_sgmae.analysis import feature_statistics, full_image_encoding  # noqa: E402
from sgmae_training.analyze import load_image_processor, probe_batch  # noqa: E402

GRAPHS = ("similarity", "binary_fixed", "binary_mean")
RULES = ("max_abs", "smaller")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_name", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--checkpoints", nargs="+", required=True, help="Pre-training checkpoints or model folders.")
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--graph_threshold", type=float, default=0.2, help="tau of the binary_fixed graph.")
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/graph_options.json"))
    return parser.parse_args()


def training_position(checkpoint: Path) -> tuple[int, float | None]:
    """(step, epoch) from a checkpoint's trainer state; (-1, None) for a plain model folder."""
    state_file = checkpoint / "trainer_state.json"
    if not state_file.is_file():
        return -1, None
    state = json.loads(state_file.read_text())
    return state["step"], state["epoch"]


@torch.no_grad()
def main() -> None:
    args = parse_args()
    dataset = datasets.load_dataset(args.dataset_name, split=args.split)
    records = []
    positions = {path: training_position(path) for path in map(Path, args.checkpoints)}
    for checkpoint in sorted(positions, key=lambda path: (str(path.parent), positions[path])):
        model = SGMAEForPreTraining.from_pretrained(checkpoint).eval()
        processor = load_image_processor(str(checkpoint), model.config)
        pixel_values, _ = probe_batch(dataset, None, args.num_images, processor, model.config)
        features = torch.cat([full_image_encoding(model, chunk)[0] for chunk in pixel_values.split(128)])
        step, epoch = positions[checkpoint]
        for graph, rule in itertools.product(GRAPHS, RULES):
            config = copy.deepcopy(model.config)
            config.graph_edges, config.foreground_rule, config.graph_threshold = graph, rule, args.graph_threshold
            summary = feature_statistics(features, config).summary()
            records.append({"checkpoint": str(checkpoint), "step": step, "epoch": epoch, "graph_edges": graph,
                            "foreground_rule": rule, **summary})  # fmt: skip

    header = f"{'checkpoint':<44}{'epoch':>6}  {'graph':<13}{'rule':<9}{'cos gap':>8}{'object':>8}{'centre':>8}"
    print(f"{header}{'edges':>7}{'no cut':>7}")
    for r in records:
        gap = f"{r['bipartition_cosine_gap']:.3f}" if r["bipartition_cosine_gap"] is not None else "-"
        size = f"{r['object_part_size']:.1f}" if r["object_part_size"] is not None else "-"
        centre = f"{r['informed_mask_centre_share']:.3f}" if r["informed_mask_centre_share"] is not None else "-"
        epoch = "-" if r["epoch"] is None else f"{r['epoch']:g}"
        print(f"{r['checkpoint'][-44:]:<44}{epoch:>6}  {r['graph_edges']:<13}{r['foreground_rule']:<9}{gap:>8}"
              f"{size:>8}{centre:>8}{r['edge_density']:>7.3f}{r['num_images_without_cut']:>7}")  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(
        json.dumps({"command": "python " + " ".join(sys.argv), "commit": code_commit(), "records": records}, indent=2)
    )


if __name__ == "__main__":
    main()
