"""What the fine-tuning protocols (classification, segmentation, detection) share around the engine's loop: hooks that
evaluate after epochs, and the end of a run: its skipped images said, its last step evaluated."""

from __future__ import annotations

import logging

from .engine import TrainingHooks
from .training_state import TrainingState

logger = logging.getLogger(__name__)


class EvaluatingHooks(TrainingHooks):
    """Hooks whose `evaluate(step)` scores the model and records the step it scored (`evaluated_at`)."""

    evaluated_at = -1

    def evaluate(self, step: int) -> None:
        raise NotImplementedError


def finish_training(state: TrainingState, hooks: EvaluatingHooks) -> None:
    """After the loop: the corrupt training images it skipped in one line, and an evaluation of the final weights
    unless the last epoch ended with one."""
    if state.skipped_images:
        logger.warning("skipped %d corrupt training images", state.skipped_images)
    if hooks.evaluated_at != state.step:
        hooks.evaluate(state.step)
