"""sgmae_training/hub.py: the wording that the training log and the model card share, and the one-line error for a
Hub dataset that cannot be reached."""

from __future__ import annotations

import pytest
from conftest import tiny_config

from sgmae_training.hub import dataset_reachable, masking_schedule


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


def test_an_unreachable_hub_dataset_is_one_line_naming_a_local_copy():
    with pytest.raises(SystemExit) as stopped, dataset_reachable("uoft-cs/cifar10"):
        raise ConnectionError("Couldn't reach 'uoft-cs/cifar10' on the Hub (OfflineModeIsEnabled)")
    message = str(stopped.value)
    assert message.startswith("error: cannot reach dataset 'uoft-cs/cifar10': Couldn't reach") and "\n" not in message
    assert "give --dataset_name a local copy" in message and "hf download uoft-cs/cifar10" in message
