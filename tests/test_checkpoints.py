"""Checkpoints and output folders under faults: a full disk, rotation that keeps the last good checkpoint, a save
interrupted half-way."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_config
from transformers import ViTImageProcessor

from modeling_sgmae import SGMAEForPreTraining
from sgmae_training import checkpoints
from sgmae_training.checkpoints import (
    checkpoint_dirs,
    last_good_checkpoint,
    load_checkpoint,
    mark_verified,
    prune_checkpoints,
    save_checkpoint,
)
from sgmae_training.hub import save_hub_folder, write_json_atomically
from sgmae_training.training_state import TrainingState


def prepared_objects():
    accelerator = Accelerator()
    layer = torch.nn.Linear(2, 2)
    accelerator.prepare(layer, torch.optim.SGD(layer.parameters(), lr=1.0))
    return accelerator, {"probe": torch.nn.Linear(2, 2)}


def test_a_full_disk_says_so_and_leaves_the_earlier_checkpoints_intact(tmp_path, monkeypatch):
    accelerator, objects = prepared_objects()
    first = save_checkpoint(accelerator, str(tmp_path), TrainingState(step=1), None, objects)
    saved = {path.name: path.read_bytes() for path in first.iterdir()}

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", no_space)
    with pytest.raises(SystemExit, match="the disk is full: checkpoint-2 could not be written"):
        save_checkpoint(accelerator, str(tmp_path), TrainingState(step=2), None, objects)
    assert checkpoint_dirs(tmp_path) == [first]
    assert {path.name: path.read_bytes() for path in first.iterdir()} == saved
    assert not list(tmp_path.glob(".tmp-*"))


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    accelerator, objects = prepared_objects()

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpoints.torch, "save", denied)
    with pytest.raises(PermissionError):
        save_checkpoint(accelerator, str(tmp_path), TrainingState(step=1), None, objects)


def test_rotation_keeps_the_last_checkpoint_known_to_be_good(tmp_path):
    accelerator, objects = prepared_objects()
    for step in (1, 2):
        save_checkpoint(accelerator, str(tmp_path), TrainingState(step=step), 2, objects)
    mark_verified(tmp_path / "checkpoint-2", 0.5)
    for step in (3, 4, 5):  # written, but never followed by a healthy loss
        save_checkpoint(accelerator, str(tmp_path), TrainingState(step=step), 2, objects)
    assert [path.name for path in checkpoint_dirs(tmp_path)] == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    assert last_good_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    prune_checkpoints(tmp_path, 2, keep_last_good=False)  # what a run that trained to its end does
    assert [path.name for path in checkpoint_dirs(tmp_path)] == ["checkpoint-4", "checkpoint-5"]


def test_an_interrupted_final_save_leaves_no_truncated_file(tmp_path, monkeypatch):
    model = SGMAEForPreTraining(tiny_config())
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    save_hub_folder(model, processor, tmp_path, "first card")
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process is stopped while the processor config is being written

    monkeypatch.setattr(ViTImageProcessor, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        save_hub_folder(SGMAEForPreTraining(tiny_config()), processor, tmp_path, "second card")
    after = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.name != ".tmp-final"}
    assert after == before  # the complete earlier folder, untouched: nothing half-written replaced it

    write_json_atomically(tmp_path / "results.json", {"loss": 1.0})
    assert json.loads((tmp_path / "results.json").read_text()) == {"loss": 1.0}
    assert not (tmp_path / ".tmp-results.json").exists()


def test_a_checkpoint_of_the_untyped_state_loads(tmp_path):
    """Checkpoints written before TrainingState: trainer_state.json without the later keys, the scheduler's
    state_dict beside the others (the schedule is now rebuilt from the step)."""
    accelerator, objects = prepared_objects()
    path = save_checkpoint(accelerator, str(tmp_path), TrainingState(step=4), None, objects)
    saved = {
        "step": 4,
        "epoch": 1,
        "samples_in_epoch": 0,
        "samples_seen": 32,
        "skipped_images": 1,
        "train_seconds": 2.5,
    }
    (path / checkpoints.STATE_FILE).write_text(json.dumps(saved))
    optimizer = torch.optim.SGD(objects["probe"].parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    torch.save(
        {"probe": objects["probe"].state_dict(), "scheduler": scheduler.state_dict()}, path / checkpoints.OBJECTS_FILE
    )
    state = load_checkpoint(accelerator, path, objects)
    assert state == TrainingState(**saved) and state.train_loss is None and state.total_steps == 0
