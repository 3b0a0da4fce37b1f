"""SGMAEConfig: validation names the offending field, defaults follow docs/method.md, save/load and auto_map work."""

from __future__ import annotations

import importlib
import json

import pytest
from conftest import INVALID_CONFIG, tiny_config
from transformers import AutoConfig, ViTMAEConfig

import modeling_sgmae
from modeling_sgmae import SGMAEConfig, SGMAEModel
from modeling_sgmae.configuration_sgmae import num_masked_patches

INVALID_VALUES = [
    ("hidden_size", 0),
    ("hidden_size", -32),
    ("hidden_size", 32.0),
    ("hidden_size", True),
    ("num_hidden_layers", 0),
    ("num_attention_heads", 0),
    ("intermediate_size", -1),
    ("patch_size", 0),
    ("num_channels", 0),
    ("decoder_hidden_size", 0),
    ("decoder_num_hidden_layers", 0),
    ("decoder_num_attention_heads", 0),
    ("decoder_intermediate_size", 2.5),
    ("fiedler_power_steps", 0),
    ("image_size", 30),
    ("image_size", 2),
    ("image_size", [32]),
    ("image_size", [32, 30]),
    ("image_size", [32, 32, 32]),
    ("image_size", "32"),
    ("image_size", [32.0, 32]),
    ("mask_ratio", -0.1),
    ("mask_ratio", 1.0),
    ("mask_ratio", "0.75"),
    ("mask_ratio", float("nan")),
    ("mask_ratio", 0.0),  # no patch masked: the loss would be 0 / 0
    ("mask_ratio", 0.99),  # all 64 patches of the tiny config masked: nothing for the encoder
    ("hidden_dropout_prob", 1.0),
    ("attention_probs_dropout_prob", -0.5),
    ("drop_path_rate", 1.0),
    ("informed_masking_start", 1.5),
    ("informed_masking_start", -0.1),
    ("hint_ratio", 0.6),
    ("hint_ratio", -0.01),
    ("graph_threshold", 1.5),
    ("graph_eps", 0.0),
    ("graph_eps", 2.0),
    ("layer_norm_eps", -1e-6),
    ("layer_norm_eps", 0.0),
    ("initializer_range", -0.02),
    ("hidden_act", "no_such_activation"),
    ("hidden_act", None),
    ("qkv_bias", "yes"),
    ("norm_pix_loss", 1),
    ("informed_masking_auto_start", "true"),
    ("mask_strategy", "informed"),
    ("graph_edges", "binary"),
    ("foreground_rule", "largest"),
    ("hint_sampling", "top"),
    ("fiedler_solver", "arnoldi"),
    ("hint_portion", 0.0),
    ("hint_portion", 1.5),
    ("hint_decay_power", 0.0),
    ("hint_count_base", "visible"),
    ("hint_min_count", -1),
    ("fiedler_lanczos_steps", 0),
    ("fiedler_lanczos_tolerance", 0.0),
    ("fiedler_lanczos_tolerance", 1.5),
    ("informed_mask_source", "epoch"),
    ("classifier_pooling", "max"),
    ("informed_masking_start_step", -1),
    ("informed_masking_start_step", 1.5),
    ("informed_masking_start_step", True),
    ("mask_feature_layer", 0),
    ("mask_feature_layer", 3),  # the tiny encoder has 2 blocks
    ("mask_feature_layer", True),
]


def names(field: str) -> str:
    return rf"SGMAEConfig\.{field}\b|field '{field}'"


@pytest.mark.parametrize(("field", "value"), INVALID_VALUES, ids=lambda v: repr(v))
def test_invalid_value_raises_an_error_naming_the_field(field, value):
    with pytest.raises(INVALID_CONFIG, match=names(field)):
        tiny_config(**{field: value})


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(hidden_size=36, num_attention_heads=8), "hidden_size"),  # heads do not divide the width
        (dict(decoder_hidden_size=20, decoder_num_attention_heads=8), "decoder_hidden_size"),
        (dict(hidden_size=34, num_attention_heads=2), "hidden_size"),  # sin-cos tables need a multiple of 4
        (dict(decoder_hidden_size=18, decoder_num_attention_heads=2), "decoder_hidden_size"),
    ],
)
def test_inconsistent_widths_raise_an_error_naming_the_field(overrides, field):
    with pytest.raises(INVALID_CONFIG, match=names(field)):
        tiny_config(**overrides)


