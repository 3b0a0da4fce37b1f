"""run_segmentation.py: UperNet on the SG-MAE backbone trained end to end on generated shapes, exact resume, the
shipped mean_iou metric, sliding-window inference, the saved folder in a fresh process, and bad input."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import datasets
import evaluate
import numpy as np
import pytest
import torch
import yaml
from conftest import (
    FRESH_PROCESS_PRELUDE,
    INVALID_CONFIG,
    REPO_ROOT,
    launch_script,
    main_exit_message,
    run_in_fresh_process,
    script_env,
    tiny_config,
)
from safetensors.torch import load_file
from torch import nn

from modeling_sgmae import SGMAEBackbone, SGMAEForPreTraining, SGMAEForSemanticSegmentation, SGMAEUperNetConfig
from sgmae_training.data.segmentation import (
    PairTransform,
    SegmentationCollator,
    SegmentationDataArguments,
    decode_mask,
    label_names,
)
from sgmae_training.data.shapes import CLASS_NAMES, random_pair, write_shapes
from sgmae_training.optim import layer_decay_groups
from sgmae_training.pyramid import pyramid_stages
from sgmae_training.segmentation import METRIC_PATH, pixel_areas, predict

SCRIPT = REPO_ROOT / "run_segmentation.py"
DEFAULT_LAUNCH_CONFIG = REPO_ROOT / "configuration/accelerate/default.yaml"

_spec = importlib.util.spec_from_file_location("run_segmentation", SCRIPT)
rs = sys.modules["run_segmentation"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rs)


# ----- data ----------------------------------------------------------------------------------------------------------
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
            image, mask = random_pair(rng)
            stored = mask + 1
            edges = np.zeros_like(mask, dtype=bool)
            edges[:, 1:] |= mask[:, 1:] != mask[:, :-1]
            edges[1:, :] |= mask[1:, :] != mask[:-1, :]
            stored[edges] = 0
            images.append(Image.fromarray(image))
            masks.append(Image.fromarray(stored, mode="L"))
        split_data = datasets.Dataset.from_dict({"image": images, "annotation": masks}, features=features)
        split_data.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny 4-block SG-MAE pre-training checkpoint (random weights; the pyramid takes blocks 1-4)."""
    path = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    SGMAEForPreTraining(tiny_config(num_hidden_layers=4)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def names_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("names") / "id2label.json"
    path.write_text(json.dumps(list(CLASS_NAMES)))
    return path


# ----- helpers -------------------------------------------------------------------------------------------------------
launch = partial(launch_script, SCRIPT)


def common_args(dataset: Path, output: Path, model: Path, names: Path, *extra: str) -> list[str]:
    """A short run: 6 epochs of 6 steps (batch 8) on 32x32 crops, evaluated after every epoch by sliding windows."""
    return [
        "--dataset_name", str(dataset), "--model_name_or_path", str(model), "--label_names_file", str(names),
        "--reduce_labels", "--output_dir", str(output), "--crop_size", "32", "--per_device_train_batch_size", "8",
        "--num_train_epochs", "6", "--learning_rate", "3e-3", "--layer_decay", "0.9", "--warmup_steps", "3",
        "--head_channels", "32", "--dataloader_num_workers", "0", "--logging_steps", "6", "--seed", "1", *extra,
    ]  # fmt: skip


def validation_rows(dataset_dir: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The validation images as the script's evaluation sees them: resized, normalised pixels and full-size masks."""
    rows = datasets.load_dataset(str(dataset_dir), split="validation")
    rows = rows.cast_column("image", datasets.Image(decode=False)).cast_column(
        "annotation", datasets.Image(decode=False)
    )
    transform = PairTransform(32, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 255, train=False)
    collate = SegmentationCollator(transform, "image", "annotation", len(CLASS_NAMES), reduce_labels=True)
    return [(batch["pixel_values"], batch["labels"]) for batch in (collate([row]) for row in rows)]


FRESH_PROCESS_CHECK = (
    FRESH_PROCESS_PRELUDE
    + """
import torch
from transformers import AutoModelForSemanticSegmentation, pipeline

model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
torch.manual_seed(0)
with torch.no_grad():
    logits = model(pixel_values=torch.randn(1, 3, 32, 48)).logits
import logging
from transformers.utils import logging as transformers_logging


class Keep(logging.Handler):  # what transformers logs, at the level a user sees (warnings and errors)
    def emit(self, record):
        logged.append(record.getMessage())


logged = []
transformers_logging.get_logger("transformers").addHandler(Keep())
segment = pipeline("image-segmentation", model=folder, trust_remote_code=True)
transformers_logging.get_logger("transformers.pipelines.base").warning("a warning still reaches users")
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
found = segment(image)
print("REPORT " + json.dumps({
    "class": type(model).__name__, "backbone": type(model.backbone).__name__, "logits_sum": float(logits.sum()),
    "logged": logged,
    "labels": [item["label"] for item in found], "mask_sizes": [list(item["mask"].size) for item in found],
}))
"""
)


def epoch_mious(log: str) -> list[float]:
    return [float(value) for value in re.findall(r"epoch \d+: mIoU ([0-9.]+)", log)]


# ----- end to end ----------------------------------------------------------------------------------------------------
def test_training_raises_miou_resumes_exactly_and_the_folder_segments_in_a_fresh_process(
    shapes_dir, pretrained, names_file, tmp_path
):
    straight = tmp_path / "straight"
    result = launch(common_args(shapes_dir, straight, pretrained, names_file, "--save_total_limit", "0"))
    log = result.stderr + result.stdout
    assert "fine-tuning 36 steps (6 epochs of 6 steps), global batch 8, lr 3.00e-03, layer decay 0.9" in log
    assert "image column 'image', mask column 'annotation' (labels reduced)" in log
    results = json.loads((straight / "eval_results.json").read_text())
    assert results["step"] == results["total_steps"] == 36 and results["eval_samples"] == 12
    assert results["eval_mode"] == "slide" and results["crop_size"] == 32

    # mIoU is reported per epoch and rises far above chance (every pixel called background, the largest class)
    mious = epoch_mious(log)
    rows = validation_rows(shapes_dir)
    labels = torch.cat([mask.flatten() for _, mask in rows])
    background_share = (labels == 0).sum().item() / (labels != 255).sum().item()
    chance = background_share / len(CLASS_NAMES)
    assert len(mious) == 6 and mious[-1] == pytest.approx(results["eval_mean_iou"], abs=1e-4)
    assert mious[-1] > max(0.5, 2.5 * chance) and mious[-1] > mious[0] + 0.2, (mious, chance)
    assert set(results["eval_per_category_iou"]) == set(CLASS_NAMES)

    # the saved model, run here by sliding windows, gives the same scores through the metric on full pixel maps
    model = SGMAEForSemanticSegmentation.from_pretrained(straight).eval()
    predictions = [predict(model, pixels, "slide", 32, 21, 8) for pixels, _ in rows]
    predictions = [
        nn.functional.interpolate(scores, size=mask.shape[1:], mode="bilinear").argmax(1)[0].numpy()
        for scores, (_, mask) in zip(predictions, rows, strict=True)
    ]
    metric, references = evaluate.load(str(METRIC_PATH)), [mask[0].numpy() for _, mask in rows]
    direct = metric.compute(predictions=predictions, references=references, num_labels=4, ignore_index=255)
    assert direct["mean_iou"] == pytest.approx(results["eval_mean_iou"], abs=1e-6)
    assert direct["overall_accuracy"] == pytest.approx(results["eval_overall_accuracy"], abs=1e-6)

    check_hub_folder(straight, results)
    check_fresh_process(straight, model, tmp_path)

    # a run stopped after epoch 3 and resumed (by plain python) ends with the same weights and results
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoint-18", resumed / "checkpoint-18")  # makes `resumed` too
    result = launch(
        common_args(shapes_dir, resumed, pretrained, names_file, "--resume_from_checkpoint", "latest"), True
    )
    assert "resumed from" in result.stderr + result.stdout
    resumed_weights = load_file(resumed / "model.safetensors")
    for key, tensor in load_file(straight / "model.safetensors").items():
        torch.testing.assert_close(resumed_weights[key], tensor, rtol=0, atol=0, msg=key)
    assert json.loads((resumed / "eval_results.json").read_text()) == results


def check_hub_folder(folder: Path, results: dict) -> None:
    """The folder: weights, code, processor, config with the pyramid, card with the mIoU."""
    for name in ("model.safetensors", "segmentation_sgmae.py", "modeling_sgmae.py", "preprocessor_config.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "sgmae_upernet" and config["id2label"]["1"] == "square"
    assert config["auto_map"]["AutoModelForSemanticSegmentation"] == "segmentation_sgmae.SGMAEForSemanticSegmentation"
    backbone = config["backbone_config"]
    assert backbone["add_fpn"] and backbone["out_indices"] == [1, 2, 3, 4] and backbone["image_size"] == 32
    card = (folder / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["pipeline_tag"] == "image-segmentation"
    assert metadata["model-index"][0]["results"][0]["metrics"][0]["value"] == round(results["eval_mean_iou"], 4)
    assert 'pipeline("image-segmentation"' in card and "| square |" in card


def check_fresh_process(folder: Path, model: SGMAEForSemanticSegmentation, tmp_path: Path) -> None:
    """A process that cannot import this package loads the folder and segments with it as `model` does here."""
    report = run_in_fresh_process(FRESH_PROCESS_CHECK, folder, tmp_path)
    assert report["class"] == "SGMAEForSemanticSegmentation" and report["backbone"] == "SGMAEBackbone"
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model(pixel_values=torch.randn(1, 3, 32, 48)).logits.sum().item()
    assert report["logits_sum"] == pytest.approx(expected, rel=1e-5, abs=1e-4)
    assert report["labels"] and set(report["labels"]) <= set(CLASS_NAMES)
    # the pipeline takes the model without its "not supported" error; other warnings are not hidden
    assert report["logged"] == ["a warning still reaches users"], report["logged"]
    assert all(size == [48, 40] for size in report["mask_sizes"])  # (width, height) of the input image


def test_two_processes_score_every_validation_image_once(shapes_dir, pretrained, names_file, tmp_path):
    """Each process scores its shard (11 images: one process gets 6, the other 5); the summed areas equal the
    saved model's scores on all images in one process."""
    output = tmp_path / "two"
    arguments = common_args(shapes_dir, output, pretrained, names_file, "--max_train_steps", "2")
    launch(
        [*arguments, "--max_train_samples", "16", "--max_eval_samples", "11", "--eval_mode", "whole"], num_processes=2
    )
    results = json.loads((output / "eval_results.json").read_text())
    assert results["num_processes"] == 2 and results["eval_samples"] == 11 and results["step"] == 2
    model = SGMAEForSemanticSegmentation.from_pretrained(output).eval()
    rows = validation_rows(shapes_dir)[:11]
    areas = sum(
        pixel_areas(
            nn.functional.interpolate(
                predict(model, pixels, "whole", 32, 21, 8), size=mask.shape[1:], mode="bilinear"
            ).argmax(1),
            mask,
            len(CLASS_NAMES),
            255,
        )
        for pixels, mask in rows
    )
    iou = areas[0] / areas[1]
    # (every process scores with the saved BatchNorm statistics: process 0's)
    assert results["eval_mean_iou"] == pytest.approx(iou[areas[1] > 0].mean().item(), abs=1e-5)
    accuracy = (areas[0].sum() / areas[3].sum()).item()
    assert results["eval_overall_accuracy"] == pytest.approx(accuracy, abs=1e-5)


def test_a_streamed_training_split_trains_and_is_scored_whole(shapes_dir, pretrained, names_file, tmp_path):
    output = tmp_path / "streamed"
    arguments = common_args(shapes_dir, output, pretrained, names_file, "--max_train_steps", "4", "--streaming")
    launch([*arguments, "--eval_mode", "whole", "--dataloader_num_workers", "1"], plain_python=True)
    results = json.loads((output / "eval_results.json").read_text())
    assert results["step"] == 4 and results["eval_samples"] == 12 and results["eval_mode"] == "whole"
    assert 0 <= results["eval_mean_iou"] <= 1


# ----- parts ---------------------------------------------------------------------------------------------------------
def test_mean_iou_metric_from_pixels_and_from_areas_agrees_with_a_count_by_hand():
    metric = evaluate.load(str(METRIC_PATH))
    prediction = np.array([[0, 1, 1], [2, 2, 0]])
    reference = np.array([[0, 1, 2], [2, 255, 1]])
    # class 0: I 1, U 2; class 1: I 1, U 3; class 2: I 1, U 2 (the ignored pixel's prediction counts nowhere)
    scores = metric.compute(predictions=[prediction], references=[reference], num_labels=4, ignore_index=255)
    np.testing.assert_allclose(scores["per_category_iou"][:3], [1 / 2, 1 / 3, 1 / 2])
    assert np.isnan(scores["per_category_iou"][3])  # absent everywhere: left out of the mean
    assert scores["mean_iou"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert scores["overall_accuracy"] == pytest.approx(3 / 5)
    areas = pixel_areas(torch.from_numpy(prediction), torch.from_numpy(reference), 4, 255).numpy()
    from_areas = metric.compute(
        predictions=[],
        references=[],
        num_labels=4,
        ignore_index=255,
        areas=dict(zip(("intersect", "union", "pred_label", "label"), areas, strict=True)),
    )
    np.testing.assert_array_equal(from_areas["per_category_iou"], scores["per_category_iou"])
    # ADE20K's reduction: stored 0 is ignored, k becomes k - 1
    reduced = metric.compute(
        predictions=[prediction], references=[reference + 1], num_labels=4, ignore_index=255, reduce_labels=True
    )
    np.testing.assert_array_equal(reduced["per_category_iou"], scores["per_category_iou"])


def test_sliding_windows_cover_the_image_and_average_overlaps():
    """A per-pixel model: sliding windows (overlapping, flush with the border, padded when the image is smaller than
    a window) and the whole image must both give exactly its per-pixel scores."""
    head = nn.Conv2d(3, 5, kernel_size=1)
    calls = []

    def model(pixel_values: torch.Tensor) -> SimpleNamespace:
        calls.append(tuple(pixel_values.shape[2:]))
        return SimpleNamespace(logits=head(pixel_values))

    pixels = torch.randn(1, 3, 32, 70)
    with torch.no_grad():
        expected = head(pixels)
    torch.testing.assert_close(predict(model, pixels, "slide", 32, 21, 8), expected)
    assert calls == [(32, 32)] * 3  # columns 0, 21, 38 (the last flush with the right border)
    calls.clear()
    torch.testing.assert_close(predict(model, pixels, "whole", 32, 21, 8), expected)
    assert calls == [(32, 72)]  # padded to the pyramid's multiple
    small = torch.randn(1, 3, 20, 28)
    with torch.no_grad():
        torch.testing.assert_close(predict(model, small, "slide", 32, 21, 8), head(small))


def test_training_crops_keep_image_and_mask_aligned_and_pad_with_the_ignore_index():
    """Pixels encode their class (value 40 x class), so after crop and flip every labelled pixel must still show its
    class; a smaller image is padded with 0 (the mean) and the ignore index."""
    torch.manual_seed(0)
    mask = torch.randint(0, 4, (32, 48))
    image = rgb_image((mask * 40).to(torch.uint8))
    transform = PairTransform(32, [0.0] * 3, [1 / 255] * 3, 255, train=True, scale_range=(1.0, 1.0), photometric=False)
    for _ in range(5):
        pixels, labels = transform(image, mask)
        assert pixels.shape == (3, 32, 32) and labels.shape == (32, 32)
        torch.testing.assert_close(pixels[0], labels.float() * 40)
    half = PairTransform(32, [0.0] * 3, [1 / 255] * 3, 255, train=True, scale_range=(0.5, 0.5), photometric=False)
    pixels, labels = half(rgb_image((mask[:16, :24] * 40).to(torch.uint8)), mask[:16, :24])
    assert (labels[16:] == 255).all() and (labels[:, 24:] == 255).all() and (pixels[:, 16:] == 0).all()
    assert (labels[:16, :24] != 255).all()


def rgb_image(values: torch.Tensor):
    from PIL import Image

    return Image.fromarray(np.stack([values.numpy()] * 3, axis=-1))


def test_pyramid_strides_defaults_and_layer_decay():
    config = tiny_config(num_hidden_layers=4, out_indices=[1, 2, 3, 4], add_fpn=True, apply_layernorm=False)
    backbone = SGMAEBackbone(config).eval()
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 32, 48)).feature_maps  # any multiple of the patch size
    assert [tuple(m.shape[2:]) for m in maps] == [(32, 48), (16, 24), (8, 12), (4, 6)]  # strides p/4, p/2, p, 2p
    with pytest.raises(INVALID_CONFIG, match="add_fpn needs four out_features"):
        tiny_config(num_hidden_layers=4, out_indices=[2, 4], add_fpn=True)
    default = SGMAEUperNetConfig()  # MAE / BEiT ViT-B: blocks 4, 6, 8, 12 (0-based 3, 5, 7, 11) at 512x512
    assert default.backbone_config.out_indices == [4, 6, 8, 12] and default.backbone_config.image_size == 512
    assert pyramid_stages(None, 12) == [4, 6, 8, 12]
    assert pyramid_stages(None, 24) == [8, 12, 16, 24]

    model = SGMAEForSemanticSegmentation(
        SGMAEUperNetConfig(backbone_config=config, hidden_size=16, auxiliary_in_channels=32, num_labels=3)
    )
    groups = layer_decay_groups(model, 1.0, 0.05, 0.5, encoder="backbone.vit")
    rate_of = {id(parameter): group["lr"] for group in groups for parameter in group["params"]}
    assert rate_of[id(model.decode_head.classifier.weight)] == 1.0
    assert rate_of[id(model.backbone.fpn.fpn1[0].weight)] == 1.0
    assert rate_of[id(model.backbone.vit.layers[3].mlp.fc1.weight)] == 0.5
    assert rate_of[id(model.backbone.vit.embeddings.patch_embeddings.projection.weight)] == 0.5**5
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    assert frozen == {
        "backbone.vit.embeddings.position_embeddings",
        "backbone.vit.layernorm.weight",
        "backbone.vit.layernorm.bias",
    }


def test_encoder_position_table_is_resized_to_the_crop(pretrained):
    names = SegmentationDataArguments(crop_size=48, num_labels=3)
    model = rs.build_model(
        rs.ModelArguments(model_name_or_path=str(pretrained), head_channels=16), names, ["a", "b", "c"]
    )
    encoder = SGMAEForPreTraining.from_pretrained(pretrained)
    assert model.backbone.config.image_size == 48 and model.backbone.config.grid_size == (12, 12)
    torch.testing.assert_close(model.backbone.vit.layers[2].mlp.fc2.weight, encoder.vit.layers[2].mlp.fc2.weight)
    # the 48x48 model sees what the 32x32 encoder sees at 48x48 with its table interpolated
    model.eval(), encoder.eval()
    pixels = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        ours = model.backbone.vit(pixels).last_hidden_state
        theirs = encoder.vit(pixels, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(ours, theirs)


# ----- bad input -----------------------------------------------------------------------------------------------------
def run_main(monkeypatch, *args: str) -> str:
    return main_exit_message(monkeypatch, rs.main, *args)


def write_bad_mask_dataset(root: Path) -> Path:
    """Two rows, the second's mask smaller than its image."""
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    images = [Image.new("RGB", (40, 32)), Image.new("RGB", (40, 32))]
    masks = [Image.new("L", (40, 32), 1), Image.new("L", (20, 16), 1)]
    (root / "data").mkdir(parents=True)
    for split in ("train", "validation"):
        rows = datasets.Dataset.from_dict({"image": images, "annotation": masks}, features=features)
        rows.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def test_bad_input_ends_in_one_line(shapes_dir, pretrained, names_file, tmp_path, monkeypatch):
    def args(*extra: str, **changes: str) -> list[str]:
        values = {"dataset_name": str(shapes_dir), "model_name_or_path": str(pretrained), "num_labels": "4"}
        values |= {"output_dir": str(tmp_path / "out"), "crop_size": "32", "per_device_train_batch_size": "4"}
        values |= {"max_train_steps": "2", "dataloader_num_workers": "0", "head_channels": "16"} | changes
        return [item for key, value in values.items() if value is not None for item in (f"--{key}", value)] + [*extra]

    def check(message: str, start: str) -> None:
        assert message.startswith(start) and "\n" not in message, message

    check(run_main(monkeypatch, *args(num_labels=None)), "error: give --num_labels (ADE20K: 150)")
    check(
        run_main(monkeypatch, *args(per_device_train_batch_size="1")),
        "error: --per_device_train_batch_size must be at least 2",
    )
    check(run_main(monkeypatch, *args(eval_mode="tiles")), "error: --eval_mode must be one of slide, whole")
    check(run_main(monkeypatch, *args(ignore_index="3")), "error: --ignore_index 3 is one of the 4 class ids")
    check(run_main(monkeypatch, *args(mask_column="segments")), "error: mask column 'segments' not in the dataset")
    check(
        run_main(monkeypatch, *args(label_names_file=str(names_file), num_labels="5")),
        "error: --num_labels 5 disagrees with the 4 names",
    )
    check(run_main(monkeypatch, *args(model_name_or_path=None)), "error: give --model_name_or_path")
    check(  # offline (as every test runs), a Hub id is found unreachable before anything is built
        run_main(monkeypatch, *args(dataset_name="someone/no-such-maps")),
        "error: dataset 'someone/no-such-maps' is not a local folder and could not be fetched from the Hub",
    )
    not_a_model = tmp_path / "bert"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    check(run_main(monkeypatch, *args(model_name_or_path=str(not_a_model))), "error: ")
    # masks stored ADE20K's way (0 = other, class k as k + 1) without --reduce_labels: class 4 of 4, in a worker too
    # parquet rows keep no file name: the message names the row by its number in the split, and that row is bad
    training_maps = datasets.load_dataset(str(shapes_dir), split="train")["annotation"]
    for workers in ("0", "1"):
        message = run_main(monkeypatch, *args(dataloader_num_workers=workers))
        check(message, "error: the segmentation map of row ")
        assert "holds class 4, outside 0..3" in message and "need --reduce_labels" in message
        row = int(re.search(r"of row (\d+) of the 'train' split holds", message).group(1))
        assert np.asarray(training_maps[row]).max() == 4
    bad = write_bad_mask_dataset(tmp_path / "bad")
    message = run_main(monkeypatch, *args("--reduce_labels", dataset_name=str(bad), per_device_train_batch_size="2"))
    check(message, "error: the segmentation map of row 1 of the 'train' split is 20x16 but its image is 40x32")
    assert not (tmp_path / "out" / "eval_results.json").exists()
    # a folder's rows keep their file names
    folder = write_shapes(tmp_path / "folder", train_size=4, validation_size=2)
    (folder / "train" / "annotations" / "0002.png").write_bytes(b"not a png")
    message = run_main(
        monkeypatch,
        *args(dataset_name=None, train_dir=str(folder / "train"), validation_dir=str(folder / "validation")),
    )
    check(message, "error: cannot read the segmentation map of '")
    assert "0002.png' (row 2 of the 'train' split)" in message


def test_corrupt_images_are_said_as_often_as_they_are_counted(pretrained, names_file, tmp_path):
    """A corrupt training image and a corrupt validation image: each warning comes where its image is counted (not
    from a DataLoader worker decoding a batch that training never uses), so the warnings match the log's and
    eval_results.json's counts."""
    folder = write_shapes(tmp_path / "folder", train_size=8, validation_size=3)
    for split in ("train", "validation"):
        (folder / split / "images" / "0001.png").write_bytes(b"not a png")
    output = tmp_path / "out"
    result = launch([
        "--train_dir", str(folder / "train"), "--validation_dir", str(folder / "validation"),
        "--label_names_file", str(names_file), "--model_name_or_path", str(pretrained), "--output_dir", str(output),
        "--crop_size", "32", "--head_channels", "16", "--per_device_train_batch_size", "4", "--max_train_steps", "1",
        "--warmup_steps", "0", "--eval_every_epochs", "0", "--dataloader_num_workers", "1",
    ], plain_python=True)  # fmt: skip
    results = json.loads((output / "eval_results.json").read_text())
    warned = re.findall(r"skipping a corrupt image \(\S*/(train|validation)/images/0001\.png\)", result.stderr)
    said = re.search(r"skipped (\d+) corrupt training images", result.stderr)
    assert warned.count("validation") == results["eval_skipped_images"] == 1, result.stderr[-3000:]
    assert warned.count("train") == (int(said.group(1)) if said else 0) == results["skipped_images"], warned


def test_a_bad_map_is_the_last_line_of_a_quiet_launch(pretrained, tmp_path):
    """Under `accelerate launch -q`, a bad map met by a DataLoader worker ends the run with its line, and nothing (no
    progress bar drawn again as it closes) comes after it."""
    bad = write_bad_mask_dataset(tmp_path / "bad")
    command = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file", str(DEFAULT_LAUNCH_CONFIG)]
    command += [str(SCRIPT), "--dataset_name", str(bad), "--model_name_or_path", str(pretrained), "--num_labels", "4"]
    command += ["--output_dir", str(tmp_path / "out"), "--crop_size", "32", "--per_device_train_batch_size", "2"]
    command += ["--max_train_steps", "2", "--head_channels", "16", "--dataloader_num_workers", "1", "--reduce_labels"]
    result = subprocess.run(command, env=script_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    printed = [line for line in re.split(r"[\r\n]", result.stderr + result.stdout) if line.strip()]
    assert printed[-1] == (
        "error: the segmentation map of row 1 of the 'train' split is 20x16 but its image is 40x32 (width x height)"
    ), printed[-3:]


def test_mask_decoding_rejects_colour_maps():
    from PIL import Image

    with pytest.raises(ValueError, match="has 3 bands"):
        decode_mask(Image.new("RGB", (4, 4)), (4, 4), 3, 255, False)
    mask = decode_mask(Image.new("L", (4, 4), 0), (4, 4), 3, 255, True)
    assert (mask == 255).all()  # ADE20K's "other" becomes the ignore index


def test_a_segmentation_checkpoint_continues_with_new_heads_and_the_ade20k_names_load(tmp_path):
    config = tiny_config(num_hidden_layers=4, out_indices=[1, 2, 3, 4], add_fpn=True, apply_layernorm=False)
    trained = SGMAEForSemanticSegmentation(
        SGMAEUperNetConfig(backbone_config=config, hidden_size=16, auxiliary_in_channels=32, num_labels=4)
    )
    trained.save_pretrained(tmp_path / "segmenter")
    data_args = SegmentationDataArguments(crop_size=32, num_labels=3)
    model = rs.build_model(
        rs.ModelArguments(model_name_or_path=str(tmp_path / "segmenter")), data_args, ["a", "b", "c"]
    )
    assert model.decode_head.classifier.out_channels == 3 and model.config.id2label[2] == "c"
    torch.testing.assert_close(model.backbone.fpn.fpn2.weight, trained.backbone.fpn.fpn2.weight)
    assert not model.backbone.vit.embeddings.position_embeddings.requires_grad
    # a from-scratch baseline from a config file: the pyramid's blocks by default, drop path, the crop's grid
    tiny_config(num_hidden_layers=6).to_json_file(tmp_path / "config.json")
    scratch = rs.build_model(
        rs.ModelArguments(config_name=str(tmp_path / "config.json"), drop_path=0.2), data_args, ["a", "b", "c"]
    )
    assert scratch.backbone.config.out_indices == [2, 3, 4, 6] and scratch.backbone.config.drop_path_rate == 0.2
    assert scratch.backbone.config.grid_size == (8, 8) and scratch.auxiliary_head is not None
    ade = SegmentationDataArguments(label_names_file=str(REPO_ROOT / "configuration/datasets/ade20k-id2label.json"))
    names = label_names(ade)
    assert len(names) == 150 and names[:3] == ["wall", "building", "sky"] and names[-1] == "flag"


# ----- the documented try -------------------------------------------------------------------------------------------
def test_the_documented_offline_try_runs_as_written(pretrained, tmp_path):
    """docs/segmentation.md's first command (generate the shapes, fine-tune the demo model on them), run as written
    with a tiny encoder in place of the demo model and a temporary folder in place of outputs/."""
    from PIL import Image

    block = re.search(r"```bash\n(.*?)```", (REPO_ROOT / "docs/segmentation.md").read_text(), re.DOTALL).group(1)
    assert "python -m sgmae_training.data.shapes outputs/shapes" in block and "outputs/sgmae-demo " in block
    assert f"```bash\n{block}```" in (REPO_ROOT / "README.md").read_text()  # the README shows the same command
    command = block.replace("outputs/sgmae-demo ", f"{pretrained} ").replace("outputs/", f"{tmp_path}/")
    env = script_env() | {"PATH": f"{Path(sys.executable).parent}:{script_env()['PATH']}"}  # `python`, `accelerate`
    result = subprocess.run(
        ["bash", "-c", command], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    output = next(path for path in tmp_path.iterdir() if (path / "eval_results.json").is_file())
    results = json.loads((output / "eval_results.json").read_text())
    maps = [np.asarray(Image.open(path)) for path in sorted((tmp_path / "shapes/validation/annotations").iterdir())]
    pixels = np.concatenate([values.ravel() for values in maps])
    chance = (pixels == 0).mean() / len(CLASS_NAMES)  # every pixel called background, the largest class
    assert results["eval_samples"] == len(maps) and results["eval_mean_iou"] > 2 * chance, (results, chance)
    assert (output / "model.safetensors").is_file() and "| triangle |" in (output / "README.md").read_text()


def test_the_folder_arguments_describe_the_map_layout():
    from transformers import HfArgumentParser

    parser = HfArgumentParser((rs.ModelArguments, SegmentationDataArguments, rs.SegmentationArguments))
    help_text = " ".join(parser.format_help().split())
    assert "metadata.jsonl whose rows name an image (`file_name`) and its map (`annotation_file_name`)" in help_text
    assert "class subfolders" not in help_text
