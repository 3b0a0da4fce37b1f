"""Evaluation across processes, each sample counted once: sharded passes, gathers, top-k accuracy, kNN votes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import evaluate
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from .data.images import warn_skipped
from .data.loaders import shard_for_process

METRIC_PATH = Path(__file__).parent / "metrics" / "accuracy"  # shipped, so evaluate.load works offline


def gather_samples(accelerator: Accelerator, local: dict[str, torch.Tensor], index_key: str | None = "index"):
    """Gather per-sample tensors (first dim = sample) of all processes, in process order, on every process.

    Processes may hold different numbers of samples: each pads to the largest count and the padding is dropped.
    With `index_key`, rows are then de-duplicated by that per-sample index (first occurrence kept) and sorted by it,
    so every sample counts once whatever the sharding did.
    """
    count = next(iter(local.values())).shape[0]
    counts = accelerator.gather(torch.tensor([count], device=accelerator.device)).tolist()
    largest = max(counts)
    gathered = {}
    for key, tensor in local.items():
        tensor = tensor.to(accelerator.device)
        padding = tensor.new_zeros((largest - count, *tensor.shape[1:]))
        gathered[key] = accelerator.gather(torch.cat([tensor, padding]).contiguous())
    keep = torch.cat([torch.arange(largest) < n for n in counts]).to(accelerator.device)
    gathered = {key: tensor[keep] for key, tensor in gathered.items()}
    if index_key is None:
        return gathered
    indices = gathered[index_key]
    order = torch.argsort(indices, stable=True)
    sorted_indices = indices[order]
    first = torch.ones_like(sorted_indices, dtype=torch.bool)
    first[1:] = sorted_indices[1:] != sorted_indices[:-1]
    return {key: tensor[order[first]] for key, tensor in gathered.items()}


@torch.no_grad()
def local_pass(
    accelerator: Accelerator, data, collate, batch_size: int, num_workers: int, compute: Callable, width: int
) -> tuple[dict[str, torch.Tensor], int]:
    """Run `compute(pixel_values)` -> [B, width] over this process's rows (no collectives inside: the shards of
    different processes may differ in length).

    Returns per-sample `values`, `labels` and `index` (when the collator gives one) and the number of skipped images.
    """
    loader = DataLoader(data, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    keys = ("values", "labels", "index") if collate.extra_columns["index"] else ("values", "labels")
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    skipped = 0
    for batch in loader:
        skipped += int(batch["skipped"])
        warn_skipped(batch)  # here, where they are counted
        if not len(batch["pixel_values"]):
            continue
        with accelerator.autocast():
            parts["values"].append(compute(batch["pixel_values"].to(accelerator.device)).float())
        for key in keys[1:]:
            parts[key].append(batch[key].to(accelerator.device))
    if not parts["values"]:  # an empty shard still takes part in the gathers
        parts = {key: [torch.zeros(0, dtype=torch.long, device=accelerator.device)] for key in keys}
        parts["values"] = [torch.zeros(0, width, device=accelerator.device)]
    return {key: torch.cat(value) for key, value in parts.items()}, skipped


def score_metric(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy through the `evaluate` module shipped with the package."""
    metric = evaluate.load(str(METRIC_PATH))
    return metric.compute(predictions=scores.cpu().numpy(), references=labels.cpu().numpy(), top_k=[5])


@dataclass
class EvaluationResult:
    """One scoring of the validation split across processes, each sample counted once."""

    samples: int  # distinct samples scored
    duplicates_dropped: int  # rows that the sharding gave to two processes, counted once
    expected_samples: int  # rows in the split
    skipped_images: int  # corrupt images left out
    top1: float | None  # accuracies, on the main process (None elsewhere, and when no sample was scored)
    top5: float | None
    gathered: dict[str, torch.Tensor] = field(repr=False)  # per sample by index: "index", "labels", scores "values"

    def accuracies(self, prefix: str = "eval_") -> dict[str, float | None]:
        """`{prefix}top1` and `{prefix}top5`."""
        return {f"{prefix}top1": self.top1, f"{prefix}top5": self.top5}

    def counts(self) -> dict[str, int]:
        """The sample counts as eval_results.json names them (`eval_<field>`)."""
        names = ("samples", "duplicates_dropped", "expected_samples", "skipped_images")
        return {f"eval_{name}": getattr(self, name) for name in names}

    def metrics(self) -> dict[str, float | int | None]:
        """Counts and accuracies, as eval_results.json names them."""
        return self.counts() | self.accuracies()


class Evaluation:
    """The validation split, sharded without overlap; `run` scores it once across processes."""

    def __init__(self, accelerator, data: datasets.Dataset, collate, batch_size: int, num_workers: int):
        self.accelerator = accelerator
        self.expected = len(data)
        self.shard = shard_for_process(data, accelerator, seed=0, epoch=0, shuffle=False, buffer_size=0)
        self.collate, self.batch_size, self.num_workers = collate, batch_size, num_workers

    def local(self, compute: Callable, width: int) -> tuple[dict[str, torch.Tensor], int]:
        args = (self.shard, self.collate, self.batch_size, self.num_workers, compute, width)
        return local_pass(self.accelerator, *args)

    def finish(self, local: dict[str, torch.Tensor], skipped: int) -> EvaluationResult:
        """Gather local scores ("values") with labels and indices; score them (counts on every process)."""
        gathered = gather_samples(self.accelerator, local)
        raw = int(self.accelerator.reduce(torch.tensor(len(local["index"]), device=self.accelerator.device), "sum"))
        skipped = int(self.accelerator.reduce(torch.tensor(skipped, device=self.accelerator.device), "sum"))
        samples = len(gathered["index"])
        top1 = top5 = None
        if self.accelerator.is_main_process and samples:
            metrics = score_metric(gathered["values"], gathered["labels"])
            top1, top5 = metrics["accuracy"], metrics["top5_accuracy"]
        return EvaluationResult(samples, raw - samples, self.expected, skipped, top1, top5, gathered)

    def run(self, compute: Callable, width: int) -> EvaluationResult:
        return self.finish(*self.local(compute, width))


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 256,
) -> torch.Tensor:
    """DINO's weighted kNN: the k most cosine-similar training features vote with weight exp(cosine / T).

    train_features: [N, D], train_labels: [N], features: [M, D] (normalised here); returns class votes [M, C].
    """
    bank = nn.functional.normalize(train_features.float(), dim=1)
    k = min(k, len(bank))
    scores = []
    for chunk in nn.functional.normalize(features.float(), dim=1).split(chunk_size):
        similarity, neighbours = (chunk @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
        scores.append(votes.scatter_add_(1, train_labels[neighbours], weights))
    return torch.cat(scores) if scores else features.new_zeros(0, num_classes)
