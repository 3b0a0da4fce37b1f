"""MAE's pre-training augmentation on a whole batch at once, on the training device.

RandomResizedCrop (scale 0.2-1.0, aspect ratio 3/4-4/3) and a horizontal flip per image, then the image processor's
normalisation, as `data.train_transform` does image by image with torchvision in the DataLoader workers. Here the crop
boxes are drawn for the whole batch with torchvision's algorithm (ten tries of area and log-aspect, then the central
crop), and all crops are resampled in one `grid_sample` call (bilinear, no antialiasing: with images stored at about
1.15x the training resolution a crop is shrunk by at most that factor, where antialiasing changes little).
"""

from __future__ import annotations

import math

import torch

from modeling_sgmae.crops import crop_record, resized_crops

ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many boxes before falling back to the central crop


def sample_crop_boxes(
    batch_size: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Crop boxes [B, 4] = (top, left, crop height, crop width) in pixels, distributed as torchvision's
    `RandomResizedCrop.get_params` on an image of height x width."""
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    draws = torch.rand(batch_size, ATTEMPTS, 2, generator=generator, device=device, dtype=torch.float64)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * draws[..., 0])
    aspect = torch.exp(log_low + (log_high - log_low) * draws[..., 1])
    crop_width = torch.round(torch.sqrt(target_area * aspect))
    crop_height = torch.round(torch.sqrt(target_area / aspect))
    valid = (crop_width > 0) & (crop_width <= width) & (crop_height > 0) & (crop_height <= height)
    first = valid.to(torch.int8).argmax(dim=1, keepdim=True)  # the first try that fits
    crop_height, crop_width = crop_height.gather(1, first)[:, 0], crop_width.gather(1, first)[:, 0]

    # No try fits: the largest central crop within the aspect-ratio range.
    fallback_height, fallback_width = height, width
    if width / height < ratio[0]:
        fallback_height = round(width / ratio[0])
    elif width / height > ratio[1]:
        fallback_width = round(height * ratio[1])
    fits = valid.any(dim=1)
    crop_height = torch.where(fits, crop_height, fallback_height)
    crop_width = torch.where(fits, crop_width, fallback_width)
    positions = torch.rand(batch_size, 2, generator=generator, device=device, dtype=torch.float64)
    top = torch.floor(positions[:, 0] * (height - crop_height + 1))
    left = torch.floor(positions[:, 1] * (width - crop_width + 1))
    top = torch.where(fits, top, (height - crop_height) // 2)
    left = torch.where(fits, left, (width - crop_width) // 2)
    return torch.stack([top, left, crop_height, crop_width], dim=1).long()


class BatchAugmentation:
    """uint8 images [B, C, H, W] -> MAE pre-training inputs [B, C, size], normalised, on the images' device."""

    def __init__(
        self,
        size: tuple[int, int],
        image_mean: tuple[float, ...],
        image_std: tuple[float, ...],
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ):
        self.size, self.scale, self.ratio = size, scale, ratio
        self.mean = torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1) * 255

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.with_crops(images, generator)[0]

    def with_crops(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs and their crops [B, 5]: (top, left, height, width) as fractions of the image, then the flip
        (1.0 = mirrored), which is what a stored whole-image ranking is cropped with (`modeling_sgmae.crops`)."""
        batch_size, _, height, width = images.shape
        device = images.device
        boxes = sample_crop_boxes(batch_size, height, width, self.scale, self.ratio, generator, device)
        flip = torch.rand(batch_size, generator=generator, device=device) < 0.5
        crops = resized_crops(images, boxes, self.size, flip)
        inputs = (crops - self.mean.to(device)) / self.std.to(device)
        return inputs, crop_record(boxes, height, width, flip)
