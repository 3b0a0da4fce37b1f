"""MAE's optimisation recipes: the learning-rate schedule and the parameter groups of AdamW."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from torch import nn

from modeling_sgmae import SGMAEForImageClassification


def cosine_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up then half-cosine decay to 0, as a LambdaLR factor."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """MAE's AdamW groups: no decay on norms, biases, tokens and position tables (1-D or token parameters)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        skip = parameter.ndim <= 1 or name.endswith(("cls_token", "mask_token", "position_embeddings"))
        (no_decay if skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def layer_decay_groups(model: SGMAEForImageClassification, base_lr: float, weight_decay: float, decay: float):
    """MAE's layer-wise lr decay: depth 0 = embeddings, i + 1 = block i, L + 1 = final norm and head; the lr of a
    depth-d parameter is base_lr x decay^(L + 1 - d). No weight decay on norms, biases, [CLS] and positions."""
    num_layers = model.config.num_hidden_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        name = name.removeprefix(f"{model.base_model_prefix}.")
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
