"""A small segmentation set anyone can make offline, to try `run_segmentation.py` without ADE20K: textured shapes on
a noisy background with their exact class maps, in the folder layout `--train_dir` / `--validation_dir` read.

    python -m sgmae_training.data.shapes outputs/shapes

writes `train/` and `validation/` (each `images/*.png`, `annotations/*.png` and a `metadata.jsonl` pairing them) and
`id2label.json` (background, square, disk, triangle). Colour and texture tell the classes apart, so a short
fine-tuning of a small encoder already scores well above chance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ("background", "square", "disk", "triangle")
HEIGHTS, WIDTHS = (32, 40), (40, 48)  # a few sizes, so evaluation meets images of other shapes than the crop


def shape_masks(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Class ids [H, W]: background 0 and one to three shapes (square 1, disk 2, triangle 3) at random places."""
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
    """RGB pixels [H, W, 3] whose colour and texture tell the classes apart: grey noise, red stripes, green noise,
    blue checks."""
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


def random_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One image [H, W, 3] and its class map [H, W], of one of the set's sizes."""
    mask = shape_masks(rng, int(rng.choice(HEIGHTS)), int(rng.choice(WIDTHS)))
    return textured_image(rng, mask), mask


def write_shapes(root: str | Path, train_size: int = 64, validation_size: int = 16, seed: int = 0) -> Path:
    """Write the set under `root` (the same files for the same seed; existing ones are overwritten)."""
    root, rng = Path(root), np.random.default_rng(seed)
    for split, size in (("train", train_size), ("validation", validation_size)):
        folder = root / split
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "annotations").mkdir(exist_ok=True)
        rows = []
        for index in range(size):
            image, mask = random_pair(rng)
            row = {"file_name": f"images/{index:04d}.png", "annotation_file_name": f"annotations/{index:04d}.png"}
            Image.fromarray(image).save(folder / row["file_name"])
            Image.fromarray(mask).save(folder / row["annotation_file_name"])
            rows.append(json.dumps(row))
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    (root / "id2label.json").write_text(json.dumps(list(CLASS_NAMES)))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sgmae_training.data.shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="Folder to write (train/, validation/, id2label.json).")
    parser.add_argument("--train_size", type=int, default=64, help="Training images (64).")
    parser.add_argument("--validation_size", type=int, default=16, help="Validation images (16).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the shapes, places and noise (0).")
    args = parser.parse_args()
    if args.train_size < 1 or args.validation_size < 1:
        parser.error("--train_size and --validation_size must be positive")
    root = write_shapes(args.output_dir, args.train_size, args.validation_size, args.seed)
    print(f"wrote {args.train_size} training and {args.validation_size} validation images with their maps to {root}")


if __name__ == "__main__":
    main()
