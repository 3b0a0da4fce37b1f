"""Cached informed masks: whole-image rankings stored per image, refreshed on schedule, cropped with each view."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, tiny_config
from PIL import Image
from torch import nn
from transformers import ViTImageProcessor

from modeling_sgmae import MaskType, SGMAEForPreTraining
from modeling_sgmae.crops import crop_maps, crop_rankings
from modeling_sgmae.mask_cache import MaskRankingCache, default_refresh_epochs
from sgmae_training.augment import BatchAugmentation
from sgmae_training.data.images import TrainTransform

GRID = (8, 8)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def object_image(height: int, width: int, top: int, left: int, bottom: int, right: int) -> torch.Tensor:
    """uint8 [3, H, W]: a bright red rectangle (the object) on a dark background."""
    image = torch.full((3, height, width), 20, dtype=torch.uint8)
    image[0, top:bottom, left:right] = 235
    return image


def coverage(is_object: torch.Tensor) -> torch.Tensor:
    """The share of each patch of an [B, H, W] object indicator that the object covers, on the 8 x 8 grid."""
    return nn.functional.adaptive_avg_pool2d(is_object.float()[:, None], GRID)[:, 0]


def view_coverage(views: torch.Tensor) -> torch.Tensor:
    """Object coverage of normalised views [B, 3, h, w] (red above the midpoint of background and object)."""
    red = views[:, 0] * STD[0] + MEAN[0]
    return coverage(red > 0.5)


def assert_rankings_follow_the_object(maps: torch.Tensor, crops: torch.Tensor, views: torch.Tensor) -> None:
    """After its view's crop and flip, a whole-image ranking says where the object is in the view: it matches the
    view's per-patch object coverage (up to the blur of resampling a coarse grid, and far better than the same map
    with the flip ignored or not cropped at all), and its top patch lies on the object whenever the view shows some."""
    truth = view_coverage(views)
    cropped = crop_maps(maps, crops)
    error = (cropped - truth).abs().mean()
    flip_ignored = crops.clone()
    flip_ignored[:, 4] = 1 - flip_ignored[:, 4]
    controls = [crop_maps(maps, flip_ignored), maps]
    assert error < 0.1
    assert all(error < 0.5 * (control - truth).abs().mean() for control in controls)
    for ranking, seen in zip(cropped.flatten(1), truth.flatten(1), strict=True):
        if seen.max() == 1.0:
            assert seen[ranking.argmax()] >= 0.5
    assert (crops[:, 4] == 1).any() and (crops[:, 4] == 0).any()  # both flips were tried


def test_batched_crops_carry_the_whole_image_ranking_to_the_view():
    """Decode-once path: crops of stored squares on the device, maps cropped with the same boxes and flips."""
    image = object_image(72, 72, 10, 30, 50, 62)
    images = image.expand(64, -1, -1, -1).contiguous()
    maps = coverage(images[:, 0] > 127)
    views, crops = BatchAugmentation((32, 32), MEAN, STD).with_crops(images, torch.Generator().manual_seed(0))
    assert crops.shape == (64, 5)
    assert_rankings_follow_the_object(maps, crops, views)


def test_worker_crops_carry_the_whole_image_ranking_to_the_view():
    """Worker path: torchvision crops of a non-square photograph, whose whole-image grid is squashed to the model's."""
    image = object_image(96, 128, 30, 40, 70, 100)
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=list(MEAN), image_std=list(STD))
    transform = TrainTransform(processor)
    torch.manual_seed(0)
    pairs = [transform(Image.fromarray(image.permute(1, 2, 0).numpy())) for _ in range(64)]
    views, crops = torch.stack([view for view, _ in pairs]), torch.stack([crop for _, crop in pairs])
    maps = coverage(image[None, 0] > 127).expand(64, -1, -1)
    assert_rankings_follow_the_object(maps, crops, views)


