"""Pre-training with `transformers.Trainer` plus `SGMAETrainerCallback`, as a user of transformers' run_mae.py does."""

from __future__ import annotations

import datasets
import pytest
import torch
from conftest import check_folder_in_fresh_process, tiny_config
from transformers import Trainer, TrainingArguments, ViTImageProcessor

from modeling_sgmae import MaskType, SGMAEForImageClassification, SGMAEForPreTraining, SGMAETrainerCallback


def pixels(num_images: int) -> torch.Tensor:
    return torch.randn(num_images, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def pixel_dataset(num_images: int = 32) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"pixel_values": pixels(num_images).numpy()}).with_format("torch")


def training_arguments(output_dir, **overrides) -> TrainingArguments:
    fields = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=8, learning_rate=1e-3,
        logging_steps=2, save_strategy="no", report_to=[], remove_unused_columns=False, use_cpu=True,
        dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    return TrainingArguments(**(fields | overrides))


def record_mask_types(model: SGMAEForPreTraining) -> list[list[int]]:
    """The mask types of every training forward (probe forwards use given noise and are left out)."""
    seen = []

    def hook(module, args, output):
        if module.training:
            seen.append(output.mask_type.tolist())

    model.register_forward_hook(hook)
    return seen


def test_trainer_crosses_into_informed_masking_and_saves_a_loadable_folder(tmp_path):
    model = SGMAEForPreTraining(tiny_config(informed_masking_start=0.5, informed_mask_source="step"))
    mask_types = record_mask_types(model)
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    probe = pixels(4)
    callback = SGMAETrainerCallback(probe_pixel_values=probe, exploitation_rate_steps=4)
    trainer = Trainer(
        model=model,
        args=training_arguments(tmp_path / "run"),
        train_dataset=pixel_dataset(),
        processing_class=processor,
        callbacks=[callback],
    )
    trainer.train()
    random, informed = [int(MaskType.RANDOM)] * 4, [int(MaskType.INFORMED)] * 4
    assert mask_types == [random] * 4 + [informed] * 4  # informed from step 4 of 8
    assert int(model.schedule.training_step) == 8 and int(model.schedule.total_training_steps) == 8
    checks = [entry for entry in trainer.state.log_history if "exploitation_mask" in entry]
    assert [entry["step"] for entry in checks] == [4, 8]
    assert all(0 < entry["exploitation_mask"] < 1 for entry in checks)

    trainer.save_model(tmp_path / "final")
    report = check_folder_in_fresh_process(tmp_path / "final", tmp_path)
    assert report["features"] == [1, 65, 32] and report["pooled"] == [1, 32]
    reloaded = SGMAEForPreTraining.from_pretrained(tmp_path / "final")
    assert reloaded.informed_masking_active  # the schedule position travels with the weights


def test_gradient_accumulation_logs_the_mean_loss_not_a_multiple():
    """The model's loss is already a mean: Trainer must divide by the accumulation steps, not treat it as a sum."""
    model = SGMAEForPreTraining(tiny_config(mask_strategy="random"))
    with torch.no_grad():
        reference = torch.stack([model(batch).loss for batch in pixels(16).split(4)]).mean()
    args = training_arguments("unused", max_steps=2, gradient_accumulation_steps=2, learning_rate=0.0, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=pixel_dataset(16), callbacks=[SGMAETrainerCallback()])
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for loss in logged:
        assert loss == pytest.approx(float(reference), rel=0.25)  # a summed loss would be twice as large


