"""Shared fixtures: tiny SG-MAE configs and a small image-classification dataset in the Hub's parquet layout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassError

from modeling_sgmae import SGMAEConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# What an invalid config value raises: transformers' strict configs wrap a field check's ValueError in their own error.
INVALID_CONFIG = (ValueError, StrictDataclassError)


def gram(features: torch.Tensor) -> torch.Tensor:
    """Pairwise dot products [B, N, N] of features [B, N, D]: the cosine similarities of unit features."""
    return features @ features.transpose(1, 2)


def tiny_config(**overrides) -> SGMAEConfig:
    """A 32x32, patch-4 (64 patches) SG-MAE small enough for CPU tests."""
    fields = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=4,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
        layer_norm_eps=1e-6,
        norm_pix_loss=True,
        # The masking these tests were written for (the defaults before issue 32); the new ones have their own tests.
        graph_edges="similarity",
        foreground_rule="max_abs",
        feature_centring="none",
    )
    fields.update(overrides)
    return SGMAEConfig(**fields)


@pytest.fixture
def config() -> SGMAEConfig:
    return tiny_config()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _write_generated_dataset(root: Path, train_size: int = 96, test_size: int = 48) -> Path:
    """Coloured-square images in 10 classes, written as Hub-layout parquet shards (`plain_text/*.parquet`)."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    (root / "plain_text").mkdir(parents=True)
    for split, size in (("train", train_size), ("test", test_size)):
        images, labels = [], []
        for index in range(size):
            label = index % len(CLASS_NAMES)
            pixels = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            pixels[4 + label : 20 + label, 6:22, label % 3] = 200 + label * 5
            images.append(Image.fromarray(pixels))
            labels.append(label)
        data = datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)
        data.to_parquet(str(root / "plain_text" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="session")
def image_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIFAR-10 in the Hub layout from $SGMAE_TEST_DATA (set by .ci/run), else a tiny generated look-alike."""
    given = os.environ.get("SGMAE_TEST_DATA")
    if given:
        return Path(given)
    return _write_generated_dataset(tmp_path_factory.mktemp("generated_cifar"))


# The start of a fresh-process check: the folder to load is argv[1], and the SG-MAE package cannot be imported, so
# everything must come from the folder's own code (remote code).
FRESH_PROCESS_PRELUDE = """
import importlib.abc, json, sys
import numpy as np
from PIL import Image


class BlockPackage(importlib.abc.MetaPathFinder):  # even where the package is pip-installed, nothing may come from it
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "modeling_sgmae":
            raise ImportError("the SG-MAE package is not available in this process")


sys.meta_path.insert(0, BlockPackage())
folder = sys.argv[1]
"""

FRESH_PROCESS_CHECK = (
    FRESH_PROCESS_PRELUDE
    + """
from transformers import AutoModel, AutoModelForImageClassification, AutoModelForPreTraining, pipeline

report = {}
for auto_class in (AutoModel, AutoModelForPreTraining, AutoModelForImageClassification):
    report[auto_class.__name__] = type(auto_class.from_pretrained(folder, trust_remote_code=True)).__name__
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
extract = pipeline("image-feature-extraction", model=folder, trust_remote_code=True)
report["features"] = list(np.array(extract(image)).shape)
report["pooled"] = list(np.array(extract(image, pool=True)).shape)
classify = pipeline("image-classification", model=folder, trust_remote_code=True)
report["scores"] = classify(image, top_k=100)
print("REPORT " + json.dumps(report))
"""
)


def run_in_fresh_process(script: str, folder: Path, tmp_path: Path) -> dict:
    """Run a check (FRESH_PROCESS_PRELUDE + code that prints "REPORT <json>") on a saved folder in a new process
    that cannot import this package; returns the report."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH="")
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.split("REPORT ", 1)[1])


def check_folder_in_fresh_process(folder: Path, tmp_path: Path) -> dict:
    """Load a saved folder with trust_remote_code in a process that cannot import this package, through all three
    auto classes and both pipelines; returns what it saw (classes, feature shapes, classification scores)."""
    report = run_in_fresh_process(FRESH_PROCESS_CHECK, folder, tmp_path)
    assert report["AutoModel"] == "SGMAEModel" and report["AutoModelForPreTraining"] == "SGMAEForPreTraining"
    assert report["AutoModelForImageClassification"] == "SGMAEForImageClassification"
    assert sum(item["score"] for item in report["scores"]) == pytest.approx(1.0, abs=1e-4)
    return report


def free_port() -> int:
    """A TCP port free right now (for a launch's main process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def script_env() -> dict[str, str]:
    """The environment a script under test runs in: offline, on the CPU (real gloo ranks for several processes), one
    thread per process, this checkout's code first."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def launch_script(script: Path, args: list[str], plain_python: bool = False, num_processes: int = 1):
    """A script under `accelerate launch` (several processes: real gloo ranks, see HF_NOTES.md), or plain python;
    asserts it succeeded and returns the finished process."""
    command = [sys.executable, str(script)]
    if not plain_python:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
        command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(num_processes)]
        if num_processes > 1:
            command += ["--multi_gpu", "--main_process_port", str(free_port())]
        command.append(str(script))
    result = subprocess.run(command + args, env=script_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


# Tiny matrices on two contended cores run far faster single-threaded; subprocesses get OMP_NUM_THREADS=1.
torch.set_num_threads(1)


def main_exit_message(monkeypatch, main: Callable[[], None], *args: str) -> str:
    """A script's main() run in this process on `args`, offline; returns its SystemExit message."""
    monkeypatch.setattr(sys, "argv", ["script.py", *args])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SystemExit) as raised:
        main()
    return str(raised.value.code)
