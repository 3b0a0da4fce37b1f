"""Checkpoint layouts other than today's, read through transformers' own loader: transformers' ViTMAE checkpoints (the
key layouts ViTMAE has used, declared as a conversion: renames, q/k/v fused into qkv; a ViTMAE config becomes an
SGMAEConfig) and SG-MAE checkpoints written before the masking schedule had an owner."""

from transformers import PreTrainedConfig
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, WeightConverter, WeightRenaming

from .configuration_sgmae import SGMAEConfig

# Where the schedule's state lived before `InformedMaskingSchedule` owned it (top-level buffers).
LEGACY_SCHEDULE_KEYS = {
    "training_step": "schedule.training_step",
    "total_training_steps": "schedule.total_training_steps",
    "informed_masking_started_at": "schedule.started_at",
    "exploitation_rates": "schedule.last_check",
}
# Hub ViTMAE checkpoints (`encoder.layer.N.attention.attention.query`), the 5.9+ layout (`layers.N.attention.q_proj`)
# and what transformers 5.2x writes for the decoder (`decoder_encoder.layer.N`) all map to our names. Registered for
# the model type, so the loader applies it to every SG-MAE class, remote code included.
VIT_MAE_CONVERSION = [
    WeightRenaming(r"(^|\.)encoder\.layer\.", r"\1layers."),
    WeightRenaming(r"decoder\.decoder_encoder\.layer\.", "decoder.decoder_layers."),
    WeightRenaming(r"attention\.attention\.query\.", "attention.q_proj."),
    WeightRenaming(r"attention\.attention\.key\.", "attention.k_proj."),
    WeightRenaming(r"attention\.attention\.value\.", "attention.v_proj."),
    WeightRenaming(r"attention\.output\.dense\.", "attention.o_proj."),
    WeightRenaming(r"intermediate\.dense\.", "mlp.fc1."),
    WeightRenaming(r"(layers\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
    *(
        WeightConverter(
            [f"attention.{name}_proj.{kind}" for name in "qkv"],
            f"attention.qkv.{kind}",
            operations=[Concatenate(dim=0)],
        )
        for kind in ("weight", "bias")
    ),
    *(WeightRenaming(rf"^{old}$", new) for old, new in LEGACY_SCHEDULE_KEYS.items()),
]
register_checkpoint_conversion_mapping("sgmae", VIT_MAE_CONVERSION, overwrite=True)


def sgmae_config_for(path: str, config: PreTrainedConfig | None, kwargs: dict) -> tuple[SGMAEConfig | None, dict]:
    """The config to load `path` with, and the loader's other arguments. A transformers ViTMAE config (the
    checkpoint's, or one passed in) becomes an SGMAEConfig with the caller's config-field arguments applied; an
    SGMAEConfig passed in is kept; otherwise None: the stock loader reads the checkpoint's own."""
    if config is None:
        hub_keys = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
        config_dict, _ = PreTrainedConfig.get_config_dict(
            path, **{key: kwargs[key] for key in hub_keys if key in kwargs}
        )
        if config_dict.get("model_type") != "vit_mae":
            return None, kwargs
    elif isinstance(config, SGMAEConfig):
        return config, kwargs
    else:
        config_dict = config.to_dict()
    drop = ("model_type", "architectures", "transformers_version", "auto_map")
    fields = {key: value for key, value in config_dict.items() if key not in drop}
    defaults = SGMAEConfig()  # its attributes are what a caller's argument may set; dtype belongs to the loader
    overrides = {key: value for key, value in kwargs.items() if hasattr(defaults, key) and key != "dtype"}
    loader_kwargs = {key: value for key, value in kwargs.items() if key not in overrides}
    return SGMAEConfig.from_dict(fields | overrides), loader_kwargs
