"""Script arguments: config overrides parsed robustly, numeric arguments checked before anything runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sgmae_training.arguments import check_checkpointing_steps, check_positive, parse_config_overrides


def test_config_overrides_read_lists_booleans_none_numbers_and_strings():
    text = "image_size=[64,64], norm_pix_loss=True,mask_feature_layer=None,hint_ratio=0.1,graph_edges=binary_mean"
    assert parse_config_overrides(text) == {
        "image_size": [64, 64],
        "norm_pix_loss": True,
        "mask_feature_layer": None,
        "hint_ratio": 0.1,
        "graph_edges": "binary_mean",
    }
    assert parse_config_overrides('norm_pix_loss=false,id2label={"0": "a,b"}') == {
        "norm_pix_loss": False,
        "id2label": {"0": "a,b"},
    }
    assert parse_config_overrides(None) == {} and parse_config_overrides("  ") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hint_ratio=", "gives no value for 'hint_ratio'"),
        ("hint_ratio", "item 'hint_ratio' is not name=value"),
        ("=0.1", "item '=0.1' is not name=value"),
        ("hint_ratio=0.1,,mask_ratio=0.5", "item '' is not name=value"),
    ],
)
def test_malformed_config_overrides_name_the_item(text, message):
    with pytest.raises(SystemExit, match=message):
        parse_config_overrides(text)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3"])
def test_non_positive_integers_are_refused_by_name(value):
    with pytest.raises(SystemExit, match=rf"--logging_steps must be a positive integer, got {value!r}"):
        check_positive(SimpleNamespace(logging_steps=value), ("logging_steps",))
    check_positive(SimpleNamespace(logging_steps=None), ("logging_steps",))  # unset optional arguments pass


@pytest.mark.parametrize("value", ["foo", "0", "-3", "2.5", ""])
def test_checkpointing_steps_must_be_steps_epoch_or_none(value):
    with pytest.raises(SystemExit, match="--checkpointing_steps must be a positive integer, 'epoch' or 'none'"):
        check_checkpointing_steps(value)
    for good in ("5", "epoch", "none", None):
        check_checkpointing_steps(good)
