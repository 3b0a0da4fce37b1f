"""Pre-training SG-MAE with `transformers.Trainer` (the path of transformers' own `run_mae.py`)."""

from __future__ import annotations

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from .modeling_sgmae import SGMAEForPreTraining

logger = logging.get_logger(__name__)


class SGMAETrainerCallback(TrainerCallback):
    """Tells an `SGMAEForPreTraining` where `Trainer` training stands, so it switches to informed masks on schedule.

    Before every optimiser step the model gets `set_training_progress(global_step, max_steps)`. With
    `probe_pixel_values` and `exploitation_rate_steps`, the decoder's exploitation rates are measured on that fixed
    batch every `exploitation_rate_steps` steps and logged; they are what `informed_masking_auto_start` waits for.

        trainer = Trainer(model=model, args=args, train_dataset=..., callbacks=[SGMAETrainerCallback()])
    """

    def __init__(self, probe_pixel_values: torch.Tensor | None = None, exploitation_rate_steps: int = 0):
        if exploitation_rate_steps < 0 or (exploitation_rate_steps > 0) != (probe_pixel_values is not None):
            raise ValueError(
                "exploitation-rate checks need both probe_pixel_values and exploitation_rate_steps > 0 "
                f"(got {exploitation_rate_steps} steps and {'a' if probe_pixel_values is not None else 'no'} probe)"
            )
        self.probe_pixel_values = probe_pixel_values
        self.exploitation_rate_steps = exploitation_rate_steps

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = kwargs.get("model")
        if not isinstance(model, SGMAEForPreTraining):
            raise TypeError(f"SGMAETrainerCallback needs an SGMAEForPreTraining model, got {type(model).__name__}")
        if model.config.informed_masking_auto_start and not self.exploitation_rate_steps:
            raise ValueError(
                "informed_masking_auto_start waits for exploitation-rate checks: pass probe_pixel_values and "
                "exploitation_rate_steps to SGMAETrainerCallback"
            )
        model.set_training_progress(state.global_step, state.max_steps)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        kwargs["model"].set_training_progress(state.global_step, state.max_steps)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model: SGMAEForPreTraining = kwargs["model"]
        probe = self.probe_pixel_values
        probe = probe.to(next(model.parameters()).device) if probe is not None else None
        logs = model.schedule_step(state.global_step, state.max_steps, probe, self.exploitation_rate_steps)
        if "informed_start" in logs:
            logger.info("automatic start: informed masks from step %d", logs.pop("informed_start"))
        if logs:
            state.log_history.append(logs | {"step": state.global_step})
