"""Every Python snippet in README.md and docs/*.md runs as pasted, in the order a reader meets it on its page.

Each page's ```python blocks run in one namespace (a reader pastes them into one session), in a folder laid out as
the repository root is: `configuration/` beside tiny models saved where the snippets look for them (`outputs/...`,
made by a fixture as the documented commands would make them, only smaller), `photo.jpg`, and the exported encoder of
docs/interop.md. A Hub id (`facebook/vit-mae-base`) resolves to a local folder of the same name holding a tiny
transformers ViTMAE checkpoint, as `from_pretrained` does with a local copy. A block that cannot run here says so on
its first line (`# not run by the tests: <why>`), visibly to readers too; it is still compiled, and the list of such
blocks is pinned below.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, tiny_config
from PIL import Image
from transformers import (
    ConditionalDetrImageProcessor,
    SegformerImageProcessor,
    ViTImageProcessor,
    ViTMAEConfig,
    ViTMAEForPreTraining,
)

from modeling_sgmae import (
    SGMAEForImageClassification,
    SGMAEForPreTraining,
    SGMAEForSemanticSegmentation,
    SGMAEUperNetConfig,
)
from modeling_sgmae.detection_sgmae import SGMAEDetrConfig, SGMAEForObjectDetection
from sgmae_training.data.shapes import CLASS_NAMES, DETECTION_CATEGORIES, write_shapes
from sgmae_training.export import export_timm
from sgmae_training.pyramid import as_pyramid

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
NOT_RUN = re.compile(r"# not run by the tests: (\S.*)")
# The blocks that cannot run on a test machine, and why (their first line says so on the page).
EXPECTED_NOT_RUN = {"demo.md": ["a running `python app.py`"]}
PROCESSOR = dict(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block of a page."""
    text = page.read_text()
    return [(text[: match.start()].count("\n") + 2, match.group(1)) for match in PYTHON_BLOCK.finditer(text)]


def pages_with_snippets() -> list[Path]:
    return [page for page in PAGES if python_blocks(page)]


def labels_of(names: tuple[str, ...]) -> dict:
    return {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository root as the snippets expect it, with tiny stand-ins for the models the documented commands
    save (the demo's, a fine-tuned classifier, segmenters, a detector), the generated shapes, and the Hub's ViTMAE
    checkpoint."""
    root = tmp_path_factory.mktemp("snippets")
    (root / "configuration").symlink_to(REPO_ROOT / "configuration")
    torch.manual_seed(0)
    demo = SGMAEForPreTraining(tiny_config(num_hidden_layers=12))  # 12 blocks: docs/interop.md picks stages 4, 8, 12
    demo.save_pretrained(root / "outputs/sgmae-demo")
    ViTImageProcessor(**PROCESSOR).save_pretrained(root / "outputs/sgmae-demo")
    labels = {"id2label": {0: "cat", 1: "dog"}, "label2id": {"cat": 0, "dog": 1}}
    SGMAEForImageClassification(tiny_config(num_labels=2, **labels)).save_pretrained(root / "outputs/sgmae-cifar10-ft")
    ViTImageProcessor(**PROCESSOR).save_pretrained(root / "outputs/sgmae-cifar10-ft")
    backbone = tiny_config(num_hidden_layers=4, out_indices=[1, 2, 3, 4], add_fpn=True)
    classes = {"id2label": {0: "wall", 1: "sky", 2: "floor"}, "label2id": {"wall": 0, "sky": 1, "floor": 2}}
    segmenter = SGMAEUperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_in_channels=32, **classes)
    SGMAEForSemanticSegmentation(segmenter).eval().save_pretrained(root / "outputs/sgmae-ade20k")
    SegformerImageProcessor(**PROCESSOR).save_pretrained(root / "outputs/sgmae-ade20k")
    write_shapes(root / "outputs/shapes", train_size=1, validation_size=1)  # the offline try's set, one image a split
    segmenter.update(labels_of(CLASS_NAMES))
    SGMAEForSemanticSegmentation(segmenter).eval().save_pretrained(root / "outputs/sgmae-demo-shapes")
    SegformerImageProcessor(**PROCESSOR).save_pretrained(root / "outputs/sgmae-demo-shapes")
    pyramid = tiny_config(num_hidden_layers=4)
    as_pyramid(pyramid, 32, 0.0, None)
    detr = dict(num_queries=5, d_model=16, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32)
    detector = SGMAEDetrConfig(backbone_config=pyramid, **detr, **labels_of(DETECTION_CATEGORIES))
    SGMAEForObjectDetection(detector).eval().save_pretrained(root / "outputs/shapes-detection")
    detection_processor = ConditionalDetrImageProcessor(size={"height": 32, "width": 32}, do_pad=False)
    detection_processor.save_pretrained(root / "outputs/shapes-detection")
    export_timm(demo, root / "encoder.safetensors", None, head=False)
    mae = {name: value for name, value in tiny_config().to_dict().items() if name in ViTMAEConfig().to_dict()}
    ViTMAEForPreTraining(ViTMAEConfig(**mae)).save_pretrained(root / "facebook/vit-mae-base")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    (root / "path/to").mkdir(parents=True)
    for path in ("photo.jpg", "photo.png", "path/to/photo.jpg"):
        photo.save(root / path)
    return root


@pytest.mark.parametrize("page", pages_with_snippets(), ids=lambda page: page.name)
def test_every_python_snippet_runs_as_pasted(page: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(workspace)
    namespace: dict = {"__name__": "__main__"}
    not_run = []
    for line, code in python_blocks(page):
        compiled = compile(code, f"{page.name}:{line}", "exec")  # every block at least parses
        if reason := NOT_RUN.match(code.splitlines()[0]):
            not_run.append(reason.group(1))
            continue
        exec(compiled, namespace)
        if "SGMAETrainerCallback" in code and "trainer" in namespace:  # a Trainer run reaches informed masks
            assert namespace["trainer"].model.informed_masking_active, f"{page.name}:{line} never masked informed"
        if "mask_ranking_cache" in code:  # and the cached one refreshed its rankings, each photo ranked once
            cache = namespace["cache"]
            assert cache.refreshed_at >= 0 and torch.isfinite(cache.rankings.float()).all()
            assert len(cache.ranked_rows()) < len(cache.rankings)
    assert not_run == EXPECTED_NOT_RUN.get(page.name, [])
