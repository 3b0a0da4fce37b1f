"""Detection data: rows with an image and its objects (box, category, instance mask as polygons or RLE, crowd flag),
read from the Hub's COCO layout or from an image folder with a COCO JSON file; checked before training (one line
naming the row of a bad annotation); decoded, augmented with image, boxes and masks together (torchvision's
transforms v2) and batched in the label format of transformers' DETR family.

Layout of a row: `image`, `objects` = {"bbox": [[x, y, w, h], ...] (COCO: top-left corner and size in pixels),
"category": [...], "segmentation": [...] (per object: polygons [[x1, y1, x2, y2, ...], ...] or an RLE {"size":
[h, w], "counts": ...}), "iscrowd": [...] (optional)}, as a dict of lists or a list of dicts.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as coco_mask
from torchvision import tv_tensors
from torchvision.transforms import v2

from .loading import INDEX_COLUMN, DataArguments

OBJECTS_COLUMNS = ("objects", "annotations")
BOX_TOLERANCE = 1.0  # pixels a box may stick out of its image (COCO's own boxes do, by rounding)


@dataclass
class DetectionDataArguments(DataArguments):
    """DataArguments plus the objects column, COCO JSON files for image folders, and the detection crops."""

    objects_column: str | None = field(
        default=None, metadata={"help": f"Objects column; auto-detected among {OBJECTS_COLUMNS} when unset."}
    )
    train_annotations: str | None = field(
        default=None, metadata={"help": "COCO JSON file of --train_dir's images (instances_train2017.json)."}
    )
    validation_annotations: str | None = field(
        default=None, metadata={"help": "COCO JSON file of --validation_dir's images (instances_val2017.json)."}
    )
    image_size: int = field(default=1024, metadata={"help": "Side of the square the model sees (ViTDet: 1024)."})
    crop_scale_min: float = field(
        default=0.1, metadata={"help": "Training crops cover this share of the image or more (1: no crop)."}
    )
    horizontal_flip: bool = field(default=True, metadata={"help": "Flip training images left-right at random."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Images per device when evaluating."})


class BadAnnotationError(ValueError):
    """An annotation that cannot be used; its message names the split, row and object."""


# ----- rows ----------------------------------------------------------------------------------------------------------
def object_list(objects: dict | list) -> list[dict[str, Any]]:
    """A row's objects as a list of dicts, whichever way the dataset stores them (dict of lists, list of dicts)."""
    if isinstance(objects, dict):
        count = len(objects.get("bbox") or [])
        return [
            {key: values[index] for key, values in objects.items() if values is not None} for index in range(count)
        ]
    return list(objects or [])


def open_image(cell: dict | Image.Image) -> Image.Image:
    """An image cell (decoded, or undecoded bytes / path) as a PIL image, read lazily."""
    if isinstance(cell, Image.Image):
        return cell
    return Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"])


def image_size_of(cell: dict | Image.Image) -> tuple[int, int]:
    """(height, width) of an image cell, from its header only."""
    image = open_image(cell)
    return image.height, image.width


def segmentation_value(segmentation: Any) -> Any:
    """Polygons (a list of flat lists) or an RLE dict; a JSON string (how COCO JSON rows are stored) is read."""
    return json.loads(segmentation) if isinstance(segmentation, str) else segmentation


def check_object(obj: dict[str, Any], height: int, width: int, num_categories: int) -> None:
    """Raise BadAnnotationError for a box outside the image, an unknown category or a broken polygon / RLE."""
    box = obj.get("bbox")
    if box is None or len(box) != 4 or not all(math.isfinite(value) for value in box):
        raise BadAnnotationError(f"box {box!r} is not four finite numbers [x, y, width, height]")
    x, y, w, h = box
    if (
        w < 0
        or h < 0
        or x < -BOX_TOLERANCE
        or y < -BOX_TOLERANCE
        or x + w > width + BOX_TOLERANCE
        or (y + h > height + BOX_TOLERANCE)
    ):
        raise BadAnnotationError(f"box [x, y, w, h] = {list(box)} lies outside the {width}x{height} image")
    category = obj.get("category")
    if not isinstance(category, int) or not 0 <= category < num_categories:
        raise BadAnnotationError(f"category {category!r} is not one of the {num_categories} categories (0-based ids)")
    segmentation = segmentation_value(obj.get("segmentation"))
    if isinstance(segmentation, dict):
        if list(segmentation.get("size", [])) != [height, width] or "counts" not in segmentation:
            raise BadAnnotationError(
                f"RLE of size {segmentation.get('size')!r} does not fit the {height}x{width} image"
            )
    elif not segmentation or any(
        not isinstance(polygon, list | tuple) or len(polygon) < 6 or len(polygon) % 2 for polygon in segmentation
    ):
        raise BadAnnotationError("the segmentation is not polygons (lists of at least 3 x, y pairs) or an RLE")