def test_classifier_under_gradient_accumulation_logs_its_mean_loss():
    """With labels, Trainer counts items and, for a model that takes loss kwargs, skips dividing by accumulation."""
    model = SGMAEForImageClassification(tiny_config(num_labels=3))
    labels = torch.arange(16) % 3
    with torch.no_grad():
        reference = model(pixels(16), labels=labels).loss
    data = datasets.Dataset.from_dict({"pixel_values": pixels(16).numpy(), "labels": labels}).with_format("torch")
    args = training_arguments("unused", max_steps=2, gradient_accumulation_steps=2, learning_rate=0.0, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [pytest.approx(float(reference), rel=0.1)] * 2


def test_callback_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ValueError, match="probe_pixel_values and exploitation_rate_steps"):
        SGMAETrainerCallback(exploitation_rate_steps=5)
    auto = SGMAEForPreTraining(tiny_config(informed_masking_auto_start=True))
    trainer = Trainer(model=auto, args=training_arguments(tmp_path), train_dataset=pixel_dataset(8))
    trainer.add_callback(SGMAETrainerCallback())
    with pytest.raises(ValueError, match="informed_masking_auto_start waits for exploitation-rate checks"):
        trainer.train()
    classifier = SGMAEForImageClassification(tiny_config(num_labels=2))
    trainer = Trainer(model=classifier, args=training_arguments(tmp_path), train_dataset=pixel_dataset(8))
    trainer.add_callback(SGMAETrainerCallback())
    with pytest.raises(TypeError, match="needs an SGMAEForPreTraining"):
        trainer.train()
    with pytest.raises(ValueError, match="needs both mask_cache and whole_images"):
        SGMAETrainerCallback(mask_cache=auto.mask_ranking_cache(8, refresh_steps=1))


def test_trainer_without_a_cache_says_so_before_the_first_step_and_ranks_each_batch(tmp_path, caplog):
    """The default cached source with the plain callback: one warning before training, then per-step informed masks
    (no error once they are due), and the model's own one-time warning is not repeated at every step."""
    model = SGMAEForPreTraining(tiny_config(informed_masking_start=0.5))
    seen = record_mask_types(model)
    trainer = Trainer(
        model=model, args=training_arguments(tmp_path), train_dataset=pixel_dataset(32),
        callbacks=[SGMAETrainerCallback()],
    )  # fmt: skip
    with caplog.at_level("WARNING"):
        trainer.train()
    no_cache = [record for record in caplog.records if "no mask cache given" in record.getMessage()]
    assert len(no_cache) == 1 and "\n" not in no_cache[0].getMessage()
    assert seen == [[int(MaskType.RANDOM)] * 4] * 4 + [[int(MaskType.INFORMED)] * 4] * 4
    assert sum("no mask_scores were given" in record.getMessage() for record in caplog.records) <= 1


def test_trainer_masks_by_whole_image_rankings_refreshed_on_schedule(tmp_path):
    """The cached source under Trainer: the cache is refreshed when informed masks start, and each batch's masks are
    the top K of its images' rankings (full-image views here, so no crop changes them)."""
    model = SGMAEForPreTraining(tiny_config(informed_masking_start=0.5, hint_ratio=0.0))
    images = pixels(16)
    crops = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]).expand(16, -1)
    dataset = datasets.Dataset.from_dict(
        {"pixel_values": images.numpy(), "crops": crops.numpy(), "index": list(range(16))}
    ).with_format("torch")
    cache = model.mask_ranking_cache(16, refresh_steps=100)
    whole_images = lambda: iter([{"pixel_values": images, "index": torch.arange(16)}])  # noqa: E731
    masks = SGMAETrainerCallback(mask_cache=cache, whole_images=whole_images)
    seen = []
    model.register_forward_hook(lambda module, args, output: seen.append(output) if module.training else None)
    args = training_arguments(tmp_path / "run", learning_rate=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=masks.collate, callbacks=[masks])
    trainer.train()
    assert cache.refreshed_at == 4  # at the informed-masking start, before its batches were collated
    assert [entry["step"] for entry in trainer.state.log_history if "mask_refresh_seconds" in entry] == [4]
    assert [output.mask_type.tolist() for output in seen] == [[int(MaskType.RANDOM)] * 4] * 4 + [
        [int(MaskType.INFORMED)] * 4
    ] * 4
    expected = model.eval().informed_mask_scores(images)  # learning rate 0: the weights the refresh saw
    ranked = sorted(tuple(row.topk(48).indices.sort().values.tolist()) for row in expected)
    masked = sorted(tuple(row.nonzero().flatten().tolist()) for output in seen[4:] for row in output.mask)
    assert masked == ranked  # each image's informed mask is its own top K, every image once (one epoch of 16)

    with pytest.raises(ValueError, match="dataloader_num_workers=0"):
        Trainer(
            model=model, args=training_arguments(tmp_path / "workers", dataloader_num_workers=1),
            train_dataset=dataset, data_collator=masks.collate, callbacks=[masks],
        ).train()  # fmt: skip
