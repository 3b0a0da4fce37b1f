"""The one training loop that pre-training, fine-tuning and the linear probe share (an Accelerate loop).

It does what every run needs: gradient accumulation, clipping, mixed precision (through Accelerate), logging,
checkpoints and resume, the NaN stop and the progress bar. What differs between the scripts plugs in as
`TrainingHooks`: the loss of a batch, statistics of its outputs, and what to do after a step or an epoch.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import InitProcessGroupKwargs, broadcast, set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedConfig

from .arguments import DISTRIBUTED_TIMEOUT_S
from .checkpoints import (
    checkpoint_dirs,
    last_good_checkpoint,
    load_checkpoint,
    mark_verified,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from .data.images import warn_skipped
from .training_state import TrainingState

# A loss this many times the one before a checkpoint, right after it, means training diverged from its weights.
EXPLODING_LOSS_FACTOR = 100.0
# What gloo's errors say when a peer is gone or silent (they are plain RuntimeErrors, not torch's DistErrors).
LOST_PEER_REASONS = re.compile(r"gloo|pair closure|connection (reset|closed|refused)|timed out|broken pipe", re.I)

logger = logging.getLogger(__name__)


def start_run(
    output_dir: str,
    seed: int,
    gradient_accumulation_steps: int,
    mixed_precision: str | None,
    report_to: str,
    distributed_timeout_s: float = DISTRIBUTED_TIMEOUT_S,
) -> Accelerator:
    """The run's Accelerator, with its launch checked, logging set up (INFO on the main process), seed set and the
    output folder made. With several processes, a collective waits at most `distributed_timeout_s` for the others,
    and losing one of them ends this process with one line (`report_lost_peers`)."""
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(mixed_precision),
        log_with=None if report_to == "none" else report_to,
        project_dir=output_dir,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=distributed_timeout_s))],
    )
    check_launch(accelerator)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    if not accelerator.is_main_process:
        datasets.utils.logging.set_verbosity_error()
    if accelerator.num_processes > 1:
        report_lost_peers(accelerator.process_index, output_dir, distributed_timeout_s)
    set_seed(seed)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return accelerator


def is_lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another process went away: torch's distributed errors
    (NCCL, the rendezvous store) and gloo's, which reach Python as plain RuntimeErrors ("[.../gloo/...] Read error:
    Connection reset by peer", "Timed out waiting ...", "Application timeout caused pair closure")."""
    gloo = isinstance(error, RuntimeError) and LOST_PEER_REASONS.search(str(error)) is not None
    return gloo or isinstance(error, torch.distributed.DistError)


def lost_peer_message(error: BaseException, rank: int, output_dir: str, timeout_s: float) -> str:
    """One line: what happened, gloo's or torch's own reason (without its source path), and how to continue."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # gloo's: "[.../gloo/transport/tcp/pair.cc:545] Read error [addr]:port: Connection reset by peer. This is ..."
    reason = re.sub(r"^\[[^\]]*\]\s*", "", reason).split(". ")[0]
    return (
        f"error: process {rank} lost contact with the other processes of the run ({reason}): a process or node died, "
        f"froze for over {timeout_s:g}s, or the network failed. Start the same command on every node again with "
        f"--resume_from_checkpoint latest to continue from the newest checkpoint in {output_dir}"
    )


def report_lost_peers(rank: int, output_dir: str, timeout_s: float) -> None:
    """Turn an uncaught lost-peer error into one line and exit status 1 (other errors keep their traceback).

    The failure surfaces in whichever collective comes next (a backward's all-reduce, a barrier, a checkpoint), so
    one hook for the process rather than a try/except around each; torch.distributed installs its hook the same way.
    """
    previous = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, traceback) -> None:
        if not is_lost_peer(error):
            previous(kind, error, traceback)
            return
        tqdm.write(lost_peer_message(error, rank, output_dir, timeout_s), file=sys.stderr)  # below the bar

    sys.excepthook = hook


def resolve_mixed_precision(requested: str | None) -> str | None:
    """`auto`: the launcher's mode if it chose one other than `no`; else bf16 autocast on a CUDA device that
    supports it (a GPU's default) and full precision elsewhere (on CPUs bf16 autocast slows MAE's step)."""
    if requested != "auto":
        return requested
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher != "no":
        return launcher
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def check_launch(accelerator: Accelerator) -> None:
    """Refuse a launch whose processes are not joined (each would train its own copy on the same data)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but Accelerate sees a single process: the processes are not joined and would "
            "each train an independent copy. On CPU launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
            "--num_processes N` (or the provided configuration/accelerate/cpu_multi_process.yaml)."
        )


