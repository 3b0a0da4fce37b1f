"""sgmae_training/hub.py: the wording that the training log and the model card share."""

from __future__ import annotations

import pytest
from conftest import tiny_config

from sgmae_training.hub import masking_schedule


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