def test_valid_edge_values_are_accepted():
    config = tiny_config(
        mask_ratio=0.02,  # 2 of 96 patches masked
        hint_ratio=0.5,
        informed_masking_start=1.0,
        informed_masking_start_step=0,
        mask_feature_layer=2,
        image_size=[32, 48],
        graph_threshold=-1.0,
    )
    assert config.image_height_width == (32, 48)
    assert config.grid_size == (8, 12)
    assert config.feature_layer == 2


def test_masking_defaults_follow_method_md():
    config = SGMAEConfig()
    assert config.mask_ratio == 0.75
    assert config.mask_strategy == "self_guided"
    assert config.informed_masking_start == 0.25  # epoch 100 of 400 in the authors' code
    assert config.informed_masking_start_step is None
    assert config.informed_masking_auto_start is False
    assert config.mask_feature_layer is None
    assert config.feature_layer == config.num_hidden_layers  # last block by default
    # issue 32 (benchmarks/results/mask_quality_imagenette196.md): centred features, the binary graph at the image's
    # 0.8 quantile, the part away from the border
    assert config.feature_centring == "position_mean" and config.mask_feature_source == "hidden"
    assert config.graph_edges == "similarity" and config.graph_quantile == 0.8
    assert config.graph_eps == 1e-5
    assert config.graph_threshold == 0.2
    assert config.foreground_rule == "inner" and config.partition_split == "mean"
    assert config.graph_knn == 10
    assert config.hint_ratio == 0.06
    assert config.hint_sampling == "similarity"
    assert config.fiedler_solver == "lanczos"
    assert config.fiedler_lanczos_steps == 32 and config.fiedler_lanczos_tolerance == 1e-3
    assert config.informed_mask_source == "cached"  # the authors' design: whole-image rankings, cropped per view
    assert config.classifier_pooling == "mean"
    # "about 9 of 147 at 224 px / patch 16"
    num_masked = num_masked_patches(config.grid_size[0] * config.grid_size[1], config.mask_ratio)
    assert num_masked == 147
    assert round(config.hint_ratio * num_masked) == 9


def test_architecture_defaults_match_vit_mae():
    ours, theirs = SGMAEConfig(), ViTMAEConfig()
    for field in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "initializer_range",
        "layer_norm_eps",
        "image_size",
        "patch_size",
        "num_channels",
        "qkv_bias",
        "decoder_num_attention_heads",
        "decoder_hidden_size",
        "decoder_num_hidden_layers",
        "decoder_intermediate_size",
        "mask_ratio",
        "norm_pix_loss",
    ):
        assert getattr(ours, field) == getattr(theirs, field), field


def test_vit_mae_config_dict_loads_unchanged():
    vit_mae = ViTMAEConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=48, patch_size=8, layer_norm_eps=1e-6
    )
    config_dict = {key: value for key, value in vit_mae.to_dict().items() if key != "model_type"}
    config = SGMAEConfig.from_dict(config_dict)
    assert (config.hidden_size, config.num_hidden_layers, config.image_size, config.patch_size) == (64, 3, 48, 8)
    assert config.layer_norm_eps == 1e-6
    assert config.grid_size == (6, 6)


