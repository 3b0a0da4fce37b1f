"""Shared fixtures: tiny SG-MAE configs and a small image-classification dataset in the Hub's parquet layout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_sgmae import SGMAEConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


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


# Tiny matrices on two contended cores run far faster single-threaded; subprocesses get OMP_NUM_THREADS=1.
torch.set_num_threads(1)
