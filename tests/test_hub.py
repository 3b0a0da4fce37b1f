"""sgmae_training/hub.py: the wording that the training log and the model card share, and what a path given as a
checkpoint turns out to be (one line when it is none, or a Hub id the Hub cannot give)."""

from __future__ import annotations

import json
import time

import datasets
import huggingface_hub.constants as hub_constants
import pytest
from conftest import tiny_config

from modeling_sgmae import SGMAEConfig, SGMAEForPreTraining
from modeling_sgmae.hub_access import is_hub_id
from sgmae_training.hub import check_checkpoint_kind, masking_schedule


@pytest.mark.parametrize(
    ("strategy", "start", "finished", "words"),
    [
        ("random", None, False, "random"),
        ("random", None, True, "random"),
        ("self_guided", 6, False, "self-guided, informed from step 6"),
        ("self_guided", 6, True, "self-guided, informed from step 6"),
        ("self_guided", None, True, "self-guided, never started (masks stayed random)"),
        ("self_guided", None, False, "self-guided, informed once the decoder's mask-token share overtakes"),
    ],
)
def test_the_masking_schedule_is_worded_once_for_the_log_and_the_card(strategy, start, finished, words):
    assert masking_schedule(tiny_config(mask_strategy=strategy), start, finished).startswith(words)


# ----- which checkpoint a path is ------------------------------------------------------------------------------------
def test_a_folder_without_config_json_says_so_and_what_it_is(tmp_path):
    evaluation = tmp_path / "eval-knn"
    evaluation.mkdir()
    (evaluation / "eval_results.json").write_text(json.dumps({"eval_top1": 0.2}))
    message = checkpoint_error(str(evaluation))
    assert message.startswith(f"error: {str(evaluation)!r} has no config.json, so it is not a model folder")
    assert "an evaluation's output folder" in message and "None" not in message and "\n" not in message

    run = tmp_path / "run"
    for step in (8, 16):
        SGMAEConfig(**tiny_config().to_dict()).save_pretrained(run / f"checkpoint-{step}")
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert f"its newest checkpoint is {run / 'checkpoint-16'}" in checkpoint_error(str(run))
    (tmp_path / "empty").mkdir()
    assert checkpoint_error(str(tmp_path / "empty")).endswith(
        "--model_name_or_path needs an SG-MAE (pre-training or classification) or a transformers ViTMAE checkpoint"
    )
    assert ": it is empty;" in checkpoint_error(str(tmp_path / "empty"))

    (tmp_path / "typeless").mkdir()
    (tmp_path / "typeless" / "config.json").write_text("{}")
    assert "has a config.json without a model_type" in checkpoint_error(str(tmp_path / "typeless"))
    assert check_checkpoint_kind(str(run / "checkpoint-16")) == "sgmae"


def test_a_hub_id_the_hub_cannot_give_is_one_line_in_a_moment(monkeypatch, tmp_path):
    """Without the offline variables and without network, the Hub is found unreachable by one request (here to a
    closed local port: no test reaches the network), not after huggingface_hub's half-minute of retries."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.monotonic()
    message = checkpoint_error("facebook/vit-mae-base", cache_dir=str(tmp_path))  # nothing cached there
    assert time.monotonic() - started < 5
    assert message.startswith(
        "error: 'facebook/vit-mae-base' is not a local folder and could not be fetched from the Hub"
    )
    assert "http://127.0.0.1:9 cannot be reached" in message and "\n" not in message
    assert "hf download facebook/vit-mae-base --local-dir DIR" in message and "HF_HUB_OFFLINE=1" in message
    assert hub_constants.HF_HUB_OFFLINE  # the rest of the run reads caches at once


def test_the_library_loads_a_hub_id_without_network_in_a_moment_or_says_what_to_do(monkeypatch, tmp_path):
    """`SGMAEForPreTraining.from_pretrained(hub_id)` without the offline variables and without network: one quick
    request, then the local cache (here empty) at once, and an OSError of one line instead of half a minute of
    retries and transformers' long error."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.monotonic()
    with pytest.raises(OSError) as raised:
        SGMAEForPreTraining.from_pretrained("facebook/vit-mae-base", cache_dir=str(tmp_path))
    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert message.startswith("'facebook/vit-mae-base' is not a local folder and could not be fetched from the Hub")
    assert "http://127.0.0.1:9 cannot be reached" in message and "\n" not in message
    assert raised.value.__suppress_context__  # the one line, not transformers' error chained after it


def test_offline_a_hub_id_is_one_line_without_the_advice_to_go_offline(monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    message = checkpoint_error("facebook/vit-mae-base")
    assert "could not be fetched from the Hub (offline mode is set (HF_HUB_OFFLINE=1))" in message
    assert "set HF_HUB_OFFLINE=1" not in message and "\n" not in message


def test_a_path_that_does_not_exist_is_not_taken_for_a_hub_id(tmp_path):
    for path in (str(tmp_path / "missing"), "./missing-model", "../a/b/c"):
        assert not is_hub_id(path)
        assert (
            checkpoint_error(path) == f"error: cannot read a model configuration from {path!r}: no such file or folder"
        )
    assert is_hub_id("facebook/vit-mae-base") and is_hub_id("gpt2") and not is_hub_id("a/b/c")


def checkpoint_error(path: str, cache_dir: str | None = None) -> str:
    with pytest.raises(SystemExit) as stopped:
        check_checkpoint_kind(path, cache_dir)
    return str(stopped.value)
