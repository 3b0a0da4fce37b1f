"""Pre-training SG-MAE with `transformers.Trainer` (the path of transformers' own `run_mae.py`): one callback keeps
the model's schedule and, with a ranking cache, refreshes the cached informed masks on that schedule."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from .mask_cache import MaskRankingCache
from .modeling_sgmae import SGMAEForPreTraining

logger = logging.get_logger(__name__)


class SGMAETrainerCallback(TrainerCallback):
    """Tells an `SGMAEForPreTraining` where `Trainer` training stands, so it switches to informed masks on schedule.

    Before every optimiser step the model gets `set_training_progress(global_step, max_steps)`. With
    `probe_pixel_values` and `exploitation_rate_steps`, the decoder's exploitation rates are measured on that fixed
    batch every `exploitation_rate_steps` steps and logged; they are what `informed_masking_auto_start` waits for.

    With `mask_cache` and `whole_images` (a function returning batches of whole images: `pixel_values` resized to
    the model, no crop or flip, and their rows in `index`), the cache is refreshed when due, before the batches of
    that step are collated, and `collate` hands each batch its cropped rankings as `mask_scores`; pass it as the
    `data_collator`, train with `dataloader_num_workers=0` (Trainer's default) so that collating sees each refresh,
    and give the dataset's rows `pixel_values`, their crop `crops` [5] (`crops.crop_record`) and their row `index`.
    Without a cache, informed masks are ranked from each batch's own views at every step.
    """

    def __init__(
        self,
        probe_pixel_values: torch.Tensor | None = None,
        exploitation_rate_steps: int = 0,
        mask_cache: MaskRankingCache | None = None,
        whole_images: Callable[[], Iterable[dict]] | None = None,
    ):
        if exploitation_rate_steps < 0 or (exploitation_rate_steps > 0) != (probe_pixel_values is not None):
            raise ValueError(
                "exploitation-rate checks need both probe_pixel_values and exploitation_rate_steps > 0 "
                f"(got {exploitation_rate_steps} steps and {'a' if probe_pixel_values is not None else 'no'} probe)"
            )
        if (mask_cache is None) != (whole_images is None):
            raise ValueError("a mask cache needs both mask_cache and whole_images (the batches it is ranked from)")
        self.probe_pixel_values = probe_pixel_values
        self.exploitation_rate_steps = exploitation_rate_steps
        self.mask_cache, self.whole_images = mask_cache, whole_images
        self.refresh_logs: dict[str, float] = {}  # the last refresh's, logged with its step

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Stack rows of `pixel_values`, `crops` and `index` into a batch with each view's cropped `mask_scores`."""
        if self.mask_cache is None:
            raise ValueError("SGMAETrainerCallback.collate crops cached rankings: pass mask_cache and whole_images")
        batch = {key: torch.stack([torch.as_tensor(row[key]) for row in rows]) for key in ("pixel_values", "crops")}
        batch["index"] = torch.tensor([int(row["index"]) for row in rows])
        return {"pixel_values": batch["pixel_values"], "mask_scores": self.mask_cache.rankings_for(batch)}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = kwargs.get("model")
        self.check(model, args)
        model.set_training_progress(state.global_step, state.max_steps)
        self.refresh_if_due(model, state.global_step, state.max_steps)

    def check(self, model, args: TrainingArguments) -> None:
        """Refuse what cannot work before the first step, and say in one line where informed masks will come from."""
        if not isinstance(model, SGMAEForPreTraining):
            raise TypeError(f"SGMAETrainerCallback needs an SGMAEForPreTraining model, got {type(model).__name__}")
        config = model.config
        if config.informed_masking_auto_start and not self.exploitation_rate_steps:
            raise ValueError(
                "informed_masking_auto_start waits for exploitation-rate checks: pass probe_pixel_values and "
                "exploitation_rate_steps to SGMAETrainerCallback"
            )
        if self.mask_cache is not None and args.dataloader_num_workers:
            raise ValueError(
                "SGMAETrainerCallback crops the cached rankings while collating, which must see each refresh: train "
                f"with dataloader_num_workers=0 (got {args.dataloader_num_workers})"
            )
        cached = config.mask_strategy == "self_guided" and config.informed_mask_source == "cached"
        if cached and self.mask_cache is None:
            logger.warning(
                "no mask cache given: informed masks will be ranked from each batch's views at every step (the "
                "per-step source); pass mask_cache= and whole_images= to SGMAETrainerCallback for cached masks"
            )

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        kwargs["model"].set_training_progress(state.global_step, state.max_steps)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model: SGMAEForPreTraining = kwargs["model"]
        probe = self.probe_pixel_values
        probe = probe.to(next(model.parameters()).device) if probe is not None else None
        logs = model.schedule_step(state.global_step, state.max_steps, probe, self.exploitation_rate_steps)
        if "informed_start" in logs:
            logger.info("automatic start: informed masks from step %d", logs.pop("informed_start"))
        self.refresh_if_due(model, state.global_step, state.max_steps)
        logs |= self.refresh_logs
        if logs:
            state.log_history.append(logs | {"step": state.global_step})

    def refresh_if_due(self, model: SGMAEForPreTraining, step: int, total_steps: int) -> None:
        """Refresh for `step`, whose batches are collated next (Trainer collates after the previous step ends)."""
        self.refresh_logs = {}
        cache = self.mask_cache
        if cache is not None and cache.due(step, model.informed_masking_active):
            self.refresh_logs = cache.refresh(model, self.whole_images(), step, len(cache.rankings))
