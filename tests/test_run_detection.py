"""run_detection.py: Conditional DETR on the SG-MAE backbone trained end to end on generated shapes with exact boxes
and masks (Hub COCO layout), COCO box and mask AP, exact resume, two processes, the saved folder in a fresh process
through both pipelines, and bad input in one line."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from conftest import REPO_ROOT, launch_script, main_exit_message, script_env, tiny_config
from pycocotools import mask as coco_mask
from safetensors.torch import load_file

from modeling_sgmae import SGMAEForPreTraining
from modeling_sgmae.detection_sgmae import SGMAEForObjectDetection
from sgmae_training.data.detection import (
    DetectionCollator,
    check_annotations,
    coco_folder_split,
    decode_segmentation,
    detection_transform,
)
from sgmae_training.data.images import MAE_IMAGE_MEAN, MAE_IMAGE_STD
from sgmae_training.data.loading import prepare_images, with_index
from sgmae_training.data.shapes import DETECTION_CATEGORIES, polygon_mask, write_detection_shapes
from sgmae_training.detection import coco_scores, encoded_target, image_detections

SCRIPT = REPO_ROOT / "run_detection.py"
_spec = importlib.util.spec_from_file_location("run_detection", SCRIPT)
rd = sys.modules["run_detection"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rd)
SIZE = 64


# ----- data ----------------------------------------------------------------------------------------------------------
def write_pretrained(path: Path) -> Path:
    torch.manual_seed(0)
    SGMAEForPreTraining(
        tiny_config(num_hidden_layers=4, hidden_size=64, image_size=SIZE, patch_size=8)
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    """Eight images, one shape each; the validation split is the training images (the test checks the fit)."""
    return write_detection_shapes(tmp_path_factory.mktemp("shapes"), 8, validation_size=None)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny 4-block SG-MAE pre-training checkpoint (random weights; the pyramid takes blocks 1-4)."""
    return write_pretrained(tmp_path_factory.mktemp("pretrained"))


# ----- helpers -------------------------------------------------------------------------------------------------------
launch = partial(launch_script, SCRIPT)


def common_args(dataset: Path, output: Path, model: Path, *extra: str) -> list[str]:
    """A fit of 4 images at 64x64: a small head (3 queries, 2 + 2 layers of width 64, no auxiliary losses), a large
    learning rate, no crops or flips, 200 steps of batch 2, scored every 25 epochs, one checkpoint mid-epoch."""
    return [
        "--dataset_name", str(dataset), "--validation_split", "validation", "--model_name_or_path", str(model),
        "--output_dir", str(output), "--image_size", str(SIZE), "--max_train_samples", "4", "--max_eval_samples", "4",
        "--num_queries", "3", "--transformer_layers", "2", "--transformer_width", "64", "--auxiliary_loss", "false",
        "--learning_rate", "2e-3", "--layer_decay", "1", "--max_grad_norm", "1", "--drop_path", "0",
        "--crop_scale_min", "1", "--horizontal_flip", "false", "--per_device_train_batch_size", "2",
        "--max_train_steps", "200", "--eval_every_epochs", "25", "--checkpointing_steps", "101",
        "--save_total_limit", "0", "--dataloader_num_workers", "0", "--logging_steps", "20", "--seed", "1", *extra,
    ]  # fmt: skip


def box_iou(first: list[float], second: list[float]) -> float:
    """IoU of two xyxy boxes."""
    width = max(0.0, min(first[2], second[2]) - max(first[0], second[0]))
    height = max(0.0, min(first[3], second[3]) - max(first[1], second[1]))
    inter = width * height
    area = (first[2] - first[0]) * (first[3] - first[1]) + (second[2] - second[0]) * (second[3] - second[1])
    return inter / (area - inter)


