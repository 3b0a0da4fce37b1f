"""The tracked tree stays light enough to travel to a lent accelerator with the 112 px data beside it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from benchmarks.lent_machine import TREE_LIMIT, MiB, tracked_bytes

NEEDS_GIT = pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the tracked files")


@NEEDS_GIT
def test_the_tracked_tree_is_at_most_10_mib() -> None:
    size = tracked_bytes()
    assert size <= TREE_LIMIT, (
        f"the tracked files take {size / MiB:.1f} MiB, over {TREE_LIMIT // MiB} MiB: store figures at the size the "
        "docs show them (JPEG or a palette PNG) and only those the docs use"
    )


@NEEDS_GIT
def test_the_measure_counts_every_tracked_byte(tmp_path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.bin").write_bytes(b"x" * 3000)
    (tmp_path / "ignored.bin").write_bytes(b"x" * 5000)
    subprocess.run(["git", "add", "a.bin"], cwd=tmp_path, check=True)
    assert tracked_bytes(tmp_path) == 3000
