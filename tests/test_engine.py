"""The training engine: a step reads nothing back from the device; losses and counts are read once per window; a
checkpoint at the end of an epoch resumes into the next one."""

from __future__ import annotations

import shutil
import sys
import traceback
from functools import partial
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from conftest import REPO_ROOT, tiny_config
from torch import nn

from modeling_sgmae import SGMAEForPreTraining
from modeling_sgmae.mask_cache import MaskRankingCache
from sgmae_training import engine
from sgmae_training.data.loaders import worker_epoch_batches
from sgmae_training.data.loading import DataArguments
from sgmae_training.engine import LoopSettings, TrainingHooks, resume_state, train
from sgmae_training.training_state import TrainingState

sys.path.insert(0, str(REPO_ROOT))
import run_pretraining

OURS = (str(REPO_ROOT / "modeling_sgmae"), str(REPO_ROOT / "sgmae_training"), str(REPO_ROOT / "run_pretraining.py"))


def reads_from_our_code(monkeypatch, steps: int, tmp_path: Path) -> list[str]:
    """Values read back from tensors by this project's code (not torch's or Accelerate's) during a training run."""
    accelerator = Accelerator(cpu=True)
    model = SGMAEForPreTraining(tiny_config(informed_masking_start_step=1))  # cached informed masks from step 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    args = type("Args", (), {"exploitation_check_steps": 1000, "visualization_steps": None, "output_dir": tmp_path})
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=generator)
    cache = MaskRankingCache(8, (8, 8), refresh_steps=1000)
    hooks = run_pretraining.PretrainingHooks(
        accelerator, model, steps, args, None, None, cache, lambda: iter([{"pixel_values": images, "index": rows}])
    )
    rows = torch.arange(8)

    def epoch_batches(state):
        for _ in range(steps):
            index = torch.randperm(8, generator=generator)[:4]
            crops = torch.cat(
                [torch.rand(4, 2, generator=generator) / 2, torch.full((4, 2), 0.5), torch.ones(4, 1)], 1
            )
            yield {"pixel_values": images[index], "index": index, "crops": crops, "skipped": 0}

    reads = []
    for name in ("__int__", "__float__", "__bool__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            caller = traceback.extract_stack(limit=2)[0].filename
            if caller.startswith(OURS):
                reads.append(f"{_name} in {Path(caller).name}")
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    settings = LoopSettings(
        str(tmp_path), logging_steps=1000, checkpointing_steps="none", save_total_limit=None, max_grad_norm=1.0
    )
    train(
        accelerator, model, optimizer, scheduler, epoch_batches, TrainingState(total_steps=steps), settings, hooks, {}
    )
    monkeypatch.undo()
    return reads


def test_a_training_step_reads_nothing_back_from_the_device(monkeypatch, tmp_path):
    """Steps 1..N-1 neither log nor checkpoint: whatever is read is read once (the final log, the cached rankings'
    refresh at the informed start), however many steps; a step masked by cropped rankings reads nothing."""
    short, long = reads_from_our_code(monkeypatch, 2, tmp_path), reads_from_our_code(monkeypatch, 6, tmp_path)
    assert sorted(short) == sorted(long)
    # the one refresh of the cached rankings: its solver's convergence check and its log
    refresh = [read for read in long if read.endswith((" in mask_cache.py", " in fiedler_solvers.py"))]
    assert refresh and sorted(set(long) - set(refresh)) == ["item in engine.py", "tolist in run_pretraining.py"]


def test_auto_mixed_precision_is_bf16_on_a_bf16_gpu_and_defers_to_a_launcher_that_chose(monkeypatch) -> None:
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine.resolve_mixed_precision("auto") == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert engine.resolve_mixed_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert engine.resolve_mixed_precision("auto") == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert engine.resolve_mixed_precision("auto") == "fp16"
    assert engine.resolve_mixed_precision("no") == "no"  # an explicit choice wins


class LinearHooks(TrainingHooks):
    """A linear model's squared error; remembers the steps at which epochs ended."""

    def __init__(self) -> None:
        self.epoch_ends: list[int] = []

    def loss(self, model, batch):
        return ((model(batch["pixel_values"]) - batch["targets"]) ** 2).mean(), None

    def after_epoch(self, state: TrainingState) -> None:
        self.epoch_ends.append(state.step)


def linear_run(output_dir: Path, resume: str | None) -> tuple[dict[str, torch.Tensor], list[int], TrainingState]:
    """6 steps (2 epochs of 3 batches of 2 rows of a real `datasets` split), a checkpoint every 3 steps: the first
    lands exactly at the end of epoch 1."""
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    rows = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    data = datasets.Dataset.from_dict({"x": rows.tolist(), "y": rows.sum(1).tolist()})

    def collate(batch):
        return {"pixel_values": torch.tensor([row["x"] for row in batch]),
                "targets": torch.tensor([[row["y"]] for row in batch]), "skipped": 0}  # fmt: skip

    data_args = DataArguments(dataloader_num_workers=0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = resume_state(accelerator, optimizer, str(output_dir), resume, {}, total_steps=6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    epoch_batches = partial(worker_epoch_batches, data, accelerator=accelerator, data_args=data_args, batch_size=2,
                            collate=collate, seed=0)  # fmt: skip
    settings = LoopSettings(str(output_dir), logging_steps=1, checkpointing_steps="3", save_total_limit=None,
                            max_grad_norm=None)  # fmt: skip
    hooks = LinearHooks()
    state = train(accelerator, model, optimizer, scheduler, epoch_batches, state, settings, hooks, {})
    weights = {key: value.clone() for key, value in accelerator.unwrap_model(model).state_dict().items()}
    return weights, hooks.epoch_ends, state


def test_a_checkpoint_at_the_end_of_an_epoch_resumes_into_the_next_epoch(tmp_path):
    """The checkpoint at step 3 holds a finished epoch's data position (all 6 rows trained on): the resumed run ends
    that epoch (its hooks run at step 3, as they did after the checkpoint), trains the second and ends with the
    uninterrupted run's weights."""
    straight, straight_ends, straight_state = linear_run(tmp_path / "straight", None)
    assert straight_ends == [3, 6] and straight_state.epoch == 2
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed, resumed_ends, resumed_state = linear_run(resumed_dir, "latest")
    assert resumed_ends == [3, 6] and resumed_state.step == 6 and resumed_state.epoch == 2
    for key, tensor in straight.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=0, atol=0, msg=key)
