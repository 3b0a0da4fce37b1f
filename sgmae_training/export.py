"""Take an SG-MAE encoder where MAE users work next, and bring such encoders back.

    python -m sgmae_training.export --model outputs/sgmae-demo --format timm --output encoder.safetensors
    python -m sgmae_training.export --model outputs/sgmae-demo --format mae --output checkpoint-mae.pth
    python -m sgmae_training.export --checkpoint mae_pretrain_vit_base.pth --format mae --output outputs/from-mae

`timm`: a state dict that `timm.create_model(...)` (the call is printed, and written beside the file as
`<output>.timm.json`) loads with `strict=True`: fused qkv, the position table with its [CLS] row, `norm` before the
pooling (`global_pool="avg", fc_norm=False` for mean pooling, `"token"` for [CLS]), and `dynamic_img_size=True`, so
other image sizes run (timm then resizes the position table with its anti-aliased bicubic kernel, which differs
slightly from the plain bicubic of MAE, transformers and `interpolate_pos_encoding=True` here). For a fixed new size,
`--image_size` resizes the table in the file with this project's kernel: the features then equal ours exactly.
`mae`: facebookresearch/mae's `{"model": state_dict}` layout (`MaskedAutoencoderViT` names; the decoder too when the
source is a pre-training model), which its `main_finetune.py`, `main_linprobe.py` and MAE-loading detectors read.
The reverse (`--checkpoint`) builds an SG-MAE folder from either layout; what weights cannot tell (attention heads,
`norm_pix_loss`) comes from `--config_overrides` (heads default to width / 64, as in every ViT size).
"""

from __future__ import annotations

import argparse
import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedConfig

from modeling_sgmae import SGMAEConfig, SGMAEForImageClassification, SGMAEForPreTraining, SGMAEModel
from modeling_sgmae.modeling_sgmae import resize_position_table

from .arguments import parse_config_overrides
from .hub import check_checkpoint_kind

FORMATS = ("timm", "mae")
# Our parameter names -> timm's / fb-mae's (the two share their encoder names), applied in order.
RENAMES = (
    (r"^vit\.", ""),
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^layernorm\.", "norm."),
    (r"^layers\.", "blocks."),
    (r"^decoder\.decoder_layers\.", "decoder_blocks."),
    (r"^decoder\.(decoder_)?", r"\1"),  # decoder.mask_token -> mask_token, decoder.decoder_embed -> decoder_embed
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.qkv\.", ".attn.qkv."),
    (r"\.attention\.o_proj\.", ".attn.proj."),
    (r"^classifier\.", "head."),
)
TIMM_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large"}


def their_name(name: str) -> str:
    for pattern, replacement in RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def exported_state_dict(model: SGMAEModel | SGMAEForPreTraining | SGMAEForImageClassification) -> dict:
    """The model's weights under timm / fb-mae names (schedule buffers left out)."""
    return {
        their_name(name): tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if not name.startswith("schedule.")  # training state, not weights
    }


def timm_arguments(config: SGMAEConfig, num_classes: int) -> dict:
    """`timm.create_model` keyword arguments that build the exported encoder exactly."""
    if config.layer_norm_eps != 1e-6:
        raise SystemExit(f"error: timm's ViT uses LayerNorm eps 1e-6; this model uses {config.layer_norm_eps}")
    if config.hidden_act != "gelu":
        raise SystemExit(f"error: timm's ViT uses exact GELU; this model uses {config.hidden_act!r}")
    return {
        "pretrained": False,
        "num_classes": num_classes,
        "img_size": list(config.image_height_width),
        "patch_size": config.patch_size,
        "in_chans": config.num_channels,
        "embed_dim": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": config.intermediate_size / config.hidden_size,
        "qkv_bias": config.qkv_bias,
        "global_pool": "avg" if config.classifier_pooling == "mean" else "token",
        "fc_norm": False,  # our final LayerNorm comes before the pooling, as timm's `norm`
        "dynamic_img_size": True,
    }


