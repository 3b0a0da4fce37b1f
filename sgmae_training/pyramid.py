"""What segmentation and detection share: the SG-MAE encoder as the four-stage pyramid backbone of a dense head, from a
pre-trained encoder (its position table resized to the new grid) or from a configuration file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

from modeling_sgmae import SGMAEBackbone, SGMAEConfig
from modeling_sgmae.modeling_sgmae import resize_position_table
from sgmae_training.data.images import check_num_channels


def pyramid_stages(out_indices: list[int] | None, num_layers: int) -> list[int]:
    """The four blocks whose outputs feed the pyramid: given, or L/3, L/2, 2L/3, L (BEiT/MAE's 0-based 3, 5, 7, 11
    for 12 blocks, 7, 11, 15, 23 for 24)."""
    stages = list(out_indices or [round(num_layers / 3), round(num_layers / 2), round(2 * num_layers / 3), num_layers])
    if len(stages) != 4 or len(set(stages)) != 4 or not all(0 <= stage <= num_layers for stage in stages):
        raise SystemExit(
            f"error: the pyramid takes four different blocks of the {num_layers}-block encoder (0 = the embeddings), "
            f"got {stages}; pass --out_indices"
        )
    return sorted(stages)


def encoder_and_config(
    path: str | None, config_name: str | None, cache_dir: str | None, num_channels: int | None
) -> tuple[SGMAEBackbone | None, SGMAEConfig]:
    """The pre-trained encoder at `path` (None without one) and a copy of its configuration to build the new model
    on, or the configuration file `config_name` for a randomly initialised encoder."""
    if path:
        encoder = SGMAEBackbone.from_pretrained(path, cache_dir=cache_dir)
        backbone_config = SGMAEConfig.from_dict(encoder.config.to_dict())
        check_num_channels(num_channels, backbone_config, path)
        return encoder, backbone_config
    backbone_config = SGMAEConfig.from_json_file(config_name)
    if num_channels:
        backbone_config.num_channels = num_channels
    return None, backbone_config


def as_pyramid(backbone_config: SGMAEConfig, image_size: int, drop_path: float, out_indices: list[int] | None) -> None:
    """Set `backbone_config` to the input size with the pyramid's four stages (and no final LayerNorm on them)."""
    stages = pyramid_stages(out_indices, backbone_config.num_hidden_layers)
    pyramid = {"add_fpn": True, "apply_layernorm": False, "reshape_hidden_states": True, "out_indices": stages}
    backbone_config.update({"image_size": image_size, "drop_path_rate": drop_path, **pyramid})
    backbone_config.validate()


def with_encoder(model, backbone: SGMAEBackbone, encoder: SGMAEBackbone | None):
    """`model` with the pre-trained `encoder` (when there is one) copied into its `backbone`, and what gets no gradient
    frozen again (`freeze_unused_parameters`)."""
    if encoder is not None:
        copy_encoder(encoder, backbone)
        model.freeze_unused_parameters()
    return model


def copy_encoder(encoder: SGMAEBackbone, backbone: SGMAEBackbone) -> None:
    """Copy a pre-trained encoder into a dense model's backbone, its position table resized to the backbone's grid
    (bicubic, as MAE's `interpolate_pos_embed`)."""
    state = encoder.vit.state_dict()
    key = "embeddings.position_embeddings"
    state[key] = resize_position_table(state[key], encoder.config.grid_size, backbone.config.grid_size)
    backbone.vit.load_state_dict(state)


@contextmanager
def model_building(task: str, source: str | None) -> Iterator[None]:
    """Turn a checkpoint or configuration that cannot be read into one `error:` line naming it."""
    try:
        yield
    except (OSError, ValueError, TypeError, SafetensorError, StrictDataclassError) as error:
        reason = " ".join(str(error).split())  # one line (strict config errors span two)
        raise SystemExit(f"error: cannot build the {task} model from {source!r}: {reason}") from error
