"""Script arguments: config overrides parsed robustly, numeric arguments checked before anything runs, unknown
arguments named in one line with the closest real ones."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import datasets
import huggingface_hub.constants as hub_constants
import pytest
from conftest import REPO_ROOT
from transformers import HfArgumentParser

from sgmae_training import engine
from sgmae_training.arguments import (
    DISTRIBUTED_TIMEOUT_S,
    RunArguments,
    check_checkpointing_steps,
    check_positive,
    dataset_reachable,
    hub_unreachable,
    parse_config_overrides,
    parse_script_args,
)
from sgmae_training.data.loading import DataArguments, load_split


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


@dataclass
class _Arguments:
    max_train_steps: int | None = field(default=None, metadata={"help": "steps"})
    num_train_epochs: float = field(default=3.0, metadata={"help": "epochs"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "batch"})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max_steps", "2"], "unknown argument(s): --max_steps (closest: --max_train_steps);"),
        (["--num_epochs=2"], "unknown argument(s): --num_epochs (closest: --num_train_epochs);"),
        (["--batch_size", "4", "--foo"], "--batch_size (closest: --per_device_train_batch_size); --foo;"),
        (["--max_train_steps", "2", "3"], "unexpected argument(s): 3"),
    ],
)
def test_an_unknown_argument_is_one_line_naming_the_closest_real_ones(argv, message):
    """Not HfArgumentParser's ValueError traceback: one line with the flag and what was probably meant."""
    with pytest.raises(SystemExit) as stopped:
        parse_script_args(HfArgumentParser(_Arguments), argv)
    assert str(stopped.value).startswith("error: ") and message in str(stopped.value)
    assert "\n" not in str(stopped.value)


def test_an_argument_file_is_checked_like_the_command_line(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.json"
    good.write_text("max_train_steps: 5\nnum_train_epochs: 2\n")
    bad.write_text(json.dumps({"max_steps": 5}))
    (args,) = parse_script_args(HfArgumentParser(_Arguments), [str(good)])
    assert args.max_train_steps == 5 and args.num_train_epochs == 2
    with pytest.raises(SystemExit, match=re.escape(f"in {bad}: --max_steps (closest: --max_train_steps)")):
        parse_script_args(HfArgumentParser(_Arguments), [str(bad)])


def test_the_timeout_default_lives_with_the_arguments_not_the_engine():
    """arguments.py is read by every script before anything heavy; it must not pull in the training engine."""
    code = "import sys, sgmae_training.arguments; print('sgmae_training.engine' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert result.stdout.strip() == "False"
    assert RunArguments().ddp_timeout == DISTRIBUTED_TIMEOUT_S == engine.DISTRIBUTED_TIMEOUT_S


def test_an_unreachable_hub_dataset_is_one_line_naming_a_local_copy(monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as stopped, dataset_reachable("uoft-cs/cifar10"):
        raise ConnectionError("Couldn't reach 'uoft-cs/cifar10' on the Hub (OfflineModeIsEnabled)")
    message = str(stopped.value)
    assert message.startswith(
        "error: dataset 'uoft-cs/cifar10' is not a local folder and could not be fetched from the Hub"
    )
    assert "(offline mode is set (HF_HUB_OFFLINE=1))" in message and "\n" not in message
    assert "hf download uoft-cs/cifar10 --repo-type dataset --local-dir DIR" in message


def test_without_network_a_hub_dataset_is_found_unreachable_at_once(monkeypatch, tmp_path):
    """No offline variables and no network: one request (to a closed local port here: no test reaches the network)
    tells, and the process goes offline so that `datasets` answers from its cache at once, not after its retries."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    started = time.monotonic()
    with pytest.raises(SystemExit) as stopped, dataset_reachable("uoft-cs/cifar10"):
        load_split(DataArguments(dataset_name="uoft-cs/cifar10", cache_dir=str(tmp_path)), "train", False)
    assert time.monotonic() - started < 5
    message = str(stopped.value)
    assert "could not be fetched from the Hub (http://127.0.0.1:9 cannot be reached:" in message
    assert "or set HF_HUB_OFFLINE=1" in message and "\n" not in message
    assert datasets.config.HF_HUB_OFFLINE and not hub_unreachable(str(tmp_path))  # a local folder asks nothing