def divergence_advice(output_dir: str) -> str:
    """Which checkpoint to go back to after a divergence, and how: the newest one from which training was seen to
    go on with a finite, non-exploding loss."""
    good = last_good_checkpoint(output_dir)
    if good is None:
        written = (
            "; the checkpoints written were not followed by a healthy loss" if checkpoint_dirs(output_dir) else ""
        )
        return f"No checkpoint is known to be good{written}: restart with a lower learning rate or --max_grad_norm."
    return (
        f"The last good checkpoint is {good}: resume from it with a lower learning rate (e.g. a tenth of "
        f"--base_learning_rate) or --max_grad_norm 1.0, adding --resume_from_checkpoint {good}"
    )


def all_finite(model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Whether every weight, floating-point buffer and optimizer-state tensor (e.g. Adam's moments) is finite."""
    tensors = [*model.parameters(), *(buffer for buffer in model.buffers() if buffer.is_floating_point())]
    tensors += [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    return bool(torch.stack([torch.isfinite(tensor).all() for tensor in tensors]).all())


def resume_state(
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    output_dir: str,
    resume_from_checkpoint: str | None,
    objects: dict[str, Any],
    total_steps: int,
) -> TrainingState:
    """The state to start from: a new run's, or that of the checkpoint `resume_from_checkpoint` names (`latest`: the
    newest in output_dir), with `optimizer` and `objects` restored from it.

    A resumed run keeps the checkpoint's weights, optimizer moments, RNG states and data position, and takes its
    learning rate and schedule length from this run's arguments: each optimizer group's `initial_lr` goes back to
    this run's rate, and the scheduler is built afterwards at the returned step (`optim.cosine_scheduler`). The log
    says which of those differ from the checkpoint's.
    """
    path = resolve_resume(output_dir, resume_from_checkpoint)
    if path is None:
        if resume_from_checkpoint == "latest":
            logger.info("no checkpoint in %s yet: starting from scratch", output_dir)
        return TrainingState(total_steps=total_steps)
    learning_rates = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    state = load_checkpoint(accelerator, path, objects)
    saved_rates = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    for group, rate in zip(optimizer.param_groups, learning_rates, strict=True):
        group["initial_lr"] = rate
    changed = []
    if saved_rates != learning_rates:
        changed.append(f"peak learning rate {max(learning_rates):.3g} (checkpoint: {max(saved_rates):.3g})")
    if state.total_steps and state.total_steps != total_steps:  # 0: a checkpoint that did not record it
        changed.append(f"schedule length {total_steps} steps (checkpoint: {state.total_steps})")
    state.total_steps = total_steps
    logger.info(
        "resumed from %s at step %d (epoch %d): weights, optimizer moments, RNG states and data position from the "
        "checkpoint; %s",
        path,
        state.step,
        state.epoch,
        "from this run's arguments: " + ", ".join(changed) if changed else "learning rate and schedule unchanged",
    )
    return state


class TrainingHooks:
    """What a script adds to the loop. Only `loss` is required; the other hooks do nothing by default."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """The loss of one micro-batch, and whatever `after_micro_batch` should see."""
        raise NotImplementedError

    def before_micro_batch(self, step: int) -> None:
        """Called before each forward pass with the number of optimiser steps taken so far."""

    def after_micro_batch(self, batch: dict[str, torch.Tensor], outputs: Any) -> None:
        """Called after each micro-batch's optimiser call (statistics of its outputs)."""

    def log_values(self) -> dict[str, float]:
        """Extra values for this logging window (then the window starts anew)."""
        return {}

    def progress_values(self) -> dict[str, str]:
        """Extra fields of the progress bar."""
        return {}

    def after_step(self, step: int) -> None:
        """Called after each optimiser step (and its logging), before a step checkpoint."""

    def after_epoch(self, state: TrainingState) -> None:
        """Called when an epoch has run to its end, before an epoch checkpoint."""


@dataclass
class LoopSettings:
    """What to log and keep: the loop's share of a script's arguments (how long to train is the state's)."""

    output_dir: str
    logging_steps: int
    checkpointing_steps: str | None  # N (steps), "epoch" or "none"
    save_total_limit: int | None
    max_grad_norm: float | None
    checkpoint_config: PreTrainedConfig | None = None  # written into each checkpoint, so it loads with from_pretrained
    count_key: str = "pixel_values"  # the batch entry whose length counts the samples
    sharded: bool = True  # each process trains on its own shard: sample counts are summed over processes
    stop_at: float | None = None  # wall-clock time (time.time()) before which to stop at a checkpoint


class Checkpointer:
    """Writes the run's checkpoints, only ever from finite weights, buffers and optimizer state, and marks the newest
    one verified once the first loss computed from its weights is finite and not exploding."""

    def __init__(self, accelerator, model, optimizer, settings: LoopSettings, objects: dict, last_loss: float | None):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.settings, self.objects = settings, objects
        self.last_loss = torch.tensor(last_loss if last_loss is not None else float("inf"))
        self.unverified: tuple[Path, float] | None = None  # the newest checkpoint, and the loss just before it
        self.last_saved_at = time.time()

    def save(self, state: TrainingState, window: LoggingWindow) -> None:
        """Checkpoint the state, with the data position made exact and the loss of the window so far."""
        window.count_into(state)
        if window.micro_batches:
            state.train_loss = window.mean_loss(state.step)
        settings = self.settings
        if not all_finite(self.model, self.optimizer):
            advice = divergence_advice(settings.output_dir)
            raise SystemExit(
                f"error: the weights or optimizer state became non-finite by step {state.step} (last logged loss "
                f"{state.train_loss}); no checkpoint was written for it. {advice}"
            )
        path = save_checkpoint(
            self.accelerator,
            settings.output_dir,
            state,
            settings.save_total_limit,
            self.objects,
            settings.checkpoint_config,
        )
        self.unverified = (path, self.last_loss.item())

    def time_is_up(self) -> bool:
        """Whether the next checkpoint, as far away as the last one was, would come after `settings.stop_at`;
        decided by the main process, so every process stops at the same checkpoint."""
        now, since_last = time.time(), time.time() - self.last_saved_at
        self.last_saved_at = now
        if self.settings.stop_at is None:
            return False
        up = torch.tensor(float(now + since_last > self.settings.stop_at), device=self.accelerator.device)
        return bool(broadcast(up).item())

    def saw_loss(self, loss: torch.Tensor) -> None:
        """The loss of the current weights (read from the device only when it verifies a checkpoint)."""
        if self.unverified is not None:
            path, loss_before = self.unverified
            value = loss.item()
            healthy = math.isfinite(value) and value <= EXPLODING_LOSS_FACTOR * abs(loss_before) + 1e-6
            if self.accelerator.is_main_process and healthy:
                mark_verified(path, value)
            self.unverified = None
        self.last_loss = loss


class LoggingWindow:
    """What happened since the last logging step, kept where it was made: loss sums on the device (read once per
    window), image counts on the host (summed over processes once per window, checkpoint or epoch)."""

    def __init__(self, accelerator: Accelerator, settings: LoopSettings):
        self.accelerator, self.settings = accelerator, settings
        self.loss_sum, self.micro_batches = torch.zeros((), device=accelerator.device), 0
        self.images = self.skipped = 0
        self.first_step: int | None = None

    def add(self, loss: torch.Tensor, batch: dict, step: int) -> None:
        self.loss_sum += loss.detach().float()
        self.micro_batches += 1
        self.images += len(batch[self.settings.count_key])
        self.skipped += batch.get("skipped", 0)  # an int: the collator counts on the host
        warn_skipped(batch)  # here, where they are counted
        self.first_step = step if self.first_step is None else self.first_step

    def count_into(self, state: TrainingState) -> None:
        """Add the images counted so far to the state (summed over processes when each has its own shard)."""
        images, skipped = self.images, self.skipped
        if self.settings.sharded and self.accelerator.num_processes > 1:
            counts = torch.tensor([images, skipped], device=self.accelerator.device)
            images, skipped = self.accelerator.reduce(counts, "sum").tolist()
        state.samples_in_epoch += images
        state.samples_seen += images
        state.skipped_images += skipped
        self.images = self.skipped = 0

    def mean_loss(self, step: int) -> float:
        """The window's mean loss, with the NaN stop: a non-finite loss anywhere in the window ends the run."""
        loss = self.loss_sum.item() / max(self.micro_batches, 1)
        if not math.isfinite(loss):
            raise SystemExit(
                f"error: the loss became {loss} between steps {self.first_step} and {step}; stopping. "
                f"{divergence_advice(self.settings.output_dir)}"
            )
        self.loss_sum.zero_()
        self.micro_batches, self.first_step = 0, None
        return loss


def train(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch_batches: Callable[[TrainingState], Iterable[dict[str, torch.Tensor]]],
    state: TrainingState,
    settings: LoopSettings,
    hooks: TrainingHooks,
    objects: dict[str, Any],
) -> TrainingState:
    """Train until `state.total_steps` optimiser steps, or until the checkpoint at which `settings.stop_at` is
    near (the returned `state` then has fewer steps); return the final `state`.

    `epoch_batches(state)` yields this process's batches of the epoch in `state`, past the samples already trained on
    (a resumed run continues exactly). `state` is saved in every checkpoint with `objects` (state_dicts Accelerate
    does not hold). Inside a step nothing is read back from
    the device: losses and counts are read once per logging window, checkpoint and epoch.
    """
    total_steps = state.total_steps
    progress = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_main_process)
    window = LoggingWindow(accelerator, settings)
    started, samples_at_start, seconds_at_start = time.perf_counter(), state.samples_seen, state.train_seconds
    checkpoints = Checkpointer(accelerator, model, optimizer, settings, objects, state.train_loss)

    model.train()
    stopping = False
    while state.step < total_steps and not stopping:
        epoch_start = state.samples_in_epoch
        for batch in epoch_batches(state):
            if state.step >= total_steps:  # checked before training, so a schedule ending with an epoch ends it
                break
            hooks.before_micro_batch(state.step)
            loss, outputs = train_micro_batch(accelerator, model, optimizer, hooks, batch, settings.max_grad_norm)
            window.add(loss, batch, state.step)
            checkpoints.saw_loss(loss.detach())
            hooks.after_micro_batch(batch, outputs)
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state.step += 1
            state.train_seconds = seconds_at_start + time.perf_counter() - started
            progress.update(1)
            step = state.step
            if step % settings.logging_steps == 0 or step == total_steps:
                window.count_into(state)
                images_per_second = (state.samples_seen - samples_at_start) / (time.perf_counter() - started)
                state.train_loss = window.mean_loss(step)
                log_window(accelerator, progress, state, optimizer, hooks, images_per_second)
            hooks.after_step(step)
            steps = settings.checkpointing_steps
            if steps not in (None, "none", "epoch") and step % int(steps) == 0:
                checkpoints.save(state, window)
                if stopping := checkpoints.time_is_up():
                    break
        else:  # the epoch ran to its end
            stopping = end_epoch(state, window, checkpoints, hooks, settings, epoch_start)
    window.count_into(state)
    progress.close()
    if accelerator.is_main_process and not stopping:  # at the end: the last good checkpoint need not outlive the limit
        prune_checkpoints(settings.output_dir, settings.save_total_limit, keep_last_good=False)
    return state


def train_micro_batch(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    hooks: TrainingHooks,
    batch: dict[str, torch.Tensor],
    max_grad_norm: float | None,
) -> tuple[torch.Tensor, Any]:
    """Forward, backward, clipping and the optimiser step of one micro-batch (stepping only when Accelerate
    synchronises the accumulated gradients); the loss and the outputs."""
    # An optimizer Accelerate did not prepare (the linear probe's) steps on plain, unscaled gradients.
    prepared = isinstance(optimizer, AcceleratedOptimizer)
    with accelerator.accumulate(model):
        loss, outputs = hooks.loss(model, batch)
        accelerator.backward(loss) if prepared else loss.backward()
        if accelerator.sync_gradients and max_grad_norm:
            clip = accelerator.clip_grad_norm_ if prepared else nn.utils.clip_grad_norm_
            clip(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    return loss, outputs


def log_window(
    accelerator: Accelerator,
    progress: tqdm,
    state: TrainingState,
    optimizer: torch.optim.Optimizer,
    hooks: TrainingHooks,
    images_per_second: float,
) -> None:
    """The logging step's values (the window's mean loss in `state`, the learning rate, the speed, the hooks') to the
    trackers and the progress bar."""
    logs = {"loss": state.train_loss, "lr": optimizer.param_groups[-1]["lr"]}
    logs |= {"img_per_s": images_per_second, **hooks.log_values()}
    progress.set_postfix(
        loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.1e}", img_s=f"{logs['img_per_s']:.0f}", **hooks.progress_values()
    )
    accelerator.log(logs, step=state.step)


def end_epoch(
    state: TrainingState,
    window: LoggingWindow,
    checkpoints: Checkpointer,
    hooks: TrainingHooks,
    settings: LoopSettings,
    epoch_start: int,
) -> bool:
    """Count the finished epoch into `state`, run the hooks, save an epoch checkpoint if asked; whether time is up."""
    window.count_into(state)
    if epoch_start == state.samples_in_epoch == 0:
        raise SystemExit("error: the training split yielded no full batch of images")
    state.epoch += 1
    state.samples_in_epoch = 0
    hooks.after_epoch(state)
    if settings.checkpointing_steps == "epoch":
        checkpoints.save(state, window)
        return checkpoints.time_is_up()
    return False
