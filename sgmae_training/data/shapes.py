"""Small datasets anyone can make offline, to try `run_segmentation.py` without ADE20K and `run_detection.py` without
COCO: textured squares, disks and triangles on a noisy background, with exact class maps, boxes and instance masks
(each shape's polygon follows its pixels' edges).

    python -m sgmae_training.data.shapes outputs/shapes
    python -m sgmae_training.data.shapes outputs/detection_shapes --task detection

`--task segmentation` (the default) writes `train/` and `validation/` (each `images/*.png`, `annotations/*.png` and a
`metadata.jsonl` pairing them, the `--train_dir` layout) and `id2label.json`: one to three shapes per image of 32 to 48
pixels a side. `--task detection` writes `data/{train,validation}-00000-of-00001.parquet` in the Hub's COCO layout
(`image`, `image_id`, `objects` = bbox, category, segmentation polygons): one large square or disk per 64 x 64 image.
Colour and texture tell the classes apart, so a short fine-tuning of a small encoder already scores well above chance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

CLASS_NAMES = ("background", "square", "disk", "triangle")
DETECTION_CATEGORIES = CLASS_NAMES[1:3]  # category k is class k + 1
HEIGHTS, WIDTHS = (32, 40), (40, 48)  # a few sizes, so evaluation meets images of other shapes than the crop
DETECTION_SIZE = 64


# ----- the drawing core ----------------------------------------------------------------------------------------------
def shape_mask(label: int, side: int, left: int, top: int, height: int, width: int) -> np.ndarray:
    """The pixels [H, W] of a square (1), disk (2) or apex-up triangle (3) filling the side x side square whose
    top-left pixel is (left, top)."""
    rows, columns = np.mgrid[:height, :width]
    inside = (rows >= top) & (rows < top + side) & (columns >= left) & (columns < left + side)
    if label == 2:
        inside &= (rows - top - side / 2) ** 2 + (columns - left - side / 2) ** 2 <= (side / 2) ** 2
    elif label == 3:
        inside &= (rows - top) >= np.abs(columns - left - side / 2) * 2
    return inside


def outline_polygon(mask: np.ndarray) -> list[float]:
    """COCO polygon [x0, y0, x1, y1, ...] along the pixel edges of a shape with one run of pixels per row (every
    shape here): down its right side, up its left, so that COCO's rasterisation gives back exactly its pixels."""
    right, left = [], []
    for row in np.flatnonzero(mask.any(1)):
        columns = np.flatnonzero(mask[row])
        start, stop = int(columns[0]), int(columns[-1]) + 1
        right += [(stop, row), (stop, row + 1)]
        left += [(start, row + 1), (start, row)][::-1]
    return [float(value) for point in right + left[::-1] for value in point]


def polygon_mask(polygon: list[float], height: int, width: int) -> np.ndarray:
    """The polygon's pixels [H, W] as COCO rasterises them."""
    return coco_mask.decode(coco_mask.frPyObjects([polygon], height, width))[..., 0].astype(bool)


def class_map(masks: list[tuple[int, np.ndarray]], height: int, width: int) -> np.ndarray:
    """Class ids [H, W]: background 0, each (label, pixels) drawn over the ones before it."""
    labels = np.zeros((height, width), dtype=np.uint8)
    for label, mask in masks:
        labels[mask] = label
    return labels