def test_save_load_round_trip(tmp_path):
    config = tiny_config(
        mask_ratio=0.6,
        mask_strategy="self_guided",
        informed_masking_start=0.3,
        informed_masking_start_step=17,
        informed_masking_auto_start=True,
        mask_feature_layer=1,
        graph_edges="binary_mean",
        graph_threshold=0.4,
        graph_eps=1e-4,
        foreground_rule="smaller",
        hint_ratio=0.1,
        hint_sampling="uniform",
        fiedler_solver="eigh",
        fiedler_power_steps=9,
        fiedler_lanczos_steps=20,
        informed_mask_source="step",
        classifier_pooling="cls",
        drop_path_rate=0.1,
        image_size=[32, 48],
        num_labels=3,
        id2label={0: "a", 1: "b", 2: "c"},
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "sgmae"
    assert saved["graph_edges"] == "binary_mean"
    loaded = SGMAEConfig.from_pretrained(tmp_path)
    via_auto = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(via_auto, SGMAEConfig)
    volatile = ("transformers_version", "_name_or_path")
    expected = {key: value for key, value in config.to_dict().items() if key not in volatile}
    for restored in (loaded, via_auto):
        assert {key: value for key, value in restored.to_dict().items() if key not in volatile} == expected
    assert loaded.image_height_width == (32, 48)
    assert loaded.id2label == {0: "a", 1: "b", 2: "c"}


def test_auto_map_is_prefilled_for_every_auto_class():
    config = SGMAEConfig()
    assert set(config.auto_map) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForPreTraining",
        "AutoModelForImageClassification",
        "AutoBackbone",
    }
    expected_classes = {
        "AutoConfig": modeling_sgmae.SGMAEConfig,
        "AutoModel": modeling_sgmae.SGMAEModel,
        "AutoModelForPreTraining": modeling_sgmae.SGMAEForPreTraining,
        "AutoModelForImageClassification": modeling_sgmae.SGMAEForImageClassification,
        "AutoBackbone": modeling_sgmae.SGMAEBackbone,
    }
    for auto_class, reference in config.auto_map.items():
        module_name, class_name = reference.rsplit(".", 1)
        module = importlib.import_module(f"modeling_sgmae.{module_name}")  # flat module names, as in a checkpoint
        assert getattr(module, class_name) is expected_classes[auto_class]
    # Each config gets its own copy, and an explicit auto_map (e.g. a Hub repo reference) is kept.
    config.auto_map["AutoModel"] = "changed"
    assert SGMAEConfig().auto_map["AutoModel"] == "modeling_sgmae.SGMAEModel"
    custom = {"AutoConfig": "user/repo--configuration_sgmae.SGMAEConfig"}
    assert SGMAEConfig(auto_map=custom).auto_map == custom


def test_every_assignment_is_checked_and_the_rules_between_fields_before_a_model_is_built(tmp_path):
    config = tiny_config()
    with pytest.raises(INVALID_CONFIG, match=names("mask_ratio")):
        config.mask_ratio = 1.5  # a field's own range: refused at assignment, the value kept
    assert config.mask_ratio == 0.75
    config.num_attention_heads = 3  # 32 is not divisible by 3: a rule between fields, checked by validate()
    with pytest.raises(INVALID_CONFIG, match=names("hidden_size")):
        config.validate()
    with pytest.raises(INVALID_CONFIG, match=names("hidden_size")):
        SGMAEModel(config)  # before any weight is built
    with pytest.raises(INVALID_CONFIG, match=names("hidden_size")):
        config.save_pretrained(tmp_path)  # transformers validates at save time
    config.num_attention_heads = 2
    config.informed_masking_start_step = 7
    config.validate()
    assert config.informed_masking_start_step == 7


def test_update_is_validated_as_a_whole():
    config = tiny_config()
    config.update({"image_size": 48, "patch_size": 6})  # 6 alone would not divide 32, 48 alone is fine
    config.validate()
    assert config.grid_size == (8, 8)
    config.update({"image_size": 50, "mask_ratio": 0.5})
    with pytest.raises(INVALID_CONFIG, match=names("image_size")):
        config.validate()


def test_loading_with_overrides_validates(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(INVALID_CONFIG, match=names("mask_ratio")):
        SGMAEConfig.from_pretrained(tmp_path, mask_ratio=1.5)
    from modeling_sgmae import SGMAEForPreTraining

    SGMAEForPreTraining(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(INVALID_CONFIG, match=names("mask_ratio")):
        SGMAEForPreTraining.from_pretrained(tmp_path, mask_ratio=0.0)
