"""run_classification.py: the three protocols end to end through `accelerate launch`, the shipped accuracy metric,
the probe folding, kNN voting, cross-process evaluation counts and bad input."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from functools import partial
from pathlib import Path

import datasets
import evaluate
import pytest
import torch
import yaml
from conftest import (
    CLASS_NAMES,
    REPO_ROOT,
    check_folder_in_fresh_process,
    launch_script,
    tiny_config,
)
from safetensors.torch import load_file

from modeling_sgmae import SGMAEForImageClassification, SGMAEForPreTraining
from sgmae_training.classification import fold_probe, frozen_features
from sgmae_training.data.images import decode_image, eval_transform, image_processor_for
from sgmae_training.evaluation import METRIC_PATH, gather_samples, knn_scores
from sgmae_training.optim import layer_decay_groups

SCRIPT = REPO_ROOT / "run_classification.py"
METRIC = str(METRIC_PATH)
EVAL_SAMPLES = 27  # not a multiple of 2 processes x eval batch 4: the shards end unevenly

_spec = importlib.util.spec_from_file_location("run_classification", SCRIPT)
rc = sys.modules["run_classification"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rc)


# ----- helpers -------------------------------------------------------------------------------------------------------
launch = partial(launch_script, SCRIPT)


def common_args(dataset: Path, output: Path, protocol: str, model: Path, *extra: str) -> list[str]:
    return [
        "--protocol", protocol, "--dataset_name", str(dataset), "--model_name_or_path", str(model),
        "--output_dir", str(output), "--max_train_samples", "64", "--max_eval_samples", str(EVAL_SAMPLES),
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4", "--dataloader_num_workers", "0",
        "--logging_steps", "2", "--seed", "1", "--save_predictions", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny SG-MAE pre-training checkpoint (random weights)."""
    path = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    SGMAEForPreTraining(tiny_config()).save_pretrained(path)
    return path


