"""A saved SG-MAE folder works on the Hub stack: remote code in a fresh process, in-process registration, pipelines.

What it takes to make such a folder (the classes register themselves for the auto classes at import, so every
save copies the 4 .py files; auto_map lists all five auto classes):
    model.save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)  # preprocessor_config.json, needed by pipelines
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, tiny_config
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    ViTImageProcessor,
    pipeline,
)

import modeling_sgmae
from modeling_sgmae import SGMAEConfig, SGMAEForImageClassification, SGMAEForPreTraining, SGMAEModel

MAE_MEAN, MAE_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
LABELS = {0: "cat", 1: "dog", 2: "frog"}
# What a saved folder carries: the modeling file and everything it imports (the ranking cache and crops included).
PACKAGE_FILES = (
    "configuration_sgmae.py",
    "crops.py",
    "fiedler_solvers.py",
    "hub_access.py",
    "mask_cache.py",
    "masking_sgmae.py",
    "modeling_sgmae.py",
    "vit_mae_conversion.py",
)


def image_processor() -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=MAE_MEAN, image_std=MAE_STD)


def pil_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]


def save_for_hub(model, output_dir: Path, register: bool) -> None:
    if register:  # what remote-code users habitually add; with transformers' default "AutoModel" it must stay harmless
        model.register_for_auto_class()
    model.save_pretrained(output_dir)
    image_processor().save_pretrained(output_dir)


@pytest.fixture(scope="module")
def hub_folders(tmp_path_factory):
    """A pre-training checkpoint and a fine-tuned classifier, each saved as a self-contained Hub folder."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hub")
    config = tiny_config(num_labels=3, id2label=LABELS, label2id={name: index for index, name in LABELS.items()})
    pretraining = SGMAEForPreTraining(config)
    pretraining.set_training_progress(5, 40)
    # A plain save_pretrained, with nothing registered by hand.
    save_for_hub(pretraining, root / "pretraining", register=False)

    classifier = SGMAEForImageClassification(config)
    with torch.no_grad():
        classifier.classifier.weight.normal_()  # a "trained" head, so the label order shows in the predictions
    # Registered by hand with transformers' default "AutoModel": it must still leave AutoModel -> SGMAEModel.
    save_for_hub(classifier, root / "classifier", register=True)

    # Expected outputs, computed here with the package, checked in the other process.
    pixel_values = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    processed = image_processor()(pil_images(), return_tensors="pt")["pixel_values"]
    backbone = SGMAEModel.from_pretrained(root / "pretraining").eval()
    with torch.no_grad():
        expected = {
            "pixel_values": pixel_values,
            "noise": noise,
            "processed": processed,
            "last_hidden_state": backbone(pixel_values).last_hidden_state,
            "processed_hidden_state": backbone(processed).last_hidden_state,
            "processed_pooled": backbone(processed).pooler_output,
            "loss": pretraining.eval()(pixel_values, noise=noise).loss,
            "classifier_logits": classifier.eval()(processed).logits,
        }
    torch.save(expected, root / "expected.pt")
    return root


def test_saved_folder_is_self_contained(hub_folders):
    for name in ("pretraining", "classifier"):
        folder = hub_folders / name
        for file_name in (*PACKAGE_FILES, "config.json", "model.safetensors", "preprocessor_config.json"):
            assert (folder / file_name).is_file(), file_name
        package_dir = Path(modeling_sgmae.__file__).parent
        for file_name in PACKAGE_FILES:
            assert filecmp.cmp(folder / file_name, package_dir / file_name, shallow=False)
            source = (folder / file_name).read_text()
            assert "from modeling_sgmae" not in source and "import modeling_sgmae" not in source
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"] == {
            "AutoConfig": "configuration_sgmae.SGMAEConfig",
            "AutoModel": "modeling_sgmae.SGMAEModel",
            "AutoModelForPreTraining": "modeling_sgmae.SGMAEForPreTraining",
            "AutoModelForImageClassification": "modeling_sgmae.SGMAEForImageClassification",
            "AutoBackbone": "modeling_sgmae.SGMAEBackbone",
        }
        processor = json.loads((folder / "preprocessor_config.json").read_text())
        assert processor["size"] == {"height": 32, "width": 32}
        assert processor["image_mean"] == MAE_MEAN and processor["image_std"] == MAE_STD
    assert SGMAEForPreTraining._auto_class == "AutoModelForPreTraining"  # registered at import, under its own class


REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import json
    import sys

    import numpy as np
    import torch
    from PIL import Image
    from transformers import (
        AutoModel, AutoModelForImageClassification, AutoModelForPreTraining, ViTImageProcessor, pipeline
    )

    repo_root, folders = sys.argv[1], sys.argv[2]
    assert repo_root not in sys.path, sys.path


    class Block(importlib.abc.MetaPathFinder):
        # Even where the package is pip-installed, nothing here may come from it.
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_sgmae" or name.startswith("modeling_sgmae."):
                raise ImportError("the SG-MAE package is not available in this process")
            return None


    sys.meta_path.insert(0, Block())
    try:
        import modeling_sgmae  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("modeling_sgmae must not be importable here")

    expected = torch.load(f"{folders}/expected.pt")
    pretraining_dir, classifier_dir = f"{folders}/pretraining", f"{folders}/classifier"
    report = {}

    backbone = AutoModel.from_pretrained(pretraining_dir, trust_remote_code=True)
    pretraining = AutoModelForPreTraining.from_pretrained(pretraining_dir, trust_remote_code=True)
    fresh_head = AutoModelForImageClassification.from_pretrained(pretraining_dir, trust_remote_code=True)
    classifier = AutoModelForImageClassification.from_pretrained(classifier_dir, trust_remote_code=True)
    report["classes"] = [type(m).__name__ for m in (backbone, pretraining, fresh_head, classifier)]
    report["modules"] = [type(m).__module__ for m in (backbone, pretraining, fresh_head, classifier)]

    with torch.no_grad():
        hidden = backbone(expected["pixel_values"]).last_hidden_state
        assert torch.allclose(hidden, expected["last_hidden_state"], atol=1e-6)
        loss = pretraining(expected["pixel_values"], noise=expected["noise"]).loss
        assert torch.allclose(loss, expected["loss"], atol=1e-6)
        logits = classifier(expected["processed"]).logits
        assert torch.allclose(logits, expected["classifier_logits"], atol=1e-6)
    report["training_step"] = int(pretraining.schedule.training_step)
    report["frozen"] = [n for n, p in pretraining.named_parameters() if not p.requires_grad]
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(fresh_head.vit.state_dict()[name], tensor), name
    assert not hasattr(fresh_head, "decoder")
    report["fresh_head_labels"] = fresh_head.config.id2label

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]
    processed = ViTImageProcessor.from_pretrained(pretraining_dir)(images, return_tensors="pt")["pixel_values"]
    assert torch.allclose(processed, expected["processed"])

    classify = pipeline("image-classification", model=classifier_dir, trust_remote_code=True)
    predictions = classify(images)
    report["predicted_labels"] = [[p["label"] for p in image] for image in predictions]
    report["score_sums"] = [sum(p["score"] for p in image) for image in predictions]
    features = pipeline("image-feature-extraction", model=pretraining_dir, trust_remote_code=True)
    tokens = np.array(features(images[0]))
    pooled = np.array(features(images[0], pool=True))
    assert np.allclose(tokens[0], expected["processed_hidden_state"][0].numpy(), atol=1e-5)
    assert np.allclose(pooled[0], expected["processed_pooled"][0].numpy(), atol=1e-5)
    report["feature_shapes"] = [list(tokens.shape), list(pooled.shape)]
    print("REPORT " + json.dumps(report))
    """
)


def test_remote_code_checkpoint_works_in_a_fresh_process(hub_folders, tmp_path):
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
    )
    completed = subprocess.run(
        [sys.executable, str(script), str(REPO_ROOT), str(hub_folders)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    report_line = next(line for line in completed.stdout.splitlines() if line.startswith("REPORT "))
    report = json.loads(report_line.removeprefix("REPORT "))
    assert report["classes"] == [
        "SGMAEModel",
        "SGMAEForPreTraining",
        "SGMAEForImageClassification",
        "SGMAEForImageClassification",
    ]
    assert all(module.startswith("transformers_modules.") for module in report["modules"])
    assert report["training_step"] == 5  # schedule state travels with the checkpoint
    assert sorted(report["frozen"]) == ["decoder.decoder_pos_embed", "vit.embeddings.position_embeddings"]
    assert report["fresh_head_labels"] == {str(index): name for index, name in LABELS.items()}
    expected = torch.load(hub_folders / "expected.pt")
    order = expected["classifier_logits"].argsort(dim=1, descending=True)
    assert report["predicted_labels"] == [[LABELS[int(index)] for index in row] for row in order]
    assert report["score_sums"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert report["feature_shapes"] == [[1, 65, 32], [1, 32]]


def test_registered_classes_load_in_process_without_remote_code(hub_folders):
    folder = hub_folders / "pretraining"
    assert isinstance(AutoConfig.from_pretrained(folder), SGMAEConfig)
    backbone = AutoModel.from_pretrained(folder)
    pretraining = AutoModelForPreTraining.from_pretrained(folder)
    classifier = AutoModelForImageClassification.from_pretrained(hub_folders / "classifier")
    assert type(backbone) is SGMAEModel
    assert type(pretraining) is SGMAEForPreTraining
    assert type(classifier) is SGMAEForImageClassification
    expected = torch.load(hub_folders / "expected.pt")
    with torch.no_grad():
        assert torch.allclose(backbone(expected["pixel_values"]).last_hidden_state, expected["last_hidden_state"])
        assert torch.allclose(classifier(expected["processed"]).logits, expected["classifier_logits"])

    features = pipeline("image-feature-extraction", model=str(folder))
    assert type(features.model) is SGMAEModel
    pooled = np.array(features(pil_images()[0], pool=True))
    assert np.allclose(pooled[0], expected["processed_pooled"][0].numpy(), atol=1e-5)
    classify = pipeline("image-classification", model=str(hub_folders / "classifier"))
    assert type(classify.model) is SGMAEForImageClassification
    labels = [prediction["label"] for prediction in classify(pil_images()[0])]
    assert labels[0] == LABELS[int(expected["classifier_logits"][0].argmax())]
    assert sorted(labels) == sorted(LABELS.values())
