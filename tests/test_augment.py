"""Batched device augmentation against torchvision's RandomResizedCrop + flip, image by image."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.transforms import v2

from modeling_sgmae.crops import resized_crops
from sgmae_training.augment import BatchAugmentation, sample_crop_boxes

HEIGHT, WIDTH, SAMPLES = 40, 56, 20_000


def torchvision_boxes(count: int, height: int, width: int, scale, ratio) -> torch.Tensor:
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    return torch.tensor(
        [v2.RandomResizedCrop.get_params(image, scale, ratio) for _ in range(count)], dtype=torch.float64
    )


def kolmogorov_smirnov(first: torch.Tensor, second: torch.Tensor) -> float:
    """The largest gap between the two samples' empirical distribution functions."""
    points = torch.cat([first, second]).unique()
    cdf_first = torch.searchsorted(first.sort().values, points, right=True) / len(first)
    cdf_second = torch.searchsorted(second.sort().values, points, right=True) / len(second)
    return (cdf_first - cdf_second).abs().max().item()


def summary(boxes: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    top, left, crop_height, crop_width = boxes.double().unbind(dim=1)
    free_rows, free_columns = height - crop_height, width - crop_width
    return {
        "area share": crop_height * crop_width / (height * width),
        "log aspect": torch.log(crop_width / crop_height),
        "row position": torch.where(free_rows > 0, top / free_rows.clamp(min=1), torch.full_like(top, 0.5)),
        "column position": torch.where(free_columns > 0, left / free_columns.clamp(min=1), torch.full_like(left, 0.5)),
    }


def test_crop_boxes_follow_torchvisions_distribution():
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    ours = sample_crop_boxes(SAMPLES, HEIGHT, WIDTH, scale, ratio, torch.Generator().manual_seed(1))
    theirs = torchvision_boxes(SAMPLES, HEIGHT, WIDTH, scale, ratio)
    assert ((ours[:, 0] >= 0) & (ours[:, 0] + ours[:, 2] <= HEIGHT)).all()
    assert ((ours[:, 1] >= 0) & (ours[:, 1] + ours[:, 3] <= WIDTH)).all()
    for name, values in summary(ours, HEIGHT, WIDTH).items():
        # Two samples of 20k from one distribution: the KS distance stays below 0.0195 with probability 0.999.
        assert kolmogorov_smirnov(values, summary(theirs, HEIGHT, WIDTH)[name]) < 0.0195, name


def test_impossible_tries_fall_back_to_torchvisions_central_crop():
    # On a very wide image no try fits often; the fallback is the central crop at the widest allowed aspect.
    ours = sample_crop_boxes(4000, 10, 200, (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(2))
    theirs = torchvision_boxes(4000, 10, 200, (0.9, 1.0), (3 / 4, 4 / 3))
    assert set(map(tuple, ours.tolist())) == set(map(tuple, theirs.long().tolist())) == {(0, 93, 10, 13)}


def test_a_full_box_is_a_plain_resize_and_a_flipped_one_its_mirror():
    images = torch.randint(0, 256, (2, 3, HEIGHT, WIDTH), dtype=torch.uint8)
    full = torch.tensor([[0, 0, HEIGHT, WIDTH]] * 2)
    same = resized_crops(images, full, (HEIGHT, WIDTH))
    torch.testing.assert_close(same, images.float(), atol=1e-3, rtol=0)
    resized = resized_crops(images, full, (20, 28))
    reference = nn.functional.interpolate(images.float(), (20, 28), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized, reference, atol=1e-3, rtol=0)
    mirrored = resized_crops(images, full, (HEIGHT, WIDTH), flip=torch.tensor([True, False]))
    torch.testing.assert_close(mirrored[0], images[0].float().flip(-1), atol=1e-3, rtol=0)
    torch.testing.assert_close(mirrored[1], images[1].float(), atol=1e-3, rtol=0)


def test_a_box_crops_exactly_those_pixels():
    images = torch.arange(HEIGHT * WIDTH, dtype=torch.float32).view(1, 1, HEIGHT, WIDTH)
    crop = resized_crops(images, torch.tensor([[5, 7, 10, 12]]), (10, 12))  # same size: no resampling
    torch.testing.assert_close(crop[0, 0], images[0, 0, 5:15, 7:19], atol=1e-3, rtol=0)


def test_batch_augmentation_flips_half_and_normalises():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    augment = BatchAugmentation((16, 16), mean, std)
    images = torch.full((4000, 3, 20, 20), 128, dtype=torch.uint8)
    images[:, :, :, :10] = 0  # left half dark: a flip shows as a dark right half
    out = augment(images, torch.Generator().manual_seed(3))
    assert out.shape == (4000, 3, 16, 16) and out.dtype == torch.float32
    flipped = out[:, 0, :, -1].mean(dim=1) < out[:, 0, :, 0].mean(dim=1)
    assert abs(flipped.float().mean().item() - 0.5) < 0.03
    grey = (128 / 255 - mean[0]) / std[0]
    assert torch.isclose(out[:, 0].max(), torch.tensor(grey), atol=1e-4)