FRESH_PROCESS_CHECK = """
import json, sys
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageSegmentation, AutoModelForObjectDetection, pipeline

folder, image_path = sys.argv[1], sys.argv[2]
report = {"class": type(AutoModelForObjectDetection.from_pretrained(folder, trust_remote_code=True)).__name__}
image = Image.open(image_path)
detector = pipeline("object-detection", model=folder, trust_remote_code=True)
report["detections"] = detector(image, threshold=0.0)
# the instance mask of the best query, from the model's own outputs (see docs/detection.md for the pipeline)
model = AutoModelForImageSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
report["segmentation_class"] = type(model).__name__
with torch.no_grad():
    outputs = model(**AutoImageProcessor.from_pretrained(folder)(image, return_tensors="pt"))
query = outputs.logits[0].sigmoid().max(-1).values.argmax()
mask = torch.nn.functional.interpolate(outputs.pred_masks[:, query, None], size=(image.height, image.width),
                                       mode="bilinear")[0, 0] > 0
report["mask"] = mask.tolist()
print("REPORT " + json.dumps(report))
"""


def run_fresh(folder: Path, image: Path, tmp_path: Path) -> dict:
    """FRESH_PROCESS_CHECK in a process that cannot import this package (only the folder's remote code)."""
    env = dict(script_env(), PYTHONPATH="", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS_CHECK, str(folder), str(image)], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.split("REPORT ", 1)[1])


# ----- end to end ----------------------------------------------------------------------------------------------------
def test_training_fits_the_shapes_resumes_exactly_and_the_folder_detects_in_a_fresh_process(
    shapes_dir, pretrained, tmp_path
):
    straight = tmp_path / "straight"
    log = "".join(launch(common_args(shapes_dir, straight, pretrained)).stderr)
    assert "fine-tuning 200 steps (100 epochs of 2 steps), global batch 2, lr 2.00e-03" in log
    assert "detection of 2 categories (square, disk...), image column 'image', objects column 'objects'" in log
    results = json.loads((straight / "eval_results.json").read_text())
    assert results["step"] == results["total_steps"] == 200 and results["eval_samples"] == 4
    # every evaluation reports box and mask AP; fitting 4 images lifts both far above an untrained head's ~0
    assert len(re.findall(r"epoch \d+: box AP [0-9.]+, mask AP [0-9.]+", log)) == 4
    assert results["eval_box_ap"] > 0.3 and results["eval_mask_ap"] > 0.3, results
    for kind in ("box", "mask"):
        for name in ("ap50", "ap75", "ap_small"):
            assert 0 <= results[f"eval_{kind}_{name}"] <= 1
        assert results[f"eval_{kind}_ap_large"] is None  # no object above 96x96 pixels in a 64x64 image

    # the folder: weights, code, processor, card with the APs
    for name in ("model.safetensors", "detection_sgmae.py", "modeling_sgmae.py", "preprocessor_config.json"):
        assert (straight / name).is_file(), name
    config = json.loads((straight / "config.json").read_text())
    assert config["model_type"] == "sgmae_detr" and config["id2label"]["1"] == "disk"
    assert config["auto_map"]["AutoModelForObjectDetection"] == "detection_sgmae.SGMAEForObjectDetection"
    assert config["backbone_config"]["add_fpn"] and config["backbone_config"]["out_indices"] == [1, 2, 3, 4]
    card = (straight / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["pipeline_tag"] == "object-detection"
    assert metadata["model-index"][0]["results"][0]["metrics"][0]["value"] == round(results["eval_box_ap"], 4)
    assert 'pipeline("object-detection"' in card and "| boxes |" in card

    # in a fresh process, both pipelines find the first training image's shape: its class, box and mask
    rows = datasets.load_dataset(str(shapes_dir), split="validation")
    image_path = tmp_path / "shape.png"
    rows[0]["image"].save(image_path)
    truth = rows[0]["objects"][0]
    x, y, w, h = truth["bbox"]
    report = run_fresh(straight, image_path, tmp_path)
    assert report["class"] == report["segmentation_class"] == "SGMAEForObjectDetection"
    best = max(report["detections"], key=lambda item: item["score"])
    assert best["label"] == DETECTION_CATEGORIES[truth["category"]]
    box = [best["box"][key] for key in ("xmin", "ymin", "xmax", "ymax")]
    assert box_iou(box, [x, y, x + w, y + h]) > 0.5, (box, truth["bbox"])
    truth_mask = polygon_mask(truth["segmentation"][0], SIZE, SIZE)
    predicted = np.array(report["mask"])
    assert (predicted & truth_mask).sum() / (predicted | truth_mask).sum() > 0.5

    # a run stopped at step 101 (inside an epoch) and resumed (by plain python) ends with the same weights and results
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-101", resumed / "checkpoint-101")
    result = launch(common_args(shapes_dir, resumed, pretrained, "--resume_from_checkpoint", "latest"), True)
    assert "resumed from" in result.stderr
    straight_weights, resumed_weights = (
        load_file(straight / "model.safetensors"),
        load_file(resumed / "model.safetensors"),
    )
    for key, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[key], tensor, rtol=0, atol=0, msg=key)
    assert json.loads((resumed / "eval_results.json").read_text()) == results