def check_annotations(
    dataset: datasets.Dataset, split: str, image_column: str, objects_column: str, num_categories: int
) -> None:
    """Check every object of a map-style split before training; SystemExit with one line naming the first bad one.
    Image sizes come from `width`/`height` columns where the split has them, otherwise from each image's header."""
    sized = {"width", "height"} <= set(dataset.column_names)
    columns = [objects_column, *(["height", "width"] if sized else [image_column])]
    for row, record in enumerate(dataset.select_columns(columns)):
        try:
            height, width = (record["height"], record["width"]) if sized else image_size_of(record[image_column])
        except (OSError, UnidentifiedImageError):
            continue  # a corrupt image is skipped (and counted) when it is decoded
        for index, obj in enumerate(object_list(record[objects_column])):
            try:
                check_object(obj, height, width, num_categories)
            except BadAnnotationError as error:
                raise SystemExit(f"error: {split} split, row {row}, object {index}: {error}") from None


# ----- COCO JSON folders ---------------------------------------------------------------------------------------------
def coco_folder_split(image_dir: str, annotation_file: str) -> tuple[datasets.Dataset, list[str]]:
    """An image folder with a COCO JSON file as a split in the Hub's COCO layout (category ids made 0-based in the
    order of the file's `categories`), and the category names."""
    try:
        coco = json.loads(Path(annotation_file).read_text())
        categories = {category["id"]: index for index, category in enumerate(coco["categories"])}
        names = [category["name"] for category in coco["categories"]]
        objects: dict[int, list[dict]] = {image["id"]: [] for image in coco["images"]}
        for annotation in coco["annotations"]:
            objects[annotation["image_id"]].append(annotation)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"error: cannot read COCO annotations {annotation_file!r}: {error!r}") from error
    rows: dict[str, list] = {"image": [], "image_id": [], "width": [], "height": [], "objects": []}
    for row, image in enumerate(coco["images"]):
        found = objects[image["id"]]
        for index, annotation in enumerate(found):
            if annotation["category_id"] not in categories:
                raise SystemExit(
                    f"error: {annotation_file}, row {row} (image id {image['id']}), object {index}: category_id "
                    f"{annotation['category_id']} is not among the file's categories"
                )
        rows["image"].append(str(Path(image_dir) / image["file_name"]))
        rows["image_id"].append(image["id"])
        rows["width"].append(image["width"])
        rows["height"].append(image["height"])
        rows["objects"].append({
            "bbox": [annotation["bbox"] for annotation in found],
            "category": [categories[annotation["category_id"]] for annotation in found],
            "iscrowd": [int(annotation.get("iscrowd", 0)) for annotation in found],
            "segmentation": [json.dumps(annotation.get("segmentation")) for annotation in found],
        })  # fmt: skip
    dataset = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image(decode=False))
    return dataset, names


def category_names(features: datasets.Features | None, objects_column: str, dataset) -> list[str]:
    """The ClassLabel names of the objects' category, else "0".."K-1" for the largest id seen in `dataset`."""
    feature = (features or {}).get(objects_column)
    inner = feature.feature if isinstance(feature, datasets.Sequence | datasets.List) else feature
    category = inner.get("category") if isinstance(inner, dict) else None
    category = getattr(category, "feature", category)  # a list of ClassLabels inside a struct of lists
    if isinstance(category, datasets.ClassLabel):
        return list(category.names)
    ids = [obj.get("category", 0) for objects in dataset[objects_column] for obj in object_list(objects)]
    return [str(index) for index in range(max([i for i in ids if isinstance(i, int)], default=0) + 1)]


# ----- decoding and augmentation -------------------------------------------------------------------------------------
def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A bool mask [H, W] from polygons or an RLE (compressed or uncompressed counts)."""
    segmentation = segmentation_value(segmentation)
    if isinstance(segmentation, dict):
        rle = segmentation
        if isinstance(rle["counts"], list):  # uncompressed, as COCO stores crowds
            rle = coco_mask.frPyObjects(rle, height, width)
    else:
        rle = coco_mask.merge(coco_mask.frPyObjects([list(map(float, p)) for p in segmentation], height, width))
    return coco_mask.decode(rle).astype(bool)


def encode_masks(masks: torch.Tensor) -> list[dict]:
    """COCO RLEs of bool masks [N, H, W] (compact for gathering across processes)."""
    array = np.asfortranarray(masks.numpy().astype(np.uint8).transpose(1, 2, 0))
    return coco_mask.encode(array) if len(masks) else []


def decode_masks(rles: list[dict], height: int, width: int) -> torch.Tensor:
    """Bool masks [N, H, W] from `encode_masks`' RLEs."""
    if not rles:
        return torch.zeros(0, height, width, dtype=torch.bool)
    return torch.from_numpy(coco_mask.decode(rles).transpose(2, 0, 1).astype(bool))


