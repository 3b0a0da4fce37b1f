"""The training engine: a step reads nothing back from the device; losses and counts are read once per window."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch
from accelerate import Accelerator
from conftest import REPO_ROOT, tiny_config

from modeling_sgmae import SGMAEForPreTraining
from modeling_sgmae.mask_cache import MaskRankingCache
from sgmae_training import engine
from sgmae_training.engine import LoopSettings, train
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
