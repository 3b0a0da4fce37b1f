"""Checkpoints of a training run: written atomically, found again, restored without unpickling code."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from .training_state import TrainingState

STATE_FILE = "trainer_state.json"  # TrainingState.state_dict()
OBJECTS_FILE = "training_objects.pt"  # state_dicts of what Accelerate does not prepare (the probe and its optimizer)
# Written once the loss computed from a checkpoint's weights was seen finite and not exploding: resuming from such a
# checkpoint is known to train on.
VERIFIED_FILE = "next_loss.json"


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (their state file is written last), oldest first."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_resume(output_dir: str, resume_from_checkpoint: str | None) -> Path | None:
    """`latest` picks the newest complete checkpoint in output_dir (None when there is none yet)."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not (path / STATE_FILE).is_file():
        raise SystemExit(f"error: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str,
    state: TrainingState,
    save_total_limit: int | None,
    objects: dict[str, Any],
    config=None,
) -> Path:
    """Write `checkpoint-<step>` atomically: everything goes to a temporary folder that is renamed when complete.

    Accelerate saves what it prepared (model, optimizer) and the RNG states; `objects` (the probe, ...) are
    saved by state_dict to OBJECTS_FILE, which `load_checkpoint` reads with `weights_only=True`, unlike Accelerate's
    `register_for_checkpointing` files. With `config`, its config.json is written too, so the checkpoint also loads
    with `from_pretrained`.
    """
    final = Path(output_dir) / f"checkpoint-{state.step}"
    temporary = Path(output_dir) / f".tmp-checkpoint-{state.step}"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temporary))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            torch.save({name: value.state_dict() for name, value in objects.items()}, temporary / OBJECTS_FILE)
            if config is not None:
                config.save_pretrained(temporary)
            (temporary / STATE_FILE).write_text(json.dumps(state.state_dict(), indent=2))
    except (OSError, RuntimeError, SafetensorError) as error:
        if not disk_is_full(error, output_dir):
            raise
        shutil.rmtree(temporary, ignore_errors=True)
        raise SystemExit(
            f"error: the disk is full: {final.name} could not be written to {output_dir}; the checkpoints written "
            "before it are intact. Free space, then resume with --resume_from_checkpoint latest"
        ) from error
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        prune_checkpoints(output_dir, save_total_limit, keep_last_good=True)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: str | Path, save_total_limit: int | None, keep_last_good: bool) -> None:
    """Keep the newest `save_total_limit` checkpoints (all if None); while training, also the last good one, which
    a divergence message would name."""
    if not save_total_limit:
        return
    keep = last_good_checkpoint(output_dir) if keep_last_good else None
    for old in checkpoint_dirs(output_dir)[:-save_total_limit]:
        if old != keep:
            shutil.rmtree(old)


def mark_verified(path: Path, next_loss: float) -> None:
    """Record that training from `path`'s weights gave a healthy loss."""
    (path / VERIFIED_FILE).write_text(json.dumps({"next_loss": next_loss}))


def last_good_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint whose weights are known to train on (see VERIFIED_FILE), or None."""
    verified = [path for path in checkpoint_dirs(output_dir) if (path / VERIFIED_FILE).is_file()]
    return verified[-1] if verified else None


def disk_is_full(error: BaseException, folder: str | Path) -> bool:
    """Whether a failed write failed for lack of space (torch and safetensors do not always keep the errno)."""
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error):
        return True
    return shutil.disk_usage(folder).free < 2**20


def load_checkpoint(accelerator: Accelerator, path: Path, objects: dict[str, Any]) -> TrainingState:
    """Restore model, optimizer, RNG states and `objects`; return the saved training state. A name in OBJECTS_FILE
    that `objects` lacks is not restored (older checkpoints also hold the scheduler, now rebuilt from the step), and
    an object the checkpoint lacks keeps its fresh state (e.g. a mask cache, refreshed when next due)."""
    if not (path / OBJECTS_FILE).is_file():
        raise SystemExit(
            f"error: {path} has no {OBJECTS_FILE}: it was written by an older version, whose scheduler state only "
            "loads by unpickling arbitrary code; start a new run from its weights (--model_name_or_path PATH)"
        )
    accelerator.load_state(str(path))
    saved = torch.load(path / OBJECTS_FILE, map_location="cpu", weights_only=True)
    for name, value in objects.items():
        if name in saved:
            value.load_state_dict(saved[name])
    state = TrainingState()
    state.load_state_dict(json.loads((path / STATE_FILE).read_text()))
    return state
