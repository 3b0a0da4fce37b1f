"""Where a training run is and what it has done: the one record the loop advances and every checkpoint saves."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# Fields left out of a run's eval_results.json, so a resumed run's file equals an uninterrupted run's.
UNREPRODUCIBLE = ("samples_in_epoch", "train_seconds")


@dataclass
class TrainingState:
    """The loop's position and counts, saved as a checkpoint's trainer_state.json (its keys are these fields).

    The learning-rate schedule is a function of `step` (see `optim.cosine_scheduler`), so it is not saved apart.
    """

    step: int = 0  # optimiser steps taken
    epoch: int = 0  # epochs run to their end
    samples_in_epoch: int = 0  # images of the current epoch trained on, over all processes (the data position)
    samples_seen: int = 0  # images trained on since the start, over all processes
    skipped_images: int = 0  # corrupt images left out
    train_seconds: float = 0.0  # time spent in the loop, over all sittings
    train_loss: float | None = None  # mean loss of the last logging window (None before the first)
    total_steps: int = 0  # the schedule's length in optimiser steps (0 in checkpoints written before it was saved)

    def state_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)

    def results(self) -> dict[str, Any]:
        """The fields that eval_results.json records: all but the UNREPRODUCIBLE ones."""
        return {key: value for key, value in asdict(self).items() if key not in UNREPRODUCIBLE}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Take the saved fields; a field missing from an older checkpoint keeps its value, an unknown key is
        ignored."""
        for field in fields(self):
            if field.name in saved:
                setattr(self, field.name, saved[field.name])
