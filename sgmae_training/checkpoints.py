"""Checkpoints of a training run: written atomically, found again, restored without unpickling code."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

STATE_FILE = "trainer_state.json"
OBJECTS_FILE = "training_objects.pt"  # state_dicts of what Accelerate does not prepare (scheduler, probe)


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
    state: dict,
    save_total_limit: int | None,
    objects: dict[str, Any],
    config=None,
) -> Path:
    """Write `checkpoint-<step>` atomically: everything goes to a temporary folder that is renamed when complete.

    Accelerate saves what it prepared (model, optimizer) and the RNG states; `objects` (scheduler, probe, ...) are
    saved by state_dict to OBJECTS_FILE, which `load_checkpoint` reads with `weights_only=True`, unlike Accelerate's
    `register_for_checkpointing` files. With `config`, its config.json is written too, so the checkpoint also loads
    with `from_pretrained`.
    """
    final = Path(output_dir) / f"checkpoint-{state['step']}"
    temporary = Path(output_dir) / f".tmp-checkpoint-{state['step']}"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save({name: value.state_dict() for name, value in objects.items()}, temporary / OBJECTS_FILE)
        if config is not None:
            config.save_pretrained(temporary)
        (temporary / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        if save_total_limit:
            for old in checkpoint_dirs(output_dir)[:-save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, objects: dict[str, Any]) -> dict:
    """Restore model, optimizer, RNG states and `objects`; return the saved trainer state."""
    if not (path / OBJECTS_FILE).is_file():
        raise SystemExit(
            f"error: {path} has no {OBJECTS_FILE}: it was written by an older version, whose scheduler state only "
            "loads by unpickling arbitrary code; start a new run from its weights (--model_name_or_path PATH)"
        )
    accelerator.load_state(str(path))
    saved = torch.load(path / OBJECTS_FILE, map_location="cpu", weights_only=True)
    for name, value in objects.items():
        value.load_state_dict(saved[name])
    return json.loads((path / STATE_FILE).read_text())
