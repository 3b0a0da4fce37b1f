"""Tests of the analysis toolkit: known answers on constructed inputs, real values on a tiny model, and the CLI."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, tiny_config
from PIL import Image

from modeling_sgmae import MaskType, SGMAEForPreTraining
from modeling_sgmae.analysis import (
    MAE_IMAGE_MEAN,
    MAE_IMAGE_STD,
    analysis_metrics,
    attention_distance,
    centre_patches,
    feature_statistics,
    figure_panel,
    full_image_encoding,
    predicted_pixel_values,
    unnormalize,
    visible_patch_statistics,
)
from modeling_sgmae.configuration_sgmae import num_masked_patches
from modeling_sgmae.masking_sgmae import SelfGuidedMasking, ncut_bipartition
from modeling_sgmae.modeling_sgmae import exploitation_rates
from sgmae_training.analyze import PANEL_LEGEND, load_image_processor, save_figure_panel
from sgmae_training.analyze import main as analysis_main

GRID = (8, 8)  # the tiny config: 32 px images, 4 px patches
METRIC_KEYS = {
    "num_images",
    "training_step",
    "informed_masking_active",
    "feature_layer",
    "graph_edges",
    "fiedler_solver",
    "foreground_rule",
    "feature_variance",
    "similarity_variance",
    "bipartition_gap",
    "bipartition_cosine_gap",
    "object_part_size",
    "object_part_fraction",
    "informed_mask_centre_share",
    "edge_density",
    "num_images_without_cut",
    "attention_distance",
    "exploitation_rate_visible",
    "exploitation_rate_mask",
    "reconstruction_loss",
    "probe_seed",
    "mask_feature_source",
    "feature_centering",
    "partition_split",
    "object_part_fraction_median",
    "object_part_fraction_q25",
    "object_part_fraction_q75",
    "half_cut_share",
    "one_sided_part_share",
    "object_centre_share",
    "part_overlap",
    "part_overlap_chance",
    "position_share",
    "same_position_cosine",
    "within_image_cosine",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny batched matmuls are far slower with 2 contending OpenMP threads than with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model() -> SGMAEForPreTraining:
    return SGMAEForPreTraining(tiny_config()).eval()


def _probe_images(batch_size: int = 6) -> torch.Tensor:
    """Normalised images with a bright square on a dark background, so the features have something to cut."""
    images = torch.full((batch_size, 3, 32, 32), -1.5)
    for index in range(batch_size):
        top = 2 + 3 * index
        images[index, index % 3, top : top + 14, 6:20] = 2.0
    return images + 0.1 * torch.randn_like(images)


# ----- feature statistics -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["power", "eigh"])
def test_two_orthogonal_groups_give_the_maximal_gap_and_the_right_parts(solver):
    config = tiny_config(fiedler_solver=solver)
    num_patches, group_size = 64, 20
    group = torch.zeros(2, num_patches, dtype=torch.bool)
    group[0, :group_size] = True  # a block of patches ...
    group[1, torch.randperm(num_patches)[:group_size]] = True  # ... and a scattered one
    features = torch.zeros(2, num_patches, 8)
    features[..., 0] = group.float() * 3.0  # unnormalised on purpose: the statistics normalise
    features[..., 1] = (~group).float()

    stats = feature_statistics(features, config)

    assert stats.has_cut.all()
    assert torch.equal(stats.object_part, group)  # both rules pick the smaller, more extreme group
    assert stats.object_part_size.tolist() == [group_size, group_size]
    # weights are 1 + eps within the groups and eps across them: the gap takes its maximum, 1
    torch.testing.assert_close(stats.bipartition_gap, torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.cosine_gap, torch.ones(2), atol=1e-5, rtol=0)
    # sigma_F = 1 - |mean f|^2; S has a share p of ones and the rest zeros, so sigma_s = p (1 - p)
    share = (group_size**2 + (num_patches - group_size) ** 2) / num_patches**2
    torch.testing.assert_close(stats.feature_variance, torch.full((2,), 1 - share))
    torch.testing.assert_close(stats.similarity_variance, torch.full((2,), share * (1 - share)))
    other = num_patches - group_size
    real_edges = (group_size * (group_size - 1) + other * (other - 1)) / (num_patches * (num_patches - 1))
    assert stats.edge_density.tolist() == pytest.approx([real_edges] * 2)


def test_centre_patches_are_the_middle_half_of_rows_and_columns():
    assert centre_patches(GRID).view(GRID).nonzero().tolist() == [[r, c] for r in range(2, 6) for c in range(2, 6)]
    assert centre_patches((4, 6)).view(4, 6).nonzero().tolist() == [[r, c] for r in (1, 2) for c in range(1, 5)]


def test_the_centre_share_says_whether_informed_masks_hide_the_middle_of_the_image():
    centre = centre_patches(GRID)
    corner = torch.zeros(GRID, dtype=torch.bool)
    corner[:4, :4] = True  # an object of the same size (16 patches) in the top-left corner
    objects = torch.stack([centre, corner.flatten()])
    features = torch.stack([objects.float(), (~objects).float()], dim=-1)

    # 16 of 64 patches masked: exactly the object part (the smaller, more extreme NCut part)
    stats = feature_statistics(features, tiny_config(mask_ratio=0.25))

    assert torch.equal(stats.object_part, objects)
    assert stats.centre_masked_share.tolist() == [1.0, 4 / 16]  # the corner block overlaps the centre in 2 x 2


def test_identical_features_have_zero_variance_and_no_cut():
    features = torch.randn(1, 1, 16).expand(3, 64, 16)
    stats = feature_statistics(features, tiny_config())

    torch.testing.assert_close(stats.feature_variance, torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats.similarity_variance, torch.zeros(3), atol=1e-6, rtol=0)
    assert not stats.has_cut.any()
    assert stats.bipartition_gap.isnan().all() and (stats.object_part_size == -1).all()
    summary = stats.summary()
    assert summary["feature_variance"] == pytest.approx(0.0, abs=1e-6)
    assert summary["bipartition_gap"] is None and summary["num_images_without_cut"] == 3
    json.dumps(summary, allow_nan=False)


def test_bipartition_is_the_one_the_training_masking_uses(model):
    features, _, _ = full_image_encoding(model, _probe_images(), model.config.feature_layer)
    unit = torch.nn.functional.normalize(features, dim=-1)
    cut = ncut_bipartition(unit, model.config)
    result = SelfGuidedMasking(model.config)(features, num_masked_patches(64, 0.75))

    assert cut.has_cut.any()
    assert torch.equal(cut.has_cut, result.object_part_size >= 0)
    assert torch.equal(cut.object_part & cut.has_cut[:, None], result.object_part)
    torch.testing.assert_close(cut.edge_density, result.edge_density)


# ----- attention distance -----------------------------------------------------------------------------------------


def test_attention_distance_identity_is_zero_and_uniform_is_the_mean_pairwise_distance():
    patch_size, num_patches = 4, GRID[0] * GRID[1]
    identity = torch.eye(1 + num_patches).expand(2, 3, -1, -1)
    uniform = torch.full((2, 3, 1 + num_patches, 1 + num_patches), 1 / (1 + num_patches))

    distances = attention_distance((identity, uniform), GRID, patch_size)

    cells = list(itertools.product(range(GRID[0]), range(GRID[1])))
    expected = sum(math.dist(a, b) for a in cells for b in cells) / len(cells) ** 2 * patch_size
    assert distances[0].item() == pytest.approx(0.0, abs=1e-6)
    assert distances[1].item() == pytest.approx(expected, rel=1e-5)


def test_attention_distance_of_attention_to_the_right_neighbour():
    num_patches = GRID[0] * GRID[1]
    weights = torch.zeros(1, 1, 1 + num_patches, 1 + num_patches)
    weights[0, 0, 0, 0] = 1.0  # [CLS] is left out
    for query in range(num_patches):
        row, col = divmod(query, GRID[1])
        key = row * GRID[1] + (col + 1 if col + 1 < GRID[1] else col - 1)
        weights[0, 0, 1 + query, 0] = 0.5  # attention to [CLS] does not count ...
        weights[0, 0, 1 + query, 1 + key] = 0.5  # ... the rest is renormalised over the patches
    assert attention_distance((weights,), GRID, patch_size=16).item() == pytest.approx(16.0)


def test_attention_distance_rejects_maps_of_another_grid():
    with pytest.raises(ValueError, match="grid"):
        attention_distance((torch.ones(1, 1, 50, 50),), GRID, 4)


# ----- exploitation rates -----------------------------------------------------------------------------------------


def test_exploitation_rates_of_a_constructed_attention_map():
    mask = torch.tensor([[True, True, False, False]])  # patches 0, 1 masked; tokens: [CLS], p0, p1, p2, p3
    weights = torch.zeros(1, 2, 5, 5)
    weights[0, 0, 1:3] = torch.tensor([0.1, 0.3, 0.4, 0.1, 0.1])  # head 0: 0.7 on mask tokens
    weights[0, 1, 1:3] = torch.tensor([0.5, 0.0, 0.1, 0.2, 0.2])  # head 1: 0.1 on mask tokens
    weights[0, :, 3:] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])  # visible queries do not count
    weights[0, :, 0] = 0.2

    rates = exploitation_rates((weights, weights.flip(1)), mask)

    torch.testing.assert_close(rates, torch.tensor([[0.6, 0.4], [0.6, 0.4]]))


def test_exploitation_rates_match_the_model_method_without_its_side_effects(model):
    images, noise = _probe_images(4), torch.rand(4, 64)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    output = model(images, noise=noise, output_decoder_attentions=True)

    rates = exploitation_rates(output.decoder_attentions, output.mask)
    assert all(torch.equal(buffer, buffers[name]) for name, buffer in model.named_buffers())

    torch.testing.assert_close(rates, model.record_exploitation_rates(images, noise=noise))
    assert not torch.equal(model.schedule.last_check, buffers["schedule.last_check"])  # the method does record


# ----- all metrics ------------------------------------------------------------------------------------------------


def test_analyse_reports_finite_metrics_in_range_and_leaves_the_model_as_found(model):
    config = model.config
    model.train()
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    images = _probe_images(6)

    metrics = analysis_metrics(model, images, batch_size=4)

    assert model.training
    assert all(torch.equal(buffer, buffers[name]) for name, buffer in model.named_buffers())
    json.dumps(metrics, allow_nan=False)
    assert set(metrics) == METRIC_KEYS
    assert metrics["num_images"] == 6 and metrics["feature_layer"] == config.num_hidden_layers
    assert 0 < metrics["feature_variance"] <= 1 and 0 < metrics["similarity_variance"] <= 1
    assert 0 < metrics["bipartition_gap"] <= 1 and -2 <= metrics["bipartition_cosine_gap"] <= 2
    assert 0 < metrics["object_part_fraction"] < 1 and 0 <= metrics["edge_density"] <= 1
    assert metrics["object_part_size"] == pytest.approx(metrics["object_part_fraction"] * 64)
    largest = math.hypot(GRID[0] - 1, GRID[1] - 1) * config.patch_size
    assert len(metrics["attention_distance"]) == config.num_hidden_layers
    assert all(0 < distance < largest for distance in metrics["attention_distance"])
    visible, masked = metrics["exploitation_rate_visible"], metrics["exploitation_rate_mask"]
    assert len(visible) == len(masked) == config.decoder_num_hidden_layers
    assert all(0 < v < 1 and v + m == pytest.approx(1.0) for v, m in zip(visible, masked, strict=True))
    assert math.isfinite(metrics["reconstruction_loss"]) and metrics["reconstruction_loss"] > 0

    # the chunking does not change the numbers, and the probe masks are fixed by the seed
    whole = analysis_metrics(model, images, batch_size=64)
    for key in ("feature_variance", "bipartition_gap", "reconstruction_loss"):
        assert whole[key] == pytest.approx(metrics[key], rel=1e-4)
    assert whole["attention_distance"] == pytest.approx(metrics["attention_distance"], rel=1e-4)
    assert whole["exploitation_rate_mask"] == pytest.approx(metrics["exploitation_rate_mask"], rel=1e-4)


# ----- figure panel -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_a_perfect_prediction_reconstructs_the_input(norm_pix_loss):
    model = SGMAEForPreTraining(tiny_config(norm_pix_loss=norm_pix_loss))
    images = _probe_images(2)
    target = model.patchify(images)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    torch.testing.assert_close(predicted_pixel_values(model, target, images), images, atol=1e-4, rtol=1e-4)


def test_visible_statistics_interpolate_the_visible_patches_and_never_read_a_hidden_one():
    # a 1 x 4 grid of 2-value patches: the first and last visible, the two in the middle masked
    patches = torch.tensor([[[0.0, 2.0], [50.0, 90.0], [-7.0, 7.0], [10.0, 10.0]]])
    mask = torch.tensor([[False, True, True, False]])
    mean, std = visible_patch_statistics(patches, mask, (1, 4))

    own_mean, own_std = patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6) ** 0.5
    torch.testing.assert_close(mean[:, [0, 3]], own_mean[:, [0, 3]])
    torch.testing.assert_close(std[:, [0, 3]], own_std[:, [0, 3]])
    # patch 1 is 1 patch from the first (mean 1) and 2 from the last (mean 10): weights 1 and 1/4
    torch.testing.assert_close(mean[0, 1, 0], torch.tensor((1.0 + 10.0 / 4) / 1.25))
    torch.testing.assert_close(mean[0, 2, 0], torch.tensor((1.0 / 4 + 10.0) / 1.25))
    hidden_changed = patches.clone()
    hidden_changed[:, 1:3] = torch.randn(2, 2) * 100
    for ours, theirs in zip((mean, std), visible_patch_statistics(hidden_changed, mask, (1, 4)), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_a_reconstruction_from_visible_statistics_is_the_input_where_visible_and_blind_where_masked():
    model = SGMAEForPreTraining(tiny_config(norm_pix_loss=True))
    images = _probe_images(2)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, 16:40] = True  # rows 2-4 of the 8 x 8 patch grid
    target = model.patchify(images)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    reconstruction = model.patchify(predicted_pixel_values(model, target, images, mask))

    torch.testing.assert_close(reconstruction[~mask], model.patchify(images)[~mask], atol=1e-4, rtol=1e-4)
    changed = images.clone()
    changed[:, :, 8:20] += 3.0  # the pixels of those rows only
    assert torch.equal(model.patchify(changed)[~mask], model.patchify(images)[~mask])
    torch.testing.assert_close(model.patchify(predicted_pixel_values(model, target, changed, mask)), reconstruction)


def test_figure_panel_reports_what_the_masking_saw(model):
    images = _probe_images(3)
    panel = figure_panel(model, images, seed=5)
    generator = torch.Generator().manual_seed(5)
    patch_tokens, cls_token, _ = model.vit.embeddings(images)
    masking = model.informed_masking(patch_tokens, cls_token, generator)
    features, _, _ = full_image_encoding(model, images, model.config.feature_layer)
    statistics = feature_statistics(features, model.config)

    assert set(panel.mask_type) <= {int(MaskType.INFORMED), int(MaskType.FALLBACK)}
    np.testing.assert_array_equal(panel.mask_type, masking.mask_type.numpy())
    np.testing.assert_array_equal(panel.object_part_size, masking.object_part_size.numpy())
    np.testing.assert_allclose(panel.edge_density, masking.edge_density.numpy())
    np.testing.assert_allclose(panel.centre_masked_share, statistics.centre_masked_share.numpy(), equal_nan=True)
    # visible statistics change only how the predicted patches are de-normalised
    honest = figure_panel(model, images, seed=5, visible_statistics=True)
    for name, column in panel.columns.items():
        assert np.array_equal(honest.columns[name], column) == (name != "reconstruction"), name


def test_figure_panel_columns_and_png(model, tmp_path):
    images = _probe_images(3)
    panel = figure_panel(model, images, MAE_IMAGE_MEAN, MAE_IMAGE_STD)

    assert list(panel.columns) == [
        "input",
        "random mask",
        "NCut bi-partition",
        "informed mask",
        "informed + hints",
        "reconstruction",
    ]
    for column in panel.columns.values():
        assert column.shape == (3, 32, 32, 3) and column.min() >= 0 and column.max() <= 1
    np.testing.assert_allclose(panel.columns["input"], unnormalize(images, MAE_IMAGE_MEAN, MAE_IMAGE_STD))
    # masked patches are greyed: with 75% masked most of the informed column differs from the input
    changed = (panel.columns["informed mask"] != panel.columns["input"]).any(axis=-1).mean(axis=(1, 2))
    np.testing.assert_allclose(changed, 0.75, atol=0.02)
    # visible patches of the reconstruction are the input's; the masked ones are predicted
    recon_differs = (panel.columns["reconstruction"] != panel.columns["input"]).any(axis=-1).mean(axis=(1, 2))
    assert (recon_differs <= 0.75 + 1e-6).all() and (recon_differs > 0.5).all()
    assert panel.has_cut.dtype == bool and panel.has_cut.shape == (3,)
    assert panel.grid().shape == (3 * 32, 6 * 32, 3) and panel.grid().dtype == np.uint8

    path = tmp_path / "panel.png"
    panel.save(path, cell_inches=1.5, dpi=100)
    assert Image.open(path).size == (6 * 150, 3 * 150 + 30)


# ----- command line -----------------------------------------------------------------------------------------------


def test_cli_names_a_missing_image_column(model, image_dataset_dir, tmp_path):
    model.save_pretrained(tmp_path / "model")
    arguments = ["--model", str(tmp_path / "model"), "--dataset_name", str(image_dataset_dir)]
    with pytest.raises(SystemExit, match="image column 'photo' not in the dataset"):
        analysis_main([*arguments, "--image_column", "photo", "--output_dir", str(tmp_path / "out")])


def test_image_processor_of_the_checkpoint_or_mae_defaults(model, tmp_path):
    from transformers import ViTImageProcessor

    model.save_pretrained(tmp_path)
    fallback = load_image_processor(str(tmp_path), model.config)
    assert tuple(fallback.image_mean) == MAE_IMAGE_MEAN and tuple(fallback.image_std) == MAE_IMAGE_STD
    ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(
        tmp_path
    )
    saved = load_image_processor(str(tmp_path), model.config)
    assert list(saved.image_mean) == [0.5] * 3 and list(saved.image_std) == [0.25] * 3
    pixels = saved([Image.new("RGB", (50, 40), (128, 0, 255))], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)  # resized to the model, not to the processor's 224
    torch.testing.assert_close(pixels[0, :, 0, 0], torch.tensor([(128 / 255 - 0.5) / 0.25, -2.0, 2.0]))


def test_cli_end_to_end(model, image_dataset_dir, tmp_path):
    model.save_pretrained(tmp_path / "model")
    output_dir = tmp_path / "analysis"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp_path / "datasets_cache"),
        OMP_NUM_THREADS="1",
    )
    command = [sys.executable, "-m", "sgmae_training.analyze", "--model", str(tmp_path / "model")]
    command += ["--dataset_name", str(image_dataset_dir), "--split", "test", "--num_images", "12"]
    command += ["--batch_size", "5", "--figure_images", "2", "--output_dir", str(output_dir)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = json.loads((output_dir / "analysis.json").read_text())
    assert set(metrics) == METRIC_KEYS | {"model", "dataset", "split", "image_column"}
    assert metrics["num_images"] == 12 and metrics["image_column"] == "img" and metrics["split"] == "test"
    assert 0 < metrics["feature_variance"] <= 1 and math.isfinite(metrics["reconstruction_loss"])
    assert len(metrics["attention_distance"]) == 2 and len(metrics["exploitation_rate_mask"]) == 1
    assert Image.open(output_dir / "figure_panel.png").size == (6 * 150, 2 * 150 + 30 + 44)  # header: title, legend


@pytest.mark.parametrize("colour", [(0.9, 0.1, 0.1), (0.85, 0.45, 0.1), (0.1, 0.2, 0.8), (0.02, 0.02, 0.02)])
def test_the_object_part_stands_out_on_photos_of_any_colour(model, colour):
    """The bi-partition column on a red, orange, blue and black photo: the object part keeps its pixels, the rest is
    dimmed, and a white-inside, black-outside outline follows the part's edge (a red tint vanished on red photos)."""
    image = torch.tensor(colour).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    pixel_values = (image - torch.tensor(MAE_IMAGE_MEAN).view(1, 3, 1, 1)) / torch.tensor(MAE_IMAGE_STD).view(
        1, 3, 1, 1
    )
    part = torch.zeros(1, 8, 8, dtype=torch.bool)
    part[:, 2:6, 2:6] = True  # a square object in the middle of the 8 x 8 patch grid
    with mock.patch("modeling_sgmae.masking_sgmae.object_part", return_value=part.flatten(1)):
        panel = figure_panel(model, pixel_values)
    shown, photo = panel.columns["NCut bi-partition"][0], panel.columns["input"][0]
    inside, outside = shown[10:22, 10:22], np.concatenate([shown[:6].reshape(-1, 3), shown[26:].reshape(-1, 3)])
    np.testing.assert_allclose(inside, photo[10:22, 10:22], atol=1e-6)
    np.testing.assert_allclose(shown[8, 8:24], 1.0)  # the part's top edge (patch row 2 = pixel row 8), inside: white
    np.testing.assert_allclose(shown[7, 8:24], 0.0)  # and just outside it: black
    assert np.abs(outside.mean(axis=0) - photo.mean(axis=(0, 1))).max() > 0.25 or photo.max() < 0.1  # dimmed


