"""MAE's optimisation recipes: the learning-rate schedule and the parameter groups of AdamW."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from modeling_sgmae import SGMAEForImageClassification


def cosine_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up then half-cosine decay to 0, as a LambdaLR factor."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def cosine_scheduler(optimizer: Optimizer, warmup_ratio: float, total_steps: int, step: int = 0) -> LambdaLR:
    """`cosine_schedule` over the optimizer's groups (warm-up: that share of the steps), positioned after `step`
    optimiser steps.

    The rate is a pure function of the step (each group's `initial_lr` x factor(step)), so a resumed run builds its
    scheduler from the checkpoint's step instead of loading one; `engine.resume_state` sets `initial_lr` first.
    """
    factor = cosine_schedule(round(warmup_ratio * total_steps), total_steps)
    return LambdaLR(optimizer, factor, last_epoch=step - 1)


def poly_schedule(warmup_steps: int, total_steps: int, power: float = 1.0) -> Callable[[int], float]:
    """mmsegmentation's `poly` policy with linear warm-up, as a LambdaLR factor: (1 - step / total)^power, scaled
    during the first `warmup_steps` by a ramp from 1e-6 (its warmup_ratio) to 1."""

    def factor(step: int) -> float:
        decay = max(1.0 - step / max(total_steps, 1), 0.0) ** power
        if step < warmup_steps:
            return decay * (1.0 - (1.0 - step / warmup_steps) * (1.0 - 1e-6))
        return decay

    return factor


def poly_scheduler(optimizer: Optimizer, warmup_steps: int, total_steps: int, power: float, step: int = 0) -> LambdaLR:
    """`poly_schedule` over the optimizer's groups, positioned after `step` optimiser steps (a pure function of the
    step, so a resumed run rebuilds it, as `cosine_scheduler`)."""
    return LambdaLR(optimizer, poly_schedule(warmup_steps, total_steps, power), last_epoch=step - 1)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """MAE's AdamW groups: no decay on norms, biases, tokens and position tables (1-D or token parameters)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        skip = parameter.ndim <= 1 or name.endswith(("cls_token", "mask_token", "position_embeddings"))
        (no_decay if skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def layer_decay_groups(
    model: SGMAEForImageClassification | nn.Module,
    base_lr: float,
    weight_decay: float,
    decay: float,
    encoder: str | None = None,
):
    """MAE's layer-wise lr decay: depth 0 = embeddings, i + 1 = block i, L + 1 = final norm and head; the lr of a
    depth-d parameter is base_lr x decay^(L + 1 - d). No weight decay on norms, biases, [CLS] and positions.

    `encoder`: where the SG-MAE encoder sits in `model` (default: its base model, e.g. "vit"; a segmentation model's
    is "backbone.vit", and its pyramid and heads count as depth L + 1, as in BEiT's layer-decay optimiser)."""
    encoder = encoder or model.base_model_prefix
    num_layers = model.get_submodule(encoder).config.num_hidden_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        name = name.removeprefix(f"{encoder}.")
        block = re.match(r"layers\.(\d+)\.", name)
        depth = 0 if name.startswith("embeddings.") else int(block.group(1)) + 1 if block else num_layers + 1
        no_decay = parameter.ndim <= 1 or name.endswith(("cls_token", "position_embeddings"))
        scale = decay ** (num_layers + 1 - depth)
        group = groups.setdefault(
            (depth, no_decay),
            {
                "params": [],
                "lr": base_lr * scale,
                "lr_scale": scale,
                "weight_decay": 0.0 if no_decay else weight_decay,
            },
        )
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]
