"""run_segmentation.py: UperNet on the SG-MAE backbone trained end to end on generated shapes, exact resume, the
shipped mean_iou metric, sliding-window inference, the saved folder in a fresh process, and bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, tiny_config

from modeling_sgmae import SGMAEForPreTraining

SCRIPT = REPO_ROOT / "run_segmentation.py"
CLASS_NAMES = ["background", "square", "disk", "triangle"]

_spec = importlib.util.spec_from_file_location("run_segmentation", SCRIPT)
rs = sys.modules["run_segmentation"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rs)


# ----- data ----------------------------------------------------------------------------------------------------------
def shape_masks(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Class ids [H, W]: background 0 and up to three shapes (square 1, disk 2, triangle 3) at random places."""
    mask = np.zeros((height, width), dtype=np.uint8)
    rows, columns = np.mgrid[:height, :width]
    for label in rng.permutation([1, 2, 3])[: rng.integers(1, 4)]:
        side = int(rng.integers(10, 18))
        top, left = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
        inside = (rows >= top) & (rows < top + side) & (columns >= left) & (columns < left + side)
        if label == 2:
            inside &= (rows - top - side / 2) ** 2 + (columns - left - side / 2) ** 2 <= (side / 2) ** 2
        elif label == 3:
            inside &= (rows - top) >= np.abs(columns - left - side / 2) * 2
        mask[inside] = label
    return mask


def textured_image(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """RGB pixels whose colour and texture tell the classes apart: grey noise, red stripes, green noise, blue checks."""
    height, width = mask.shape
    rows, columns = np.mgrid[:height, :width]
    noise = rng.integers(0, 40, (height, width, 3))
    pixels = 90 + noise
    stripes = ((rows // 2) % 2)[..., None] * 60
    checks = (((rows // 3) + (columns // 3)) % 2)[..., None] * 60
    colours = {1: (150, 30, 30), 2: (30, 150, 30), 3: (30, 30, 150)}
    textures = {1: stripes, 2: noise, 3: checks}
    for label, colour in colours.items():
        pixels = np.where((mask == label)[..., None], np.array(colour) + textures[label], pixels)
    return pixels.clip(0, 255).astype(np.uint8)


def write_shapes_dataset(root: Path, train_size: int = 48, validation_size: int = 12) -> Path:
    """Textured shapes with exact masks in the Hub's scene_parse_150 layout (`image`, `annotation` columns), stored
    as ADE20K stores them: 0 = "other" (here the shapes' outlines), class k as k + 1 (so --reduce_labels)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    (root / "data").mkdir(parents=True)
    for split, size in (("train", train_size), ("validation", validation_size)):
        images, masks = [], []
        for _ in range(size):
            height, width = int(rng.choice([32, 40])), int(rng.choice([40, 48]))
            mask = shape_masks(rng, height, width)
            stored = mask + 1
            edges = np.zeros_like(mask, dtype=bool)
            edges[:, 1:] |= mask[:, 1:] != mask[:, :-1]
            edges[1:, :] |= mask[1:, :] != mask[:-1, :]
            stored[edges] = 0
            images.append(Image.fromarray(textured_image(rng, mask)))
            masks.append(Image.fromarray(stored, mode="L"))
        split_data = datasets.Dataset.from_dict({"image": images, "annotation": masks}, features=features)
        split_data.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"))
