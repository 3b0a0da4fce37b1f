"""Cached informed masks (docs/method.md §8): one whole-image ranking per training image, refreshed every few epochs
and cropped with each augmented view, as the SG-MAE authors' code and AMT's do.

The model ranks whole images (`SGMAEForPreTraining.informed_mask_scores`, in eval mode, no crop, no flip); the
rankings are stored here in float16 on the training device (so that a step reads nothing back), one patch-grid map
per image, keyed by the image's row in the training split (or, for a stream, by its `__key__`); a training step
crops each image's map with the exact box and flip of its view (`crops.crop_maps`) and passes the result to
`forward(mask_scores=...)`. Between refreshes a self-guided step costs what a random one costs, plus the top-K and
the crop. It travels with every saved model (only torch and this package), and `SGMAETrainerCallback` drives it
under `transformers.Trainer`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

import torch
from torch import distributed, nn
from tqdm.auto import tqdm

from .crops import crop_maps
from .masking_sgmae import object_part_of_scores

logger = logging.getLogger(__name__)

# AMT refreshes its maps every 40 of 400 epochs: a tenth of the schedule.
REFRESH_SHARE_OF_SCHEDULE = 0.1


def default_refresh_epochs(num_epochs: float) -> int:
    """Epochs between refreshes when none is given: a tenth of the schedule (AMT's 40 of 400), at least one."""
    return max(1, round(REFRESH_SHARE_OF_SCHEDULE * num_epochs))


class MaskRankingCache:
    """Whole-image informed-mask rankings of every training image: float16 [images, grid height, grid width], on the
    training device once ranked (NaN until ranked, or where an image had no usable cut: it gets a random mask), the
    step of the last refresh, and for streams the sample id of each row. Rows that repeat an image (`sources`) are
    ranked once, as their first row (`ranked_rows`). A checkpoint saves it (`state_dict`), so a resumed run masks as
    the uninterrupted one."""

    def __init__(
        self,
        num_images: int,
        grid: tuple[int, int],
        refresh_steps: int,
        keyed: bool = False,
        sources: torch.Tensor | None = None,
    ):
        self.grid, self.refresh_steps, self.keyed = grid, refresh_steps, keyed
        self.rankings = torch.full((num_images, *grid), float("nan"), dtype=torch.float16)
        self.refreshed_at = -1
        self.keys: list[str] = []  # row -> sample id (streams)
        self.rows: dict[str, int] = {}
        # Rows that show the same image share one ranking: row -> the first row showing its image (None: its own).
        if sources is not None:
            sources = torch.as_tensor(sources, dtype=torch.long)
            if sources.shape != (num_images,) or not bool((sources[sources] == sources).all()):
                raise ValueError("sources must give each of the rows the first row that shows the same image")
        self.sources = sources

    def ranked_rows(self) -> torch.Tensor:
        """The rows a refresh ranks [R]: one per distinct image (`sources`), whose ranking its repeats share."""
        rows = torch.arange(len(self.rankings))
        return rows if self.sources is None else rows[self.sources == rows]

    def due(self, step: int, informed: bool) -> bool:
        """A refresh is due at the informed-masking start and every `refresh_steps` after the last one."""
        return informed and (self.refreshed_at < 0 or step - self.refreshed_at >= self.refresh_steps)

    @torch.no_grad()
    def refresh(
        self, model: nn.Module, batches: Iterable[dict], step: int, total: int | None = None
    ) -> dict[str, float]:
        """Rank this process's share of the whole images with `model` (an `SGMAEForPreTraining`; `batches`:
        `pixel_values` resized to the model, no crop or flip, with their rows in `index` or sample ids in `keys`),
        gather every process's rankings, and return what to log: the seconds it took, the share of images without a
        usable cut and the mean object-part share."""
        started = time.perf_counter()
        device = next(model.parameters()).device
        rows, keys, rankings = self._rank(model, batches, device, total)
        if self.keyed:
            self._store_keyed(keys, rankings)
        else:
            self._store_rows(rows, rankings)
        self.refreshed_at = step
        logs = self._summary(time.perf_counter() - started)
        logger.info(
            "ranked %d whole images (for %d rows) for informed masks in %.1f s (no usable cut: %.1f %%, object part "
            "%.1f %% of the patches); next refresh at step %d",
            len(self.ranked_rows()),
            len(self.rankings),
            logs["mask_refresh_seconds"],
            100 * logs["mask_refresh_fallback_share"],
            100 * logs["mask_refresh_object_part"],
            step + self.refresh_steps,
        )
        return logs

    def _rank(
        self, model: nn.Module, batches: Iterable[dict], device: torch.device, total: int | None
    ) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """This process's rows [R] (or sample ids) and float16 rankings [R, N], ranked in eval mode."""
        rank, world_size = process_rank_and_count()
        was_training = model.training
        model.eval()
        rows, keys, rankings = [], [], []
        progress = tqdm(total=total, desc="ranking whole images", disable=rank != 0, leave=False)
        for batch in batches:
            scores = model.informed_mask_scores(batch["pixel_values"])
            rankings.append(scores.to(device, torch.float16))
            if self.keyed:
                keys += batch["keys"]
            else:
                rows.append(batch["index"].to(device))
            progress.update(len(scores) * world_size)
        progress.close()
        model.train(was_training)
        empty = torch.empty(0, self.grid[0] * self.grid[1], dtype=torch.float16, device=device)
        no_rows = torch.empty(0, dtype=torch.long, device=device)
        return (torch.cat(rows) if rows else no_rows), keys, (torch.cat(rankings) if rankings else empty)

    def _summary(self, seconds: float) -> dict[str, float]:
        """What a refresh logs (the table is read back from the device once)."""
        flat = self.rankings.flatten(1).float()
        usable = torch.isfinite(flat).all(dim=1)
        return {
            "mask_refresh_seconds": seconds,
            "mask_refresh_fallback_share": 1 - usable.float().mean().item(),
            "mask_refresh_object_part": (
                object_part_of_scores(flat[usable]).float().mean().item() if usable.any() else math.nan
            ),
        }

    def _store_rows(self, rows: torch.Tensor, rankings: torch.Tensor) -> None:
        """Every process's (row, ranking) pairs, gathered (padded to the longest share) into the table."""
        _, world_size = process_rank_and_count()
        if world_size > 1:
            longest = int(all_gather(torch.tensor([len(rows)], device=rows.device)).max())
            padded_rows = torch.full((longest,), -1, dtype=torch.long, device=rows.device)
            padded_rows[: len(rows)] = rows
            padded = torch.zeros(longest, rankings.shape[1], dtype=torch.float16, device=rows.device)
            padded[: len(rows)] = rankings
            rows, rankings = all_gather(padded_rows), all_gather(padded)
            rankings, rows = rankings[rows >= 0], rows[rows >= 0]
        self.rankings = self.rankings.to(rankings.device)
        self.rankings[rows] = rankings.view(-1, *self.grid)
        if self.sources is not None:  # each repeat takes its image's ranking
            self.rankings = self.rankings[self.sources.to(rankings.device)]

    def _store_keyed(self, keys: list[str], rankings: torch.Tensor) -> None:
        """A stream's rankings in the order the processes met them, with a row for each sample id."""
        _, world_size = process_rank_and_count()
        if world_size > 1:
            shares: list = [None] * world_size
            distributed.all_gather_object(shares, (keys, rankings.cpu()))
            keys = [key for share_keys, _ in shares for key in share_keys]
            rankings = torch.cat([share.to(rankings.device) for _, share in shares])
        if len(set(keys)) != len(keys):
            raise SystemExit(
                "error: the stream's sample ids (__key__) are not unique, so cached informed masks cannot be matched "
                "to their images; give every sample its own id, or use --informed_mask_source step"
            )
        self.keys, self.rows = keys, {key: row for row, key in enumerate(keys)}
        self.rankings = rankings.view(-1, *self.grid).clone()

    def rankings_for(self, batch: dict) -> torch.Tensor:
        """This batch's views' rankings [B, N] on the batch's device: each image's stored map cropped with its view's
        box and flip (`crops`); a NaN row (random mask) for an image the last refresh did not rank."""
        device = batch["pixel_values"].device
        self.rankings = self.rankings.to(device)  # once, after a checkpoint was loaded on the host
        if self.keyed:
            rows = torch.tensor([self.rows.get(key, -1) for key in batch["keys"]], dtype=torch.long, device=device)
        else:
            rows = batch["index"].to(device)
        maps = self.rankings[rows.clamp(min=0)].float()
        maps[rows < 0] = float("nan")
        return crop_maps(maps, batch["crops"]).flatten(1)

    def state_dict(self) -> dict:
        return {"rankings": self.rankings.cpu(), "refreshed_at": torch.tensor(self.refreshed_at), "keys": self.keys}

    def load_state_dict(self, saved: dict) -> None:
        self.rankings = saved["rankings"].to(torch.float16)
        self.refreshed_at = int(saved["refreshed_at"])
        self.keys = list(saved["keys"])
        self.rows = {key: row for row, key in enumerate(self.keys)}

    def memory_bytes(self) -> int:
        return self.rankings.numel() * self.rankings.element_size()


def process_rank_and_count() -> tuple[int, int]:
    """This process's rank and the number of processes of the launch (0 and 1 when none was launched)."""
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank(), distributed.get_world_size()
    return 0, 1


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` (all of the same shape), concatenated in rank order along the first axis."""
    shares = [torch.empty_like(tensor) for _ in range(distributed.get_world_size())]
    distributed.all_gather(shares, tensor)
    return torch.cat(shares)
