"""MAE's learning-rate schedule: the scheduler built at a step is the one stepped there."""

from __future__ import annotations

import torch

from sgmae_training.optim import cosine_scheduler

RATES = (0.3, 0.02)  # two groups, as layer-wise decay makes them


def optimizer() -> torch.optim.SGD:
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": rate} for rate in RATES])


def rates(optimizer: torch.optim.Optimizer) -> list[float]:
    return [group["lr"] for group in optimizer.param_groups]


def test_a_scheduler_built_at_a_step_gives_the_rates_of_one_stepped_there():
    """What a resumed run relies on: the schedule is a pure function of the step (bitwise), for every group."""
    stepped_optimizer = optimizer()
    stepped = cosine_scheduler(stepped_optimizer, warmup_ratio=0.25, total_steps=12)
    for step in range(13):
        built_optimizer = optimizer()
        for group, rate in zip(built_optimizer.param_groups, RATES, strict=True):
            group["initial_lr"] = rate  # what resume_state sets on a restored optimizer
        cosine_scheduler(built_optimizer, warmup_ratio=0.25, total_steps=12, step=step)
        assert rates(built_optimizer) == rates(stepped_optimizer)
        stepped_optimizer.step()
        stepped.step()
    assert rates(stepped_optimizer) == [0.0, 0.0]  # the half-cosine has decayed to 0 at the schedule's end