def textured_image(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """RGB pixels [H, W, 3] for class ids [H, W], whose colour and texture tell the classes apart: grey noise,
    red stripes, green noise, blue checks."""
    height, width = labels.shape
    rows, columns = np.mgrid[:height, :width]
    noise = rng.integers(0, 40, (height, width, 3))
    pixels = 90 + noise
    stripes = ((rows // 2) % 2)[..., None] * 60
    checks = (((rows // 3) + (columns // 3)) % 2)[..., None] * 60
    colours = {1: (150, 30, 30), 2: (30, 150, 30), 3: (30, 30, 150)}
    textures = {1: stripes, 2: noise, 3: checks}
    for label, colour in colours.items():
        pixels = np.where((labels == label)[..., None], np.array(colour) + textures[label], pixels)
    return pixels.clip(0, 255).astype(np.uint8)


# ----- segmentation: class maps in the --train_dir folder layout -----------------------------------------------------
def random_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One image [H, W, 3] of one of the set's sizes with one to three shapes at random places, and its class map
    [H, W]."""
    height, width = int(rng.choice(HEIGHTS)), int(rng.choice(WIDTHS))
    masks = []
    for label in rng.permutation([1, 2, 3])[: rng.integers(1, 4)]:
        side = int(rng.integers(10, 18))
        top, left = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
        masks.append((int(label), shape_mask(int(label), side, left, top, height, width)))
    labels = class_map(masks, height, width)
    return textured_image(rng, labels), labels


def write_shapes(root: str | Path, train_size: int = 64, validation_size: int = 16, seed: int = 0) -> Path:
    """Write the segmentation set under `root` (the same files for the same seed; existing ones are overwritten)."""
    root, rng = Path(root), np.random.default_rng(seed)
    for split, size in (("train", train_size), ("validation", validation_size)):
        folder = root / split
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "annotations").mkdir(exist_ok=True)
        rows = []
        for index in range(size):
            image, labels = random_pair(rng)
            row = {"file_name": f"images/{index:04d}.png", "annotation_file_name": f"annotations/{index:04d}.png"}
            Image.fromarray(image).save(folder / row["file_name"])
            Image.fromarray(labels).save(folder / row["annotation_file_name"])
            rows.append(json.dumps(row))
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    (root / "id2label.json").write_text(json.dumps(list(CLASS_NAMES)))
    return root


# ----- detection: boxes and polygons in the Hub's COCO parquet layout ------------------------------------------------
def polygon_box(polygon: list[float]) -> list[float]:
    """COCO's [x, y, width, height] of a polygon."""
    xs, ys = polygon[0::2], polygon[1::2]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def detection_features() -> datasets.Features:
    objects = {"bbox": datasets.List(datasets.Value("float32"), length=4),
               "category": datasets.ClassLabel(names=list(DETECTION_CATEGORIES)),
               "segmentation": datasets.List(datasets.List(datasets.Value("float32")))}  # fmt: skip
    return datasets.Features({"image": datasets.Image(), "image_id": datasets.Value("int64"),
                              "objects": datasets.List(objects)})  # fmt: skip


def detection_split(rng: np.random.Generator, count: int, size: int) -> datasets.Dataset:
    """`count` size x size images, each one large square or disk (3/8 to 9/16 of the side) at a random place."""
    rows: dict[str, list] = {"image": [], "image_id": [], "objects": []}
    for image_id in range(count):
        category = int(rng.integers(0, len(DETECTION_CATEGORIES)))
        side = int(rng.integers(size * 3 // 8, size * 9 // 16))
        left, top = int(rng.integers(0, size - side)), int(rng.integers(0, size - side))
        mask = shape_mask(category + 1, side, left, top, size, size)
        polygon = outline_polygon(mask)
        pixels = textured_image(rng, class_map([(category + 1, mask)], size, size))
        rows["image"].append(Image.fromarray(pixels))
        rows["image_id"].append(image_id)
        rows["objects"].append([{"bbox": polygon_box(polygon), "category": category, "segmentation": [polygon]}])
    return datasets.Dataset.from_dict(rows, features=detection_features())


def write_detection_shapes(
    root: str | Path, train_size: int = 64, validation_size: int | None = 16, seed: int = 0, size: int = DETECTION_SIZE
) -> Path:
    """Write `root/data/{train,validation}-00000-of-00001.parquet`; with `validation_size=None` the validation split
    is the training images themselves (a check that the model fits them)."""
    root, rng = Path(root), np.random.default_rng(seed)
    (root / "data").mkdir(parents=True, exist_ok=True)
    train = detection_split(rng, train_size, size)
    validation = train if validation_size is None else detection_split(rng, validation_size, size)
    for split, data in (("train", train), ("validation", validation)):
        data.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


WRITERS = {"segmentation": write_shapes, "detection": write_detection_shapes}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sgmae_training.data.shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="Folder to write.")
    parser.add_argument(
        "--task",
        choices=sorted(WRITERS),
        default="segmentation",
        help="segmentation: class maps for run_segmentation.py's --train_dir (the default); detection: COCO-layout "
        "parquet for run_detection.py's --dataset_name.",
    )
    parser.add_argument("--train_size", type=int, default=64, help="Training images (64).")
    parser.add_argument("--validation_size", type=int, default=16, help="Validation images, other shapes (16).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the shapes, places and noise (0).")
    args = parser.parse_args()
    if args.train_size < 1 or args.validation_size < 1:
        parser.error("--train_size and --validation_size must be positive")
    root = WRITERS[args.task](args.output_dir, args.train_size, args.validation_size, args.seed)
    print(f"wrote {args.train_size} training and {args.validation_size} validation images for {args.task} to {root}")


if __name__ == "__main__":
    main()