def test_worker_transform_draws_the_crops_torchvision_would():
    """TrainTransform is MAE's torchvision pipeline written out to know the box: the same RNG draws, the same views."""
    from torchvision.transforms import v2

    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=list(MEAN), image_std=list(STD))
    pipeline = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop((32, 32), scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    photo = Image.fromarray(torch.randint(0, 256, (48, 40, 3), dtype=torch.uint8).numpy())
    for seed in range(8):
        torch.manual_seed(seed)
        view, _ = TrainTransform(processor)(photo)
        torch.manual_seed(seed)
        assert torch.equal(view, pipeline(photo))


def test_refresh_ranks_whole_images_and_a_step_masks_their_cropped_rankings():
    model = SGMAEForPreTraining(tiny_config(hint_ratio=0.0)).train()
    pixel_values = torch.randn(6, 3, 32, 32)
    cache = MaskRankingCache(6, GRID, refresh_steps=10)
    assert cache.due(0, informed=True) and not cache.due(0, informed=False)
    batches = [{"pixel_values": pixel_values[:4], "index": torch.arange(4)}, {"pixel_values": pixel_values[4:],
               "index": torch.arange(4, 6)}]  # fmt: skip
    logs = cache.refresh(model, iter(batches), step=3, total=6)
    assert model.training  # ranked in eval mode, then back
    assert not cache.due(12, informed=True) and cache.due(13, informed=True)
    assert set(logs) == {"mask_refresh_seconds", "mask_refresh_fallback_share", "mask_refresh_object_part"}
    expected = model.eval().informed_mask_scores(pixel_values).half()
    model.train()
    torch.testing.assert_close(cache.rankings.flatten(1), expected, rtol=0, atol=0, equal_nan=True)

    # An uncropped, unflipped view gets its image's whole ranking.
    batch = {"pixel_values": pixel_values[[5, 0]], "index": torch.tensor([5, 0]), "crops": torch.tensor([[0, 0, 1, 1,
             0.0]] * 2)}  # fmt: skip
    scores = cache.rankings_for(batch)
    torch.testing.assert_close(scores, expected[[5, 0]].float(), equal_nan=True)
    model.set_training_progress(1, 1)
    output = model(batch["pixel_values"], mask_scores=scores)
    assert output.mask.sum(dim=1).tolist() == [48, 48]
    usable = torch.isfinite(scores).all(dim=1)
    for row in range(2):
        if usable[row]:
            assert output.mask[row, scores[row].topk(48).indices].all()
    assert output.mask_type.tolist() == [int(MaskType.INFORMED if ok else MaskType.FALLBACK) for ok in usable]


def test_the_cache_round_trips_through_a_weights_only_load(tmp_path):
    cache = MaskRankingCache(0, GRID, refresh_steps=5, keyed=True)
    cache.keys, cache.rows = ["a", "b"], {"a": 0, "b": 1}
    cache.rankings = torch.randn(2, *GRID).half()
    cache.refreshed_at = 7
    torch.save(cache.state_dict(), tmp_path / "cache.pt")
    restored = MaskRankingCache(0, GRID, refresh_steps=5, keyed=True)
    restored.load_state_dict(torch.load(tmp_path / "cache.pt", weights_only=True))
    assert restored.refreshed_at == 7 and restored.rows == {"a": 0, "b": 1}
    assert torch.equal(restored.rankings, cache.rankings)
    # a sample the last refresh did not see gets a NaN ranking: a random mask
    batch = {"pixel_values": torch.zeros(2, 3, 32, 32), "keys": ["b", "new"], "crops": torch.tensor([[0, 0, 1, 1, 0.0]]
             * 2)}  # fmt: skip
    scores = restored.rankings_for(batch)
    torch.testing.assert_close(scores[0], cache.rankings[1].flatten().float())
    assert torch.isnan(scores[1]).all()
    assert restored.memory_bytes() == 2 * 64 * 2


def test_default_refresh_is_a_tenth_of_the_schedule():
    assert default_refresh_epochs(400) == 40  # AMT: every 40 of 400 epochs
    assert default_refresh_epochs(30) == 3
    assert default_refresh_epochs(3) == 1


def test_a_stream_without_sample_ids_is_refused_in_one_line(image_dataset_dir, tmp_path):
    config = tmp_path / "tiny.json"
    tiny_config().to_json_file(config)
    command = [
        sys.executable, str(REPO_ROOT / "run_pretraining.py"), "--dataset_name", str(image_dataset_dir),
        "--config_name", str(config), "--output_dir", str(tmp_path / "out"), "--streaming", "--max_train_steps", "2",
        "--per_device_train_batch_size", "4", "--dataloader_num_workers", "0",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cached informed masks match each image") and "--mask_cache_key_column" in last


def test_sources_must_name_each_rows_first_row_of_its_image():
    """A repeat must point at a row that points at itself (the image's first row), or no ranking would be made."""
    cache = MaskRankingCache(6, GRID, refresh_steps=1, sources=torch.tensor([0, 1, 0, 1, 0, 1]))
    assert cache.ranked_rows().tolist() == [0, 1]
    with pytest.raises(ValueError, match="first row that shows the same image"):
        MaskRankingCache(3, GRID, refresh_steps=1, sources=torch.tensor([1, 2, 2]))  # row 0 -> 1 -> 2: a chain
    with pytest.raises(ValueError, match="first row that shows the same image"):
        MaskRankingCache(3, GRID, refresh_steps=1, sources=torch.tensor([0, 0]))  # not one per row


def test_crop_rankings_crops_a_ranking_as_its_grid_map():
    """[B, N] rankings (what `informed_mask_scores` returns) crop as their [B, rows, columns] maps do."""
    rankings = torch.arange(2 * 64, dtype=torch.float32).view(2, 64)
    crops = torch.tensor([[0.25, 0.0, 0.5, 0.5, 1.0], [0.0, 0.0, 1.0, 1.0, 0.0]])
    cropped = crop_rankings(rankings, GRID, crops)
    assert cropped.shape == (2, 64)
    assert torch.equal(cropped, crop_maps(rankings.view(2, *GRID), crops).flatten(1))
    assert torch.allclose(cropped[1], rankings[1])  # the whole image, unflipped: unchanged