def test_two_processes_score_as_one(shapes_dir, pretrained, tmp_path):
    """Two processes each score their shard of 3 images (2 + 1); the gathered AP equals the saved model's AP
    computed in this single process."""
    output = tmp_path / "two"
    arguments = common_args(shapes_dir, output, pretrained, "--max_train_steps", "3", "--per_device_train_batch_size",
                            "2", "--max_eval_samples", "3", "--checkpointing_steps", "none")  # fmt: skip
    launch(arguments, num_processes=2)
    results = json.loads((output / "eval_results.json").read_text())
    assert results["num_processes"] == 2 and results["eval_samples"] == 3 and results["step"] == 3

    model = SGMAEForObjectDetection.from_pretrained(output).eval()
    rows = with_index(prepare_images(datasets.load_dataset(str(shapes_dir), split="validation"), "image"))
    collate = DetectionCollator(detection_transform(SIZE, False, 1.0, False), list(MAE_IMAGE_MEAN),
                                list(MAE_IMAGE_STD), "image", "objects", keep_targets=True)  # fmt: skip
    batch = collate([rows[index] for index in range(3)])
    with torch.no_grad():
        outputs = model(pixel_values=batch["pixel_values"])
    records = [
        (index, size, image_detections(outputs, image, *size), encoded_target(target))
        for image, (index, size, target) in enumerate(
            zip(batch["index"], batch["sizes"], batch["targets"], strict=True)
        )
    ]
    single = coco_scores(records)
    assert single["eval_box_ap50"] > 0  # a comparison of something, not of two zeros
    for key, value in single.items():
        assert results[key] == pytest.approx(value, abs=1e-6), key