def eval_rows(dataset_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The first EVAL_SAMPLES validation images, as the script's evaluation sees them."""
    data = datasets.load_dataset(str(dataset_dir), split="test").select(range(EVAL_SAMPLES))
    data = data.cast_column("img", datasets.Image(decode=False))
    transform = eval_transform(image_processor_for(tiny_config()))
    pixels = torch.stack([transform(decode_image(row["img"])) for row in data])
    return pixels, torch.tensor(data["label"])


def check_direct_predictions(output: Path, dataset_dir: Path) -> dict:
    """The saved classifier, run here in one process on all validation images, agrees with the run's evaluation:
    every sample once, the same predictions, and the shipped metric's accuracy equals torch's."""
    results = json.loads((output / "eval_results.json").read_text())
    predictions = json.loads((output / "eval_predictions.json").read_text())
    assert results["eval_samples"] == results["eval_expected_samples"] == EVAL_SAMPLES
    assert results["eval_duplicates_dropped"] == 0
    assert predictions["index"] == list(range(EVAL_SAMPLES))
    model = SGMAEForImageClassification.from_pretrained(output).eval()
    pixels, labels = eval_rows(dataset_dir)
    with torch.no_grad():
        logits = model(pixels).logits
    assert predictions["label"] == labels.tolist()
    assert predictions["prediction"] == logits.argmax(1).tolist()
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    assert results["eval_top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert results["eval_top5"] == pytest.approx(top5)
    return results


def card_metadata(output: Path) -> dict:
    text = (output / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


# ----- end to end ----------------------------------------------------------------------------------------------------
def test_finetune_end_to_end_resumes_exactly_and_answers_through_a_pipeline(image_dataset_dir, pretrained, tmp_path):
    ft_args = ["--num_train_epochs", "2", "--base_learning_rate", "0.05", "--layer_decay", "0.75"]
    ft_args += ["--max_grad_norm", "1"]
    straight = tmp_path / "straight"
    result = launch(common_args(image_dataset_dir, straight, "finetune", pretrained, *ft_args))
    log = result.stderr + result.stdout
    assert "fine-tuning 16 steps (2 epochs of 8 steps), global batch 8" in log
    assert "layer decay 0.75, drop path 0.1" in log
    results = check_direct_predictions(straight, image_dataset_dir)
    assert results["protocol"] == "finetune" and results["num_processes"] == 1 and results["pooling"] == "mean"
    assert results["step"] == results["total_steps"] == 16 and results["epoch"] == 2
    assert results["samples_seen"] == 2 * 64
    assert sorted(path.name for path in straight.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-8"]
    last_checkpoint = SGMAEForImageClassification.from_pretrained(straight / "checkpoint-16").state_dict()
    for key, tensor in SGMAEForImageClassification.from_pretrained(straight).state_dict().items():
        torch.testing.assert_close(last_checkpoint[key], tensor, rtol=0, atol=0, msg=key)

    config = json.loads((straight / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(CLASS_NAMES)}
    assert config["drop_path_rate"] == 0.1 and config["classifier_pooling"] == "mean"
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_sgmae.SGMAEForImageClassification"
    assert (straight / "preprocessor_config.json").is_file() and (straight / "masking_sgmae.py").is_file()
    metadata = card_metadata(straight)
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-classification"
    assert metadata["datasets"] == [image_dataset_dir.name]
    index = metadata["model-index"][0]["results"][0]
    assert index["task"]["type"] == "image-classification" and index["dataset"]["split"] == "test"
    assert [metric["value"] for metric in index["metrics"]] == [
        round(results["eval_top1"], 4),
        round(results["eval_top5"], 4),
    ]

    # a run killed after epoch 1 and resumed (here by plain python) ends with the same weights and results
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-8", resumed / "checkpoint-8")
    resume_args = [*ft_args, "--resume_from_checkpoint", "latest"]
    result = launch(common_args(image_dataset_dir, resumed, "finetune", pretrained, *resume_args), plain_python=True)
    assert "resumed from" in result.stderr + result.stdout
    resumed_weights = load_file(resumed / "model.safetensors")
    for key, tensor in load_file(straight / "model.safetensors").items():
        torch.testing.assert_close(resumed_weights[key], tensor, rtol=0, atol=0, msg=key)
    assert json.loads((resumed / "eval_results.json").read_text()) == results

    # the folder answers both pipelines in a fresh process that cannot import the repository
    report = check_folder_in_fresh_process(straight, tmp_path)
    assert sorted(item["label"] for item in report["scores"]) == sorted(CLASS_NAMES)


def test_linear_probe_with_two_processes_counts_each_sample_once_and_folds_exactly(
    image_dataset_dir, pretrained, tmp_path
):
    output = tmp_path / "probe"
    result = launch(
        common_args(image_dataset_dir, output, "linear_probe", pretrained, "--num_train_epochs", "4"),
        num_processes=2,
    )
    log = result.stderr + result.stdout
    assert "linear probe: 16 steps of batch 16 on 64 features" in log
    results = check_direct_predictions(output, image_dataset_dir)
    assert results["num_processes"] == 2 and results["train_features"] == 64
    assert results["pooling"] == "cls" and results["epoch"] == 4
    # the folded Linear predicts what BatchNorm + Linear predicted on the cached features
    assert results["probe_agreement"] == 1.0 and results["probe_eval_top1"] == results["eval_top1"]
    config = json.loads((output / "config.json").read_text())
    assert config["classifier_pooling"] == "cls" and config["drop_path_rate"] == 0.0
    weights = load_file(output / "model.safetensors")
    assert not any(key.startswith("fc_norm") for key in weights)
    # the encoder stayed frozen
    encoder = load_file(pretrained / "model.safetensors")
    for key in ("vit.layers.0.attention.qkv.weight", "vit.embeddings.cls_token", "vit.layernorm.weight"):
        torch.testing.assert_close(weights[key], encoder[key], rtol=0, atol=0)
    assert card_metadata(output)["model-index"][0]["results"][0]["metrics"][0]["value"] == round(
        results["eval_top1"], 4
    )


def test_frozen_scores_both_poolings_as_knn_and_the_probe_do_from_one_feature_pass(
    image_dataset_dir, pretrained, tmp_path
):
    logs = {}

    def run(protocol: str, *extra: str) -> dict:
        output = tmp_path / f"{protocol}{'-'.join(extra)}"
        arguments = common_args(image_dataset_dir, output, protocol, pretrained, "--num_train_epochs", "3", *extra)
        arguments.remove("--save_predictions")
        result = launch(arguments, plain_python=True)
        logs[protocol] = result.stdout + result.stderr
        return json.loads((output / "eval_results.json").read_text())

    frozen = run("frozen")
    assert frozen["pooling"] == "cls,mean" and frozen["eval_samples"] == EVAL_SAMPLES
    assert frozen["train_features"] == 64
    knn_cls = run("knn", "--probe_pooling", "cls")
    probe_mean = run("linear_probe", "--probe_pooling", "mean")
    assert frozen["cls_knn_top1"] == pytest.approx(knn_cls["eval_top1"], abs=1e-9)
    assert frozen["cls_knn_top5"] == pytest.approx(knn_cls["eval_top5"], abs=1e-9)
    assert frozen["mean_linear_probe_top1"] == pytest.approx(probe_mean["probe_eval_top1"], abs=1e-9)
    for pooling in ("cls", "mean"):
        for protocol in ("knn", "linear_probe"):
            assert 0.0 <= frozen[f"{pooling}_{protocol}_top1"] <= frozen[f"{pooling}_{protocol}_top5"] <= 1.0
    # no model and no probe checkpoint is saved, and the log says so in few lines (no checkpoint lines)
    assert sorted(path.name for path in (tmp_path / "frozen").iterdir()) == ["eval_results.json"]
    assert "Saving current state" not in logs["frozen"] and "checkpoint" not in logs["frozen"]
    # kNN and frozen never use the classifier head: no "MISSING ... consider training" report of it
    assert "LOAD REPORT" not in logs["frozen"] + logs["knn"] and "LOAD REPORT" in logs["linear_probe"]
    assert "for comparison, chance on 10 classes: top-1 0.100, top-5 0.500" in logs["knn"]


def test_knn_end_to_end_on_a_transformers_vit_mae_checkpoint(image_dataset_dir, tmp_path):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    checkpoint = tmp_path / "vit-mae"
    vit_config = ViTMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=4, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )  # fmt: skip
    ViTMAEForPreTraining(vit_config).save_pretrained(checkpoint)
    output = tmp_path / "knn"
    launch(common_args(image_dataset_dir, output, "knn", checkpoint, "--knn_k", "5", "--probe_pooling", "mean"))
    results = json.loads((output / "eval_results.json").read_text())
    assert results["protocol"] == "knn" and results["knn_k"] == 5 and results["pooling"] == "mean"
    assert results["eval_samples"] == EVAL_SAMPLES and results["train_features"] == 64
    assert 0.0 <= results["eval_top1"] <= results["eval_top5"] <= 1.0
    predictions = json.loads((output / "eval_predictions.json").read_text())
    assert predictions["index"] == list(range(EVAL_SAMPLES))
    assert sorted(path.name for path in output.iterdir()) == ["eval_predictions.json", "eval_results.json"]


# ----- pieces --------------------------------------------------------------------------------------------------------
def test_shipped_metric_matches_torch_top1_and_top5():
    metric = evaluate.load(METRIC)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 10, generator=generator)
    labels = torch.randint(0, 10, (300,), generator=generator)
    results = metric.compute(predictions=logits.numpy(), references=labels.numpy())
    top1 = (logits.argmax(1) == labels).float().mean().item()
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    assert results == {"accuracy": pytest.approx(top1), "top5_accuracy": pytest.approx(top5)}
    assert metric.compute(predictions=logits.argmax(1).tolist(), references=labels.tolist()) == {
        "accuracy": pytest.approx(top1)
    }
    assert metric.compute(predictions=[[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], references=[2, 0], top_k=[2, 3]) == {
        "accuracy": 0.5,
        "top2_accuracy": 1.0,
        "top3_accuracy": 1.0,
    }


def test_knn_votes_recover_classes_that_the_features_separate():
    generator = torch.Generator().manual_seed(0)
    num_classes, width = 10, 16
    centres = torch.randn(num_classes, width, generator=generator)
    train_labels = torch.arange(200) % num_classes
    test_labels = torch.randint(0, num_classes, (100,), generator=generator)
    train = centres[train_labels] + 0.1 * torch.randn(200, width, generator=generator)
    test = centres[test_labels] + 0.1 * torch.randn(100, width, generator=generator)
    scores = knn_scores(train, train_labels, test, num_classes, k=20, temperature=0.07, chunk_size=16)
    assert scores.shape == (100, num_classes)
    assert evaluate.load(METRIC).compute(predictions=scores.numpy(), references=test_labels.numpy())["accuracy"] == 1
    # DINO's weights: each of the k neighbours votes exp(cosine / T) for its class
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    votes = knn_scores(bank, torch.tensor([0, 1, 1]), torch.tensor([[2.0, 0.0]]), 2, k=2, temperature=0.5)
    torch.testing.assert_close(votes, torch.tensor([[torch.e**2, torch.e ** (2**-0.5 / 0.5)]]))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_folded_probe_reproduces_batchnorm_plus_linear_after_saving(pooling, tmp_path):
    model = SGMAEForImageClassification(tiny_config(classifier_pooling=pooling, num_labels=10)).eval()
    norm = torch.nn.BatchNorm1d(32, affine=False, eps=1e-6).eval()
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.1, 3.0)
    linear = torch.nn.Linear(32, 10)
    pixels = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected = linear(norm(frozen_features(model, pixels)))
        fold_probe(model, norm, linear)
        model.save_pretrained(tmp_path)
        reloaded = SGMAEForImageClassification.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded(pixels).logits, expected, rtol=1e-4, atol=1e-5)


def test_layer_decay_scales_the_lr_by_block_depth():
    model = SGMAEForImageClassification(tiny_config(num_labels=10, num_hidden_layers=3))
    groups = layer_decay_groups(model, base_lr=1.0, weight_decay=0.05, decay=0.5)
    lr_of = {id(p): (group["lr"], group["weight_decay"]) for group in groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["vit.embeddings.patch_embeddings.projection.weight"])] == (0.5**4, 0.05)
    assert lr_of[id(named["vit.embeddings.cls_token"])] == (0.5**4, 0.0)
    assert lr_of[id(named["vit.layers.0.mlp.fc1.weight"])] == (0.5**3, 0.05)
    assert lr_of[id(named["vit.layers.2.attention.qkv.bias"])] == (0.5, 0.0)
    assert lr_of[id(named["classifier.weight"])] == (1.0, 0.05)
    assert lr_of[id(named["fc_norm.weight"])] == (1.0, 0.0)
    assert "vit.embeddings.position_embeddings" not in {n for n, p in named.items() if id(p) in lr_of}
    assert sum(len(group["params"]) for group in groups) == sum(p.requires_grad for p in model.parameters())


def test_gathered_predictions_drop_padding_and_duplicates():
    from accelerate import Accelerator

    accelerator = Accelerator()  # as main() builds it: one process here
    local = {"index": torch.tensor([3, 1, 3, 0]), "values": torch.arange(8.0).view(4, 2), "labels": torch.zeros(4)}
    gathered = gather_samples(accelerator, local)
    assert gathered["index"].tolist() == [0, 1, 3]
    assert gathered["values"].tolist() == [[6.0, 7.0], [2.0, 3.0], [0.0, 1.0]]


# ----- bad input -----------------------------------------------------------------------------------------------------
def run_main(monkeypatch, *args: str) -> str:
    """main() in this process; returns the SystemExit message (errors must come before any training)."""
    monkeypatch.setattr(sys, "argv", ["run_classification.py", *args])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SystemExit) as raised:
        rc.main()
    return str(raised.value.code)


