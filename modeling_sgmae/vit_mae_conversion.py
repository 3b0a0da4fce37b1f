"""transformers' ViTMAE checkpoints as SG-MAE models: key renames (every layout ViTMAE has used), q/k/v fusion, and
the `from_pretrained` path that loads them."""

from __future__ import annotations

import json
import re

import torch
from transformers import PreTrainedConfig
from transformers.utils import cached_file, logging

from .configuration_sgmae import SGMAEConfig

logger = logging.get_logger(__name__)


# Hub ViTMAE checkpoints (`encoder.layer.N.attention.attention.query`), the 5.9+ layout (`layers.N.attention.q_proj`)
# and what transformers 5.2x writes for the decoder (`decoder_encoder.layer.N`) all map to our names.
_VIT_MAE_RENAMES = [
    (r"(^|\.)encoder\.layer\.", r"\1layers."),
    (r"decoder\.decoder_encoder\.layer\.", "decoder.decoder_layers."),
    (r"attention\.attention\.query\.", "attention.q_proj."),
    (r"attention\.attention\.key\.", "attention.k_proj."),
    (r"attention\.attention\.value\.", "attention.v_proj."),
    (r"attention\.output\.dense\.", "attention.o_proj."),
    (r"intermediate\.dense\.", "mlp.fc1."),
    (r"(layers\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
]


def convert_vit_mae_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a transformers ViTMAE state dict (any of its key layouts) to SG-MAE names, fusing q/k/v into qkv."""
    renamed = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in _VIT_MAE_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = tensor
    converted = {}
    for key, tensor in renamed.items():
        match = re.match(r"(.*attention\.)([qkv])_proj\.(weight|bias)$", key)
        if match is None:
            converted[key] = tensor
        elif match.group(2) == "q":
            prefix, _, kind = match.groups()
            parts = [renamed[f"{prefix}{name}_proj.{kind}"] for name in "qkv"]
            converted[f"{prefix}qkv.{kind}"] = torch.cat(parts, dim=0)
    return converted


# Options of transformers' `from_pretrained` that mean nothing when a ViTMAE checkpoint is converted in memory.
_LOADING_ONLY_KWARGS = (
    "attn_implementation",
    "low_cpu_mem_usage",
    "use_safetensors",
    "weights_only",
    "key_mapping",
    "_from_auto",
    "_from_pipeline",
    "adapter_kwargs",
    "trust_remote_code",
    "proxies",
)


def load_checkpoint_state_dict(path: str, **hub_kwargs) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint: one safetensors file, safetensors shards with their index, or a torch .bin."""
    from safetensors.torch import load_file

    for file_name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        resolved = cached_file(path, file_name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if resolved is None:
            continue
        if file_name.endswith(".json"):
            with open(resolved, encoding="utf-8") as index:
                shards = sorted(set(json.load(index)["weight_map"].values()))
            state_dict = {}
            for shard in shards:
                state_dict.update(load_file(cached_file(path, shard, **hub_kwargs)))
            return state_dict
        if file_name.endswith(".safetensors"):
            return load_file(resolved)
        return torch.load(resolved, map_location="cpu", weights_only=True)
    raise OSError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin found at {path}")


def from_vit_mae_checkpoint(cls, path: str, config_dict: dict, hub_kwargs: dict, kwargs: dict):
    """`cls.from_pretrained` of a transformers ViTMAE checkpoint: its config as an SGMAEConfig (with the caller's
    overrides), its weights renamed and q/k/v fused; what the checkpoint lacks keeps SG-MAE's init."""
    overrides = {key: value for key, value in kwargs.items() if key not in hub_kwargs}
    dtype = overrides.pop("dtype", overrides.pop("torch_dtype", None))
    device_map = overrides.pop("device_map", None)
    ignore_mismatched_sizes = overrides.pop("ignore_mismatched_sizes", False)
    output_loading_info = overrides.pop("output_loading_info", False)
    for irrelevant in _LOADING_ONLY_KWARGS:  # options of transformers' loader that do not apply here
        overrides.pop(irrelevant, None)
    config = overrides.pop("config", None)
    if isinstance(config, SGMAEConfig):  # the caller's config, e.g. with other masking choices
        if overrides:
            raise TypeError(f"unexpected arguments for from_pretrained with a config: {sorted(overrides)}")
    else:
        if isinstance(config, PreTrainedConfig):  # e.g. an edited ViTMAEConfig
            config_dict = config.to_dict()
        elif config is not None:
            raise TypeError(f"config must be an SGMAEConfig or a ViTMAEConfig, got {type(config).__name__}")
        drop = ("model_type", "architectures", "transformers_version")
        config_dict = {key: value for key, value in config_dict.items() if key not in drop}
        config, unused = SGMAEConfig.from_dict(config_dict, return_unused_kwargs=True, **overrides)
        if unused:
            raise TypeError(f"unexpected arguments for from_pretrained: {sorted(unused)}")
    state_dict = convert_vit_mae_state_dict(load_checkpoint_state_dict(path, **hub_kwargs))
    model = cls(config)  # fully initialised: whatever the checkpoint does not provide keeps its init
    own_state = model.state_dict()
    prefix = f"{cls.base_model_prefix}."
    if not any(key.startswith(prefix) for key in own_state):  # the bare encoder: drop the prefix
        state_dict = {key.removeprefix(prefix): value for key, value in state_dict.items()}
    elif not any(key.startswith(prefix) for key in state_dict):  # a bare ViTMAEModel checkpoint
        state_dict = {prefix + key: value for key, value in state_dict.items()}
    mismatched = [
        (key, tuple(value.shape), tuple(own_state[key].shape))
        for key, value in state_dict.items()
        if key in own_state and value.shape != own_state[key].shape
    ]
    if mismatched and not ignore_mismatched_sizes:
        raise ValueError(
            f"the ViTMAE checkpoint at {path} has weights of other shapes than this model "
            f"(name, checkpoint, model): {mismatched[:8]}; pass ignore_mismatched_sizes=True to initialise them"
        )
    for key, checkpoint_shape, model_shape in mismatched:
        logger.warning(
            "not loading %s: shape %s in the checkpoint, %s in the model", key, checkpoint_shape, model_shape
        )
        del state_dict[key]
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    initialised = {key for key, _, _ in mismatched}
    initialised |= {"training_step", "total_training_steps", "informed_masking_started_at", "exploitation_rates"}
    needed = [key for key in missing if key not in initialised and not key.startswith(("classifier.", "fc_norm."))]
    if needed:
        raise ValueError(f"the ViTMAE checkpoint at {path} lacks weights this model needs: {needed[:8]}")
    ignored = [key for key in unexpected if not key.startswith("decoder.")]
    if ignored:
        logger.warning("ignored weights of the ViTMAE checkpoint at %s: %s", path, ignored[:8])
    if dtype not in (None, "auto"):
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if device_map is not None:
        if isinstance(device_map, dict) or device_map == "auto":
            device_map = "cuda" if torch.cuda.is_available() else "cpu"  # the model fits on one device
        model = model.to(device_map)
    model.eval()
    if output_loading_info:
        info = {
            "missing_keys": sorted(missing),
            "unexpected_keys": sorted(unexpected),
            "mismatched_keys": mismatched,
            "error_msgs": [],
        }
        return model, info
    return model