# ----- data and bad input --------------------------------------------------------------------------------------------
def write_coco_folder(root: Path, annotations: list[dict], categories: list[dict] | None = None) -> tuple[Path, Path]:
    """Two 64x64 images and a COCO JSON file (category ids 1 and 2, COCO's non-contiguous style)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for image_id in (1, 2):
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": SIZE, "height": SIZE})
    categories = categories or [{"id": 1, "name": "square"}, {"id": 2, "name": "disk"}]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root, path


SQUARE = [10.0, 10.0, 40.0, 10.0, 40.0, 40.0, 10.0, 40.0]


def test_coco_folder_crowds_empty_images_and_joint_flips(tmp_path):
    """Polygons and RLE decode to the same mask; a crowd (RLE) is left out of DETR's labels but kept, flagged, for the
    metric; an image without objects gives empty labels; a flip moves boxes and masks together."""
    crowd_rle = coco_mask.encode(np.asfortranarray(np.pad(np.ones((10, 20), np.uint8), ((50, 4), (30, 14)))))
    crowd = {"size": crowd_rle["size"], "counts": crowd_rle["counts"].decode()}
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [10, 10, 30, 30], "segmentation": [SQUARE], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 50, 20, 10], "segmentation": crowd, "iscrowd": 1},
    ]
    root, path = write_coco_folder(tmp_path, annotations)
    rows, names = coco_folder_split(str(root), str(path))
    assert names == ["square", "disk"] and len(rows) == 2
    check_annotations(rows, "train", "image", "objects", len(names))
    rows = with_index(rows)
    polygon_mask = decode_segmentation([SQUARE], SIZE, SIZE)
    assert polygon_mask.sum() == 30 * 30 and decode_segmentation(crowd, SIZE, SIZE).sum() == 200
    collate = DetectionCollator(detection_transform(32, False, 1.0, False), [0.5] * 3, [0.5] * 3, "image",
                                "objects", keep_targets=True)  # fmt: skip
    batch = collate([rows[0], rows[1]])
    first, empty = batch["labels"]
    assert first["class_labels"].tolist() == [1] and len(empty["class_labels"]) == 0
    torch.testing.assert_close(first["boxes"], torch.tensor([[25 / 64, 25 / 64, 30 / 64, 30 / 64]]))
    assert first["masks"].shape == (1, 32, 32) and batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["targets"][0]["iscrowd"].tolist() == [0, 1] and batch["sizes"] == [(SIZE, SIZE), (SIZE, SIZE)]

    flip = DetectionCollator(detection_transform(SIZE, True, 1.0, True), [0.5] * 3, [0.5] * 3, "image", "objects")
    torch.manual_seed(0)
    flipped = [flip([rows[0]])["labels"][0] for _ in range(8)]
    centres = {round(labels["boxes"][0, 0].item() * SIZE, 3) for labels in flipped}
    assert centres == {25.0, 39.0}  # both ways in 8 draws, boxes mirrored about the centre
    for labels in flipped:  # the mask moved with its box
        columns = labels["masks"][0].sum(0).nonzero()
        assert (columns.min() + columns.max() + 1) / 2 == labels["boxes"][0, 0] * SIZE


def run_main(monkeypatch, *args: str) -> str:
    return main_exit_message(monkeypatch, rd.main, *args)


def test_bad_annotations_and_arguments_end_in_one_line(shapes_dir, pretrained, tmp_path, monkeypatch):
    def check(message: str, start: str) -> None:
        assert message.startswith(start) and "\n" not in message, message

    check(run_main(monkeypatch, "--dataset_name", str(shapes_dir)), "error: give --model_name_or_path")
    model = ("--model_name_or_path", str(pretrained), "--output_dir", str(tmp_path / "out"))
    check(run_main(monkeypatch, *model, "--dataset_name", str(shapes_dir), "--transformer_width", "60"),
          "error: --transformer_width must be a multiple of 8")  # fmt: skip
    check(run_main(monkeypatch, *model, "--train_dir", str(tmp_path)), "error: --train_dir and --train_annotations")
    check(run_main(monkeypatch, *model, "--dataset_name", str(shapes_dir), "--num_queries", "0"),
          "error: --num_queries must be")  # fmt: skip
    check(run_main(monkeypatch, *model, "--dataset_name", str(shapes_dir), "--out_indices", "1", "1", "2", "4"),
          "error: the pyramid takes four different blocks of the 4-block encoder")  # fmt: skip

    good = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "segmentation": [SQUARE]}
    bad = {
        "lies outside the 64x64 image": {"bbox": [50, 10, 30, 30]},
        "category_id 7 is not among the file's categories": {"category_id": 7},
        "the segmentation is not polygons": {"segmentation": [[10, 10, 20, 20, 30]]},
    }
    for index, (reason, change) in enumerate(bad.items()):
        root, path = write_coco_folder(
            tmp_path / f"bad{index}", [{**good, "id": 2, "image_id": 2}, {**good, **change}]
        )
        folders = ("--train_dir", str(root), "--train_annotations", str(path), "--validation_dir", str(root),
                   "--validation_annotations", str(path))  # fmt: skip
        message = run_main(monkeypatch, *model, *folders)
        check(message, "error: ")
        assert reason in message and "row 0" in message and "object 0" in message, message
    assert not list((tmp_path / "out").glob("checkpoint-*"))  # refused before training