def test_bad_input_ends_in_a_clear_error(image_dataset_dir, pretrained, tmp_path, monkeypatch):
    def args(**changes: str) -> list[str]:
        values = {"protocol": "knn", "dataset_name": str(image_dataset_dir), "model_name_or_path": str(pretrained)}
        values |= {"output_dir": str(tmp_path / "out"), "max_train_samples": "8", "max_eval_samples": "4"}
        values |= changes
        return [item for key, value in values.items() for item in (f"--{key}", value)]

    message = run_main(monkeypatch, *args(protocol="fine_tune"))
    assert message.startswith("error: unknown --protocol 'fine_tune'") and "linear_probe" in message
    message = run_main(monkeypatch, *args(ddp_timeout="0"))
    assert message == "error: --ddp_timeout must be a positive integer, got 0"
    message = run_main(monkeypatch, *args(protocol="frozen", resume_from_checkpoint="latest"))
    assert message.startswith("error: --protocol frozen keeps no checkpoints to resume from")
    message = run_main(monkeypatch, *args(push_to_hub="true"))
    assert message.startswith("error: --push_to_hub needs --hub_model_id")
    message = run_main(monkeypatch, *args(label_column="fine_label"))
    assert message.startswith("error: label column 'fine_label' not in the dataset")
    message = run_main(monkeypatch, *args(dataset_name=str(tmp_path / "no-such-dataset")))
    assert (
        message
        == f"error: cannot load split 'train' of {str(tmp_path / 'no-such-dataset')!r}: no such folder: "
        + str(tmp_path / "no-such-dataset")
    )
    not_a_model = tmp_path / "bert"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    message = run_main(monkeypatch, *args(model_name_or_path=str(not_a_model)))
    assert message.startswith("error:") and "'bert' checkpoint" in message and "ViTMAE" in message
    message = run_main(monkeypatch, *args(model_name_or_path=str(tmp_path / "empty")))
    assert message.startswith("error: cannot read a model configuration") and "no such file or folder" in message
    evaluation = tmp_path / "eval-knn"  # what --protocol knn leaves: results, no model
    evaluation.mkdir()
    (evaluation / "eval_results.json").write_text("{}")
    message = run_main(monkeypatch, *args(model_name_or_path=str(evaluation)))
    assert "has no config.json, so it is not a model folder: it is an evaluation's output folder" in message
    yaml_file = tmp_path / "args.yaml"
    yaml_file.write_text(yaml.safe_dump({"protocol": "knn", "dataset_name": str(image_dataset_dir)}))
    message = run_main(monkeypatch, str(yaml_file))
    assert message.startswith("error: give --model_name_or_path")
    assert not (tmp_path / "out" / "eval_results.json").exists()
