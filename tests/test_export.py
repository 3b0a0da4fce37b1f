"""sgmae_training.export: SG-MAE encoders in timm (strict load, same features) and facebookresearch/mae layouts, and
back; one-line errors for what cannot be done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, tiny_config
from safetensors.torch import load_file
from transformers import ViTConfig

from modeling_sgmae import SGMAEForImageClassification, SGMAEForPreTraining, SGMAEModel
from sgmae_training import export

timm = pytest.importorskip("timm", reason="timm is in the [dev] extra")


def mae_key_names(depth: int, decoder_depth: int) -> set[str]:
    """The state-dict names of facebookresearch/mae's MaskedAutoencoderViT (models_mae.py on timm's Block)."""

    def block(prefix: str) -> set[str]:
        parts = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        return {f"{prefix}.{part}.{kind}" for part in parts for kind in ("weight", "bias")}

    names = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    names |= {"mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias"}
    names |= {"decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    for index in range(depth):
        names |= block(f"blocks.{index}")
    for index in range(decoder_depth):
        names |= block(f"decoder_blocks.{index}")
    return names


def timm_model(file: Path) -> torch.nn.Module:
    """The timm model the export describes, with the exported weights loaded strictly."""
    described = json.loads(file.with_name(file.name + ".timm.json").read_text())
    model = timm.create_model(described["model_name"], **described["kwargs"]).eval()
    model.load_state_dict(load_file(file), strict=True)
    return model


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_timm_loads_the_export_strictly_and_computes_the_same_features(tmp_path, pooling) -> None:
    torch.manual_seed(0)
    model = SGMAEModel(tiny_config(layer_norm_eps=1e-6, classifier_pooling=pooling)).eval()
    model.save_pretrained(tmp_path / "model")
    export.main(
        ["--model", str(tmp_path / "model"), "--format", "timm", "--output", str(tmp_path / "enc.safetensors")]
    )
    theirs = timm_model(tmp_path / "enc.safetensors")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model(pixels)
        features = theirs.forward_features(pixels)
        pooled = theirs.forward_head(features)
    torch.testing.assert_close(features, ours.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, ours.pooler_output, rtol=0, atol=1e-5)
    # another size: timm's dynamic_img_size runs it (its own anti-aliased resize of the table, close to ours)
    with torch.no_grad():
        assert theirs.forward_features(torch.randn(1, 3, 48, 40)).shape == (1, 1 + 12 * 10, 32)


def test_an_export_at_another_image_size_equals_ours_with_an_interpolated_table(tmp_path) -> None:
    torch.manual_seed(0)
    model = SGMAEForPreTraining(tiny_config(layer_norm_eps=1e-6)).eval()
    model.save_pretrained(tmp_path / "model")
    output = tmp_path / "enc-48x40.pth"
    export.main(
        ["--model", str(tmp_path / "model"), "--format", "timm", "--output", str(output), "--image_size", "48,40"]
    )
    described = json.loads(output.with_name(output.name + ".timm.json").read_text())
    assert described["kwargs"]["img_size"] == [48, 40]
    theirs = timm.create_model(described["model_name"], **described["kwargs"]).eval()
    theirs.load_state_dict(torch.load(output, weights_only=True), strict=True)  # no decoder in a timm encoder
    pixels = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        ours = model.vit(pixels, interpolate_pos_encoding=True)
        features = theirs.forward_features(pixels)
    torch.testing.assert_close(features, ours.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs.forward_head(features), ours.pooler_output, rtol=0, atol=1e-5)


def test_a_cls_classifier_exports_with_its_head_and_a_mean_pooled_one_is_refused(tmp_path) -> None:
    torch.manual_seed(0)
    classifier = SGMAEForImageClassification(tiny_config(layer_norm_eps=1e-6, classifier_pooling="cls", num_labels=5))
    classifier.eval().save_pretrained(tmp_path / "cls")
    output = tmp_path / "cls.safetensors"
    export.main(["--model", str(tmp_path / "cls"), "--format", "timm", "--output", str(output), "--head"])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(output)(pixels), classifier(pixels).logits, rtol=0, atol=1e-5)

    SGMAEForImageClassification(tiny_config(layer_norm_eps=1e-6, num_labels=5)).save_pretrained(tmp_path / "mean")
    with pytest.raises(SystemExit, match=r"^error: timm's ViT cannot hold this classifier .*without --head$"):
        export.main(["--model", str(tmp_path / "mean"), "--format", "timm", "--output", str(output), "--head"])
    with pytest.raises(SystemExit, match=r"^error: the mae format holds no classification head"):
        export.main(["--model", str(tmp_path / "cls"), "--format", "mae", "--output", str(output), "--head"])


def test_mae_format_has_fb_maes_names_and_comes_back_identical(tmp_path) -> None:
    torch.manual_seed(0)
    config = tiny_config(layer_norm_eps=1e-6, norm_pix_loss=True)
    model = SGMAEForPreTraining(config).eval()
    model.save_pretrained(tmp_path / "model")
    output = tmp_path / "checkpoint-mae.pth"
    export.main(["--model", str(tmp_path / "model"), "--format", "mae", "--output", str(output)])
    checkpoint = torch.load(output, weights_only=True)
    assert set(checkpoint) == {"model"}
    assert set(checkpoint["model"]) == mae_key_names(config.num_hidden_layers, config.decoder_num_hidden_layers)

    back = tmp_path / "back"
    heads = f"num_attention_heads={config.num_attention_heads},decoder_num_attention_heads=2,norm_pix_loss=True"
    export.main(["--checkpoint", str(output), "--format", "mae", "--output", str(back), "--config_overrides", heads])
    restored = SGMAEForPreTraining.from_pretrained(back).eval()
    pixels, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    with torch.no_grad():
        expected = model(pixels, noise=noise)
        actual = restored(pixels, noise=noise)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=0, atol=0)


def test_a_timm_encoder_comes_back_as_an_sgmae_model(tmp_path) -> None:
    torch.manual_seed(0)
    shape = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
    theirs = timm.create_model("vit_tiny_patch16_224", num_classes=0, global_pool="avg", fc_norm=False, **shape)
    file = tmp_path / "timm.pth"
    torch.save(theirs.state_dict(), file)
    export.main(["--checkpoint", str(file), "--format", "timm", "--output", str(tmp_path / "back"),
                 "--config_overrides", "num_attention_heads=2"])  # fmt: skip
    ours = SGMAEModel.from_pretrained(tmp_path / "back").eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels).last_hidden_state, theirs.eval().forward_features(pixels), atol=1e-5,
                                   rtol=0)  # fmt: skip


def test_bad_input_gets_one_line(tmp_path) -> None:
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "vit"
    )
    with pytest.raises(SystemExit, match=r"^error: .* is a 'vit' checkpoint; --model needs an SG-MAE"):
        export.main(["--model", str(tmp_path / "vit"), "--format", "timm", "--output", str(tmp_path / "x.pth")])
    SGMAEModel(tiny_config(layer_norm_eps=1e-6)).save_pretrained(tmp_path / "model")
    with pytest.raises(SystemExit, match=r"^error: --format must be one of timm, mae, got 'onnx'$"):
        export.main(["--model", str(tmp_path / "model"), "--format", "onnx", "--output", str(tmp_path / "x")])
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit, match=r"^error: cannot write .*a-file/enc.safetensors: "):
        export.main(["--model", str(tmp_path / "model"), "--format", "timm",
                     "--output", str(tmp_path / "a-file/enc.safetensors")])  # fmt: skip
    SGMAEModel(tiny_config(layer_norm_eps=1e-12)).save_pretrained(tmp_path / "eps")  # ViTMAE's default
    with pytest.raises(SystemExit, match=r"^error: timm's ViT uses LayerNorm eps 1e-6"):
        export.main(["--model", str(tmp_path / "eps"), "--format", "timm", "--output", str(tmp_path / "y.pth")])
    # the command line: one line on stderr, no traceback
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, "-m", "sgmae_training.export", "--model", str(tmp_path / "vit"), "--format", "mae",
               "--output", str(tmp_path / "z.pth")]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error")] == [
        result.stderr.strip().splitlines()[-1]
    ]