def test_a_saved_panel_says_what_it_shows_and_what_its_colours_mean(model, tmp_path):
    """masks.png and figure_panel.png: a title (which model, when) and a legend for red, grey and green."""
    panel = figure_panel(model, torch.randn(2, 3, 32, 32))
    panel.save(tmp_path / "plain.png")
    save_figure_panel(panel, tmp_path / "titled.png", "sgmae-demo, step 84: informed masks in training")
    plain, titled = Image.open(tmp_path / "plain.png").convert("RGB"), Image.open(tmp_path / "titled.png")
    assert titled.size == (plain.width, plain.height + 44)
    assert np.array_equal(np.asarray(titled)[44:], np.asarray(plain))  # the panel itself is unchanged
    header = {tuple(pixel) for pixel in np.asarray(titled)[:44].reshape(-1, 3)}
    for colour, _ in PANEL_LEGEND:  # a swatch of each colour the columns are tinted with
        assert tuple(round(255 * value) for value in colour) in header
    assert len(header) > 10  # and text


def test_cli_on_a_dataset_without_the_asked_split_uses_what_it_has(model, tmp_path):
    import datasets

    model.save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    (tmp_path / "data" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"image": images}).to_parquet(str(tmp_path / "data" / "data" / "train-00000.parquet"))
    arguments = ["--model", str(tmp_path / "model"), "--dataset_name", str(tmp_path / "data"), "--split", "test"]
    metrics = analysis_main([*arguments, "--num_images", "4", "--figure_images", "0", "--output_dir", str(tmp_path)])
    assert metrics["split"] == "train" and metrics["num_images"] == 4