def timm_model_name(config: SGMAEConfig) -> str:
    """The timm architecture name of this size (every argument is also passed explicitly, so any ViT name works)."""
    size = TIMM_SIZES.get((config.hidden_size, config.num_hidden_layers, config.num_attention_heads), "base")
    return f"vit_{size}_patch16_224"


def export_timm(model, output: Path, image_size: list[int] | None, head: bool) -> str:
    """Write the timm state dict; return the `timm.create_model` call that loads it."""
    config = model.config
    state = exported_state_dict(model)
    state = {name: tensor for name, tensor in state.items() if not name.startswith(("mask_token", "decoder_"))}
    num_classes = 0
    if head:
        if not isinstance(model, SGMAEForImageClassification) or not config.num_labels:
            raise SystemExit("error: --head needs a classification checkpoint (SGMAEForImageClassification)")
        if config.classifier_pooling == "mean":
            raise SystemExit(
                "error: timm's ViT cannot hold this classifier (a LayerNorm before and another after the mean "
                "pooling); export the encoder without --head"
            )
        num_classes = config.num_labels
    else:
        state = {name: tensor for name, tensor in state.items() if not name.startswith(("head.", "fc_norm."))}
    arguments = timm_arguments(config, num_classes)
    if image_size:
        new_grid = (image_size[0] // config.patch_size, image_size[-1] // config.patch_size)
        state["pos_embed"] = resize_position_table(state["pos_embed"], config.grid_size, new_grid).contiguous()
        arguments["img_size"] = [image_size[0], image_size[-1]]
    if output.suffix == ".pth":
        torch.save(state, output)
    else:
        save_file(state, output)
    call = (
        f"timm.create_model({timm_model_name(config)!r}, "
        + ", ".join(f"{key}={value!r}" for key, value in arguments.items())
        + ")"
    )
    output.with_name(output.name + ".timm.json").write_text(
        json.dumps({"model_name": timm_model_name(config), "kwargs": arguments}, indent=2)
    )
    return call


def export_mae(model, output: Path, head: bool) -> None:
    if head:
        raise SystemExit("error: the mae format holds no classification head (fb/mae adds its own when fine-tuning)")
    state = exported_state_dict(model)
    state = {name: tensor for name, tensor in state.items() if not name.startswith(("head.", "fc_norm."))}
    torch.save({"model": state}, output)


def load_source(path: str):
    """The SG-MAE (or transformers ViTMAE) model in `path`, as the class its weights were saved from."""
    check_checkpoint_kind(path, argument="--model")
    config_dict, _ = PreTrainedConfig.get_config_dict(path)
    architecture = (config_dict.get("architectures") or ["SGMAEModel"])[0]
    if "PreTraining" in architecture:
        return SGMAEForPreTraining.from_pretrained(path)
    if "ImageClassification" in architecture:
        return SGMAEForImageClassification.from_pretrained(path)
    return SGMAEModel.from_pretrained(path)


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A timm / fb-mae state dict from .safetensors or .pth (never unpickling code: weights_only; fb/mae's
    checkpoints also hold their `args` Namespace, which is allowed)."""
    if path.suffix == ".safetensors":
        return load_file(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    return loaded.get("model", loaded) if isinstance(loaded, dict) else loaded


def config_from_weights(state: dict[str, torch.Tensor], overrides: dict) -> SGMAEConfig:
    """The architecture the weights imply; heads default to width / 64 (every standard ViT's head width)."""
    width = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    side = round((state["pos_embed"].shape[1] - 1) ** 0.5) * patch
    fields = {
        "hidden_size": width,
        "num_hidden_layers": 1 + max({int(name.split(".")[1]) for name in state if name.startswith("blocks.")}),
        "num_attention_heads": max(width // 64, 1),
        "intermediate_size": state["blocks.0.mlp.fc1.weight"].shape[0],
        "patch_size": patch,
        "image_size": side,
        "num_channels": state["patch_embed.proj.weight"].shape[1],
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "layer_norm_eps": 1e-6,
    }
    if "decoder_embed.weight" in state:
        decoder_width = state["decoder_embed.weight"].shape[0]
        decoder_blocks = {int(name.split(".")[1]) for name in state if name.startswith("decoder_blocks.")}
        fields |= {
            "decoder_hidden_size": decoder_width,
            "decoder_num_hidden_layers": 1 + max(decoder_blocks),
            "decoder_num_attention_heads": max(decoder_width // 32, 1),
            "decoder_intermediate_size": state["decoder_blocks.0.mlp.fc1.weight"].shape[0],
        }
    return SGMAEConfig(**(fields | overrides))


def import_checkpoint(path: Path, overrides: dict) -> SGMAEModel | SGMAEForPreTraining:
    """An SG-MAE model holding a timm / fb-mae encoder (and fb-mae decoder); heads and extras are reported."""
    state = read_checkpoint(path)
    config = config_from_weights(state, overrides)
    model = SGMAEForPreTraining(config) if "decoder_embed.weight" in state else SGMAEModel(config)
    names = {their_name(name): name for name in model.state_dict() if not name.startswith("schedule.")}
    ignored = sorted(name for name in state if name not in names)
    missing = sorted(name for name in names if name not in state)
    if missing:
        raise SystemExit(f"error: {path} lacks weights an SG-MAE encoder needs: {missing[:4]}")
    if ignored:
        print(f"left out (no SG-MAE counterpart): {', '.join(ignored)}")
    model.load_state_dict({names[name]: state[name] for name in names}, strict=False)
    return model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="SG-MAE (or transformers ViTMAE) folder or Hub id to export.")
    source.add_argument("--checkpoint", type=Path, help="timm / fb-mae .safetensors or .pth to bring back.")
    parser.add_argument("--format", required=True, help="timm or mae.")
    parser.add_argument("--output", required=True, type=Path, help="File to write (export) or folder (import).")
    parser.add_argument("--head", action="store_true", help="Export the classification head too (timm).")
    parser.add_argument("--image_size", help="timm: resize the position table for this size, e.g. 384 or 384,256.")
    parser.add_argument("--config_overrides", help="Import: config fields the weights cannot tell, e.g. heads.")
    args = parser.parse_args(argv)
    if args.format not in FORMATS:
        raise SystemExit(f"error: --format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    if args.image_size:
        try:
            args.image_size = [int(side) for side in args.image_size.split(",")]
        except ValueError:
            raise SystemExit(f"error: --image_size must be N or H,W, got {args.image_size!r}") from None
    return args


@contextmanager
def writing(output: Path):
    """One line, not a traceback, when the output cannot be written (no permission, no space, ...)."""
    try:
        yield
    except OSError as error:
        raise SystemExit(f"error: cannot write {output}: {error.strerror or error}") from error


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.checkpoint:
        if not args.checkpoint.is_file():
            raise SystemExit(f"error: no such checkpoint file: {args.checkpoint}")
        model = import_checkpoint(args.checkpoint, parse_config_overrides(args.config_overrides))
        with writing(args.output):
            model.save_pretrained(args.output)
        print(f"wrote {type(model).__name__} to {args.output}")
        return
    model = load_source(args.model)
    with writing(args.output):
        args.output.parent.mkdir(parents=True, exist_ok=True)
        if args.format == "timm":
            call = export_timm(model, args.output, args.image_size, args.head)
        else:
            export_mae(model, args.output, args.head)
    if args.format == "timm":
        print(f"wrote {args.output}; load it with:\n  model = {call}\n  model.load_state_dict(state, strict=True)")
    else:
        print(f"wrote {args.output} (facebookresearch/mae layout)")


if __name__ == "__main__":
    main()
