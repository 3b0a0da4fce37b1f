"""A small detection dataset to try `run_detection.py` without downloading anything: textured squares and disks with
exact boxes and polygon masks, written in the Hub's COCO layout (parquet splits with `image`, `image_id` and
`objects` = bbox, category, segmentation), the same layout the script reads from the Hub.

    python -m sgmae_training.data.detection_shapes outputs/detection_shapes --num_images 64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

CATEGORIES = ["square", "disk"]


def shape_polygon(rng: np.random.Generator, category: int, size: int) -> list[float]:
    """A big square (4 corners) or disk (16-gon) at a random place in a size x size image, as one COCO polygon."""
    side = float(rng.integers(size * 3 // 8, size * 9 // 16))
    left, top = float(rng.integers(0, size - side)), float(rng.integers(0, size - side))
    if category == 0:
        points = [(left, top), (left + side, top), (left + side, top + side), (left, top + side)]
    else:
        angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        points = [(left + side / 2 * (1 + np.cos(a)), top + side / 2 * (1 + np.sin(a))) for a in angles]
    return [round(float(value), 2) for point in points for value in point]


def polygon_mask(polygon: list[float], size: int) -> np.ndarray:
    """The polygon's pixels [size, size] as COCO rasterises them."""
    return coco_mask.decode(coco_mask.frPyObjects([polygon], size, size))[..., 0].astype(bool)


def shapes_image(
    rng: np.random.Generator, polygons: list[list[float]], categories: list[int], size: int
) -> np.ndarray:
    """RGB pixels: grey noise, red stripes inside squares, blue checks inside disks (drawn from the polygons' own
    rasterisation, so image and annotation agree exactly)."""
    rows, columns = np.mgrid[:size, :size]
    pixels = 100 + rng.integers(0, 40, (size, size, 3))
    textures = {0: ((rows // 2) % 2)[..., None] * 60 + np.array([160, 20, 20]),
                1: (((rows // 3) + (columns // 3)) % 2)[..., None] * 60 + np.array([20, 20, 160])}  # fmt: skip
    for polygon, category in zip(polygons, categories, strict=True):
        pixels = np.where(polygon_mask(polygon, size)[..., None], textures[category], pixels)
    return pixels.clip(0, 255).astype(np.uint8)


def polygon_box(polygon: list[float]) -> list[float]:
    """COCO's [x, y, width, height] of a polygon."""
    xs, ys = polygon[0::2], polygon[1::2]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def detection_features() -> datasets.Features:
    objects = {"bbox": datasets.List(datasets.Value("float32"), length=4),
               "category": datasets.ClassLabel(names=CATEGORIES),
               "segmentation": datasets.List(datasets.List(datasets.Value("float32")))}  # fmt: skip
    return datasets.Features({"image": datasets.Image(), "image_id": datasets.Value("int64"),
                              "objects": datasets.List(objects)})  # fmt: skip


def shapes_split(rng: np.random.Generator, count: int, size: int) -> datasets.Dataset:
    """`count` images, one shape each."""
    rows: dict[str, list] = {"image": [], "image_id": [], "objects": []}
    for image_id in range(count):
        category = int(rng.integers(0, len(CATEGORIES)))
        polygon = shape_polygon(rng, category, size)
        rows["image"].append(Image.fromarray(shapes_image(rng, [polygon], [category], size)))
        rows["image_id"].append(image_id)
        rows["objects"].append([{"bbox": polygon_box(polygon), "category": category, "segmentation": [polygon]}])
    return datasets.Dataset.from_dict(rows, features=detection_features())


def write_shapes_dataset(root: Path, num_images: int, size: int = 64, validation_images: int | None = None) -> Path:
    """`root/data/{train,validation}-00000-of-00001.parquet`; without `validation_images` the validation split is
    the training images themselves (a check that the model fits them)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train = shapes_split(rng, num_images, size)
    validation = train if validation_images is None else shapes_split(rng, validation_images, size)
    for split, data in (("train", train), ("validation", validation)):
        data.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--num_images", type=int, default=64, help="Training images.")
    parser.add_argument("--validation_images", type=int, default=16, help="Validation images (other shapes).")
    parser.add_argument("--size", type=int, default=64, help="Side of the square images.")
    args = parser.parse_args()
    write_shapes_dataset(args.output_dir, args.num_images, args.size, args.validation_images)
    print(f"wrote {args.num_images} training and {args.validation_images} validation images to {args.output_dir}")


if __name__ == "__main__":
    main()
