"""The crop of a training view, as a record a stored whole-image map can be cropped with (docs/method.md §8).

A cached ranking is made on the whole image, but the step masks an augmented view of it: the view's box and flip are
recorded (`crop_record`) and the map is resampled with exactly that geometry (`crop_maps`), as the images are
(`resized_crops`). Conventions: boxes are (top, left, height, width); a crop record [B, 5] is the box in fractions of
the image, then the flip as 0.0 / 1.0; rankings are [B, N] in row-major patch order, maps [B, H, W].
"""

from __future__ import annotations

import torch
from torch import nn


def resized_crops(
    images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop boxes [B, 4] (top, left, height, width) of images [B, C, H, W], each resized to `size` (bilinear), the
    ones flagged in `flip` [B] mirrored left-right; one batched resampling call. Returns float images."""
    batch_size, _, height, width = images.shape
    top, left, crop_height, crop_width = boxes.to(images.device, torch.float32).unbind(dim=1)
    # align_corners=False coordinates: the box's centre and half-extent, in units of the half image.
    scale_x, scale_y = crop_width / width, crop_height / height
    if flip is not None:
        scale_x = torch.where(flip.to(images.device), -scale_x, scale_x)
    theta = torch.zeros(batch_size, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = scale_x, (2 * left + crop_width) / width - 1
    theta[:, 1, 1], theta[:, 1, 2] = scale_y, (2 * top + crop_height) / height - 1
    grid = nn.functional.affine_grid(theta, [batch_size, images.shape[1], *size], align_corners=False)
    return nn.functional.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def crop_record(boxes: torch.Tensor, height: int, width: int, flip: torch.Tensor) -> torch.Tensor:
    """Pixel boxes [B, 4] (top, left, height, width) of height x width images and flips [B] as crops [B, 5]:
    the box in fractions of the image, then the flip as 0.0 / 1.0."""
    scale = torch.tensor([height, width, height, width], dtype=torch.float64, device=boxes.device)
    return torch.cat([boxes.double() / scale, flip.double()[:, None]], dim=1).float()


def crop_maps(maps: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
    """Whole-image maps [B, H, W] (e.g. a patch grid's rankings) cropped with crops [B, 5] (`crop_record`) and
    resized back to H x W, as `resized_crops` does to the images: the exact box, flipped with its image. float32."""
    height, width = maps.shape[1:]
    crops = crops.to(maps.device, torch.float32)
    boxes = crops[:, :4] * torch.tensor([height, width, height, width], device=maps.device, dtype=torch.float32)
    return resized_crops(maps[:, None].float(), boxes, (height, width), crops[:, 4] > 0.5)[:, 0]


def crop_rankings(rankings: torch.Tensor, grid: tuple[int, int], crops: torch.Tensor) -> torch.Tensor:
    """Whole-image rankings [B, N] (`SGMAEForPreTraining.informed_mask_scores`) on a `grid` = (rows, columns) of
    patches, cropped with crops [B, 5]: the `mask_scores` [B, N] of those views."""
    return crop_maps(rankings.view(-1, *grid), crops).flatten(1)
