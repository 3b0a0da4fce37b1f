"""SGMAEBackbone: transformers' own backbone tests, feature maps, a dense head trained on it, saved folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unittest

import pytest
import torch
import transformers_common
from conftest import INVALID_CONFIG, tiny_config
from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation

from modeling_sgmae import SGMAEBackbone, SGMAEConfig, SGMAEModel

common = transformers_common.load()
from transformers_common_tests.test_backbone_common import BackboneTesterMixin  # noqa: E402


class SGMAEBackboneTester:
    def __init__(self, batch_size: int = 2):
        self.batch_size = batch_size

    def prepare_config_and_inputs_for_common(self) -> tuple[SGMAEConfig, dict]:
        config = tiny_config(num_hidden_layers=3, out_features=["stage1", "stage3"])
        return config, {"pixel_values": torch.randn(self.batch_size, 3, 32, 32)}


class SGMAEBackboneCommonTest(BackboneTesterMixin, unittest.TestCase):
    all_model_classes = (SGMAEBackbone,)
    config_class = SGMAEConfig
    has_attentions = True

    def setUp(self):
        self.model_tester = SGMAEBackboneTester()


def test_feature_maps_are_the_encoders_hidden_states_as_maps() -> None:
    torch.manual_seed(0)
    config = tiny_config(out_features=["stem", "stage2"], image_size=[32, 24])
    backbone = SGMAEBackbone(config).eval()
    pixels = torch.randn(2, 3, 32, 24)
    with torch.no_grad():
        stem, last = backbone(pixels).feature_maps
        encoder = backbone.vit(pixels, output_hidden_states=True)
    assert stem.shape == last.shape == (2, 32, 8, 6)  # [B, D, H/p, W/p] at the image's own aspect
    # the last stage after the final LayerNorm is the encoder's last_hidden_state, patch (row, column) at [.., r, c]
    patches = encoder.last_hidden_state[:, 1:].reshape(2, 8, 6, 32)
    torch.testing.assert_close(last.permute(0, 2, 3, 1), patches, rtol=0, atol=0)
    torch.testing.assert_close(stem.permute(0, 2, 3, 1), backbone.vit.layernorm(encoder.hidden_states[0])[:, 1:]
                               .reshape(2, 8, 6, 32), rtol=0, atol=0)  # fmt: skip
    with torch.no_grad():  # other sizes through the interpolated position table
        resized = backbone(torch.randn(1, 3, 48, 40), interpolate_pos_encoding=True).feature_maps
    assert resized[1].shape == (1, 32, 12, 10)
    raw = SGMAEBackbone(tiny_config(apply_layernorm=False, reshape_hidden_states=False)).eval()
    assert raw(pixels[:, :, :, :24].new_zeros(1, 3, 32, 32)).feature_maps[0].shape == (1, 65, 32)


def test_a_pretrained_encoder_loads_as_a_backbone_and_the_folder_carries_it(tmp_path) -> None:
    encoder = SGMAEModel(tiny_config())
    encoder.save_pretrained(tmp_path / "encoder")
    backbone = SGMAEBackbone.from_pretrained(tmp_path / "encoder", out_indices=[1, 2])
    assert backbone.out_features == ["stage1", "stage2"] and backbone.channels == [32, 32]
    torch.testing.assert_close(backbone.vit.layers[1].mlp.fc2.weight, encoder.layers[1].mlp.fc2.weight)
    backbone.save_pretrained(tmp_path / "backbone")
    saved = json.loads((tmp_path / "backbone/config.json").read_text())
    assert saved["auto_map"]["AutoBackbone"] == "modeling_sgmae.SGMAEBackbone"
    assert saved["out_features"] == ["stage1", "stage2"]
    # AutoBackbone.from_pretrained (transformers 5.25) takes every name for a Hub id, so a local folder goes through
    # AutoConfig and the class that AutoBackbone maps it to; both come from the folder's own code.
    check = (
        "import sys, torch; from transformers import AutoBackbone, AutoConfig; "
        "config = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True); "
        "cls = type(AutoBackbone.from_config(config, trust_remote_code=True)); "
        "b = cls.from_pretrained(sys.argv[1]); "
        "print(cls.__name__, [tuple(m.shape) for m in b(torch.zeros(1, 3, 32, 32)).feature_maps], "
        "float(b.vit.layers[1].mlp.fc2.weight.sum()))"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", check, str(tmp_path / "backbone")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] == "SGMAEBackbone" and "(1, 32, 8, 8), (1, 32, 8, 8)" in result.stdout
    assert float(result.stdout.split()[-1]) == pytest.approx(encoder.layers[1].mlp.fc2.weight.sum().item(), abs=1e-5)
    assert type(AutoBackbone.from_config(tiny_config())).__name__ == "SGMAEBackbone"


def test_upernet_trains_on_the_backbone() -> None:
    """transformers' UperNet head on SG-MAE feature maps: forward, backward, and the loss goes down."""
    torch.manual_seed(0)
    backbone_config = tiny_config(out_features=["stem", "stage1", "stage2"])
    config = UperNetConfig(
        backbone_config=backbone_config.to_dict(), hidden_size=16, auxiliary_in_channels=32, num_labels=3
    )
    model = UperNetForSemanticSegmentation(config)
    assert type(model.backbone).__name__ == "SGMAEBackbone"
    pixels, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4, 32, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        output = model(pixel_values=pixels, labels=labels)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(output.loss.item())
    assert output.logits.shape == (4, 3, 32, 32)
    assert model.backbone.vit.layers[0].attention.qkv.weight.grad is None  # zeroed after the step
    assert losses[-1] < losses[0]


def test_stages_must_exist() -> None:
    with pytest.raises(INVALID_CONFIG, match="out_features must be a subset of stage_names"):
        tiny_config(out_features=["stage9"])
    config = tiny_config(out_features=["stage2"])
    config.num_hidden_layers = 1  # would leave stage2 behind: a rule between fields, checked by validate()
    with pytest.raises(INVALID_CONFIG, match="subset of stage_names"):
        config.validate()
    with pytest.raises(INVALID_CONFIG, match="subset of stage_names"):
        SGMAEBackbone(config)
    assert tiny_config(num_hidden_layers=2).out_features == ["stage2"]  # unset: the last stage of the depth