def detection_transform(size: int, train: bool, crop_scale_min: float, horizontal_flip: bool) -> Callable:
    """Image, boxes (xyxy) and masks transformed together to size x size (the aspect ratio is not kept, so that
    the saved image processor's post-processing, which rescales by the original size, is exact). Training: a
    random flip and a random crop of `crop_scale_min` or more of the area, then boxes left empty dropped."""
    steps: list[v2.Transform] = []
    if train and horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    if train and crop_scale_min < 1:
        steps.append(v2.RandomResizedCrop(size, scale=(crop_scale_min, 1.0), antialias=True))
    else:
        steps.append(v2.Resize((size, size), antialias=True))
    if train:
        steps.append(v2.SanitizeBoundingBoxes(min_size=1))
    return v2.Compose(steps)


def decode_row(row: dict, image_column: str, objects_column: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """An RGB image [3, H, W] (uint8) and its objects: boxes xyxy in pixels, labels, bool masks [N, H, W], crowd
    flags."""
    image = open_image(row[image_column])
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    height, width = pixels.shape[1:]
    objects = object_list(row[objects_column])
    boxes = torch.tensor([obj["bbox"] for obj in objects], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    masks = [decode_segmentation(obj["segmentation"], height, width) for obj in objects]
    return pixels, {
        "boxes": boxes.clamp(min=0).minimum(torch.tensor([width, height, width, height], dtype=torch.float32)),
        "labels": torch.tensor([obj["category"] for obj in objects], dtype=torch.long),
        "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, height, width, dtype=torch.bool),
        "iscrowd": torch.tensor([int(obj.get("iscrowd") or 0) for obj in objects], dtype=torch.long),
    }


class DetectionCollator:
    """Rows -> {"pixel_values" [B, 3, S, S] normalised, "labels" (DETR's: per image "class_labels", "boxes" as
    normalised center x, center y, width, height, "masks" [N, S, S]), "skipped"}; crowd objects are left out of
    the labels (as DETR does). With `keep_targets`, also each image's row `index`, original (height, width) and
    objects at the original resolution ("targets", crowds included and flagged), for the COCO metrics."""

    def __init__(self, transform: Callable, mean: list[float], std: list[float], image_column: str,
                 objects_column: str, keep_targets: bool = False):  # fmt: skip
        self.transform, self.image_column, self.objects_column = transform, image_column, objects_column
        self.normalize = v2.Normalize(mean, std)
        self.keep_targets = keep_targets

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {"pixel_values": [], "labels": [], "skipped": 0}
        if self.keep_targets:
            batch |= {"index": [], "sizes": [], "targets": []}
        for row in rows:
            try:
                pixels, target = decode_row(row, self.image_column, self.objects_column)
            except (OSError, UnidentifiedImageError):
                batch["skipped"] += 1
                continue
            kept = target["iscrowd"] == 0
            image, objects = self.transform(
                tv_tensors.Image(pixels),
                {
                    "boxes": tv_tensors.BoundingBoxes(
                        target["boxes"][kept], format="XYXY", canvas_size=pixels.shape[1:]
                    ),
                    "masks": tv_tensors.Mask(target["masks"][kept]),
                    "labels": target["labels"][kept],
                },
            )
            batch["pixel_values"].append(self.normalize(image.float() / 255))
            batch["labels"].append(detr_labels(objects["boxes"], objects["masks"], objects["labels"], image.shape[-1]))
            if self.keep_targets:
                batch["index"].append(row[INDEX_COLUMN])
                batch["sizes"].append(tuple(pixels.shape[1:]))
                batch["targets"].append(target)
        batch["pixel_values"] = (torch.stack(batch["pixel_values"]) if batch["pixel_values"]
                                 else torch.zeros(0, 3, 1, 1))  # fmt: skip
        return batch


def detr_labels(boxes: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    """DETR's targets for one size x size image: class ids, boxes as normalised (cx, cy, w, h), float masks."""
    x0, y0, x1, y1 = boxes.as_subclass(torch.Tensor).unbind(-1)
    centred = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1) / size
    return {"class_labels": labels, "boxes": centred, "masks": masks.as_subclass(torch.Tensor).float()}


def labels_on_device(labels: list[dict[str, torch.Tensor]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    return [{key: value.to(device, non_blocking=True) for key, value in target.items()} for target in labels]
