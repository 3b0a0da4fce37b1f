"""The paper's analysis toolkit (docs/method.md §5): feature and attention statistics, exploitation rates, Figure-1
panels. The command line over it is `python -m sgmae_training.analyze`.

Conventions as in `masking_sgmae`: features are [B, N, D] patch tokens (no [CLS]); masks are bool [B, N] with
True = masked. Attention maps are [B, heads, 1 + N, 1 + N] with [CLS] first, rows are queries, columns keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .configuration_sgmae import SGMAEConfig, num_masked_patches
from .masking_sgmae import Bipartition, SelfGuidedMasking, mask_from_noise
from .modeling_sgmae import SGMAEForPreTraining, exploitation_rates, patch_mean_std, probe_noise

MAE_IMAGE_MEAN = (0.485, 0.456, 0.406)  # MAE's (ImageNet) normalisation, the default of saved image processors
MAE_IMAGE_STD = (0.229, 0.224, 0.225)

# ----- features of the full image ---------------------------------------------------------------------------------


@torch.no_grad()
def full_image_encoding(
    model: SGMAEForPreTraining,
    pixel_values: torch.Tensor,
    num_layers: int | None = None,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[int, int]]:
    """Run the encoder on the full, unmasked, unshuffled image through its first `num_layers` blocks (all if None).

    Returns the patch features [B, N, D] (block output before the final LayerNorm: what the self-guided masking
    clusters), the attention maps of those blocks if asked for, and the patch grid (rows, columns).
    """
    patch_tokens, cls_token, grid = model.vit.embeddings(pixel_values)
    features, attentions = model.vit.patch_features(patch_tokens, cls_token, num_layers, output_attentions)
    return features, attentions, grid


@dataclass
class FeatureStatistics:
    """Per-image statistics of the full-image patch features (docs/method.md §5); each field is [B] unless noted.

    Partition fields are NaN (sizes -1) where the image has no usable cut (`has_cut` False).
    """

    feature_variance: torch.Tensor  # sigma_F: mean squared distance of the unit features f_i from their mean
    similarity_variance: torch.Tensor  # sigma_s: variance of the N*N entries of S = f f^T
    bipartition_gap: torch.Tensor  # mu_intra - mu_inter of the graph weights W over the NCut parts
    cosine_gap: torch.Tensor  # the same gap measured on the cosine similarities S
    object_part_size: torch.Tensor  # patches in the object part
    centre_masked_share: torch.Tensor  # central patches hidden by these features' informed mask (no hints)
    edge_density: torch.Tensor  # share of real edges in the affinity graph
    has_cut: torch.Tensor  # bool: the image has a usable bi-partition
    object_part: torch.Tensor  # [B, N] bool, the object part of the cut
    half_cut: torch.Tensor  # 1.0 where the cut splits the image into two halves (`half_cuts`), else 0.0; NaN: no cut
    one_sided: torch.Tensor  # 1.0 where the object part lies on one side of a midline (`one_sided_parts`); NaN: no cut
    object_centre_share: torch.Tensor  # share of the object part's patches in the central region; NaN: no cut

    @classmethod
    def cat(cls, chunks: list[FeatureStatistics]) -> FeatureStatistics:
        """Concatenate the statistics of several batches along the image axis."""
        return cls(**{f.name: torch.cat([getattr(chunk, f.name) for chunk in chunks]) for f in fields(cls)})

    def summary(self) -> dict[str, float | int | None]:
        """Means over the images (partition metrics over the images with a cut; None where there is none)."""
        cut = self.has_cut
        return {
            "feature_variance": _mean(self.feature_variance),
            "similarity_variance": _mean(self.similarity_variance),
            "bipartition_gap": _mean(self.bipartition_gap[cut]),
            "bipartition_cosine_gap": _mean(self.cosine_gap[cut]),
            "object_part_size": _mean(self.object_part_size[cut]),
            "object_part_fraction": _mean(self.object_part_size[cut] / self.object_part.shape[1]),
            "informed_mask_centre_share": _mean(self.centre_masked_share[cut]),
            "edge_density": _mean(self.edge_density),
            "num_images_without_cut": int((~cut).sum()),
            **_spread("object_part_fraction", self.object_part_size[cut] / self.object_part.shape[1]),
            "half_cut_share": _mean(self.half_cut[cut]),
            "one_sided_part_share": _mean(self.one_sided[cut]),
            "object_centre_share": _mean(self.object_centre_share[cut]),
            **part_overlap(self.object_part[cut]),
        }


def part_overlap(parts: torch.Tensor) -> dict[str, float | None]:
    """How alike the object parts [B, N] (bool) of different images are: their mean pairwise IoU, and what it would be
    with each part's patches placed at random (the same sizes; ab/N expected shared patches for sizes a and b).

    A cut that follows position puts the same patches in the object part whatever the image shows (a centre blob, a
    half), so its overlap stands well above chance; a cut that follows content stays near chance."""
    if parts.shape[0] < 2:
        return {"part_overlap": None, "part_overlap_chance": None}
    parts = parts.double()
    sizes = parts.sum(dim=1)
    shared, expected = parts @ parts.T, sizes[:, None] * sizes[None, :] / parts.shape[1]
    pairs = ~torch.eye(parts.shape[0], dtype=torch.bool, device=parts.device)
    overlap = shared / (sizes[:, None] + sizes[None, :] - shared).clamp(min=1)
    chance = expected / (sizes[:, None] + sizes[None, :] - expected).clamp(min=1)
    return {"part_overlap": overlap[pairs].mean().item(), "part_overlap_chance": chance[pairs].mean().item()}


def _spread(name: str, values: torch.Tensor) -> dict[str, float | None]:
    """Median and quartiles of values as `{name}_median`, `{name}_q25`, `{name}_q75` (None when empty)."""
    if values.numel() == 0:
        return {f"{name}_{key}": None for key in ("median", "q25", "q75")}
    quartiles = torch.quantile(values.double(), torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64)).tolist()
    return dict(zip((f"{name}_median", f"{name}_q25", f"{name}_q75"), quartiles, strict=True))


def _mean(values: torch.Tensor) -> float | None:
    """Mean as a float, or None (JSON null) for an empty or non-finite mean."""
    if values.numel() == 0:
        return None
    mean = values.double().mean().item()
    return mean if math.isfinite(mean) else None


def _pair_mean(values: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Mean of values [B, N, N] over the pairs [B, N, N] (bool) of each image: [B], NaN where there are none."""
    return (values * pairs).sum(dim=(1, 2)) / pairs.sum(dim=(1, 2))


def centre_patches(grid: tuple[int, int]) -> torch.Tensor:
    """[N] bool: the patches in the middle half of the rows and of the columns (rounded inwards)."""
    rows, columns = (torch.arange(size) for size in grid)
    row_inside = (rows >= grid[0] // 4) & (rows < grid[0] - grid[0] // 4)
    column_inside = (columns >= grid[1] // 4) & (columns < grid[1] - grid[1] // 4)
    return (row_inside[:, None] & column_inside[None, :]).flatten()


HALF_CUT_SHARE = 0.85  # a part with at least this share of its patches on one side of a midline


def side_shares(part: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, 4]: the shares of each part's patches [B, N] above, below, left of and right of the grid's midlines.

    With an odd number of rows (columns) the middle row (column) belongs to neither side. Empty parts give 0."""
    cells = part.reshape(-1, *grid).float()
    rows, columns = grid
    sides = torch.stack(
        [
            cells[:, : rows // 2].sum(dim=(1, 2)),
            cells[:, rows - rows // 2 :].sum(dim=(1, 2)),
            cells[:, :, : columns // 2].sum(dim=(1, 2)),
            cells[:, :, columns - columns // 2 :].sum(dim=(1, 2)),
        ],
        dim=1,
    )
    return sides / cells.sum(dim=(1, 2)).clamp(min=1)[:, None]


def one_sided_parts(part: torch.Tensor, grid: tuple[int, int], share: float = HALF_CUT_SHARE) -> torch.Tensor:
    """[B] bool: the part [B, N] has at least `share` of its patches on one side of a midline (a small object off
    the centre is one-sided too; `half_cuts` is the stricter test)."""
    return (side_shares(part, grid).amax(dim=1) >= share) & (part.sum(dim=1) > 0)


def half_cuts(part: torch.Tensor, grid: tuple[int, int], share: float = HALF_CUT_SHARE) -> torch.Tensor:
    """[B] bool: the cut splits the grid into two halves: the object part [B, N] has at least `share` of its
    patches on one side of the vertical or horizontal midline and the rest at least `share` on the other side. A
    cut that follows position, not content; unlike `one_sided_parts`, a small object off the centre is not one."""
    inside, outside = side_shares(part, grid), side_shares(~part, grid)
    opposite = outside[:, [1, 0, 3, 2]]  # below for above, above for below, right for left, left for right
    return (
        ((inside >= share) & (opposite >= share)).any(dim=1)
        & (part.sum(dim=1) > 0)
        & (part.sum(dim=1) < part.shape[1])
    )


def object_centre_share(part: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B] share of the object part's patches [B, N] that lie in the central region (`centre_patches`; NaN for an
    empty part). Spread evenly, a part gives the region's share of the grid (64 / 196 = 0.33 at 14 x 14)."""
    centre = centre_patches(grid).to(part.device)
    return part[:, centre].sum(dim=1) / part.sum(dim=1).float()


def centre_masked_share(mask: torch.Tensor, has_cut: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B] share of the central patches (`centre_patches`) that `mask` [B, N] hides; NaN where `has_cut` is False."""
    centre = centre_patches(grid).to(mask.device)
    share = mask[:, centre].float().mean(dim=1)
    return torch.where(has_cut, share, torch.tensor(float("nan"), device=mask.device))


@torch.no_grad()
def feature_statistics(
    features: torch.Tensor,
    config: SGMAEConfig,
    grid: tuple[int, int] | None = None,
    masking_features: torch.Tensor | None = None,
) -> FeatureStatistics:
    """sigma_F, sigma_s and the NCut bi-partition gap of patch features [B, N, D] (docs/method.md §5).

    Features are L2-normalised first (f_i), as the masking does. The gap compares the mean weight over pairs
    i != j in the same part with the mean weight over pairs in different parts; for the default similarity graph
    it lies in [-1, 1], 1 meaning two groups that are orthogonal to each other and uniform inside. The centre
    share tells whether informed masks hide the middle of the image, where object-centred datasets put the
    object (a random mask hides `mask_ratio` of it); `grid` (rows, columns) defaults to the config's. The half-cut
    flag and the object part's central share tell whether the cut follows position or content.

    sigma_F and sigma_s always describe `features`; the cut, its gaps and the mask come from `masking_features`
    when given (e.g. `SGMAEModel.masking_features` with another source or centring), else from `features`.
    """
    unit = nn.functional.normalize(features.float(), dim=-1)
    num_patches = unit.shape[1]
    similarity = unit @ unit.transpose(1, 2)
    feature_variance = (unit - unit.mean(dim=1, keepdim=True)).square().sum(dim=-1).mean(dim=1)
    similarity_variance = similarity.flatten(1).var(dim=1, correction=0)

    # The training masking's own cut and informed mask (its hints draw from a private generator).
    generator = torch.Generator(device=unit.device).manual_seed(0)
    if masking_features is not None:
        unit_cut = nn.functional.normalize(masking_features.float(), dim=-1)
        similarity_cut = unit_cut @ unit_cut.transpose(1, 2)
    else:
        unit_cut, similarity_cut = unit, similarity
    masking = SelfGuidedMasking(config)(unit_cut, num_masked_patches(num_patches, config.mask_ratio), generator)
    cut = masking.bipartition
    gap, cosine_gap = bipartition_gaps(cut, similarity_cut)
    nan = torch.tensor(float("nan"), device=unit.device)
    part_size = torch.where(cut.has_cut, cut.object_part.sum(dim=1), -1)
    grid = grid or config.grid_size
    return FeatureStatistics(
        feature_variance=feature_variance,
        similarity_variance=similarity_variance,
        bipartition_gap=gap,
        cosine_gap=cosine_gap,
        object_part_size=part_size,
        centre_masked_share=centre_masked_share(masking.informed_mask, cut.has_cut, grid),
        edge_density=cut.edge_density,
        has_cut=cut.has_cut,
        object_part=cut.object_part,
        half_cut=torch.where(cut.has_cut, half_cuts(cut.object_part, grid).float(), nan),
        one_sided=torch.where(cut.has_cut, one_sided_parts(cut.object_part, grid).float(), nan),
        object_centre_share=torch.where(cut.has_cut, object_centre_share(cut.object_part, grid), nan),
    )


def bipartition_gaps(cut: Bipartition, similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mu_intra - mu_inter of the cut's graph weights and of the cosine similarities [B, N, N]: the mean over pairs
    i != j in the same part minus the mean over pairs in different parts, per image [B] (NaN where no cut)."""
    same_part = cut.object_part[:, :, None] == cut.object_part[:, None, :]
    off_diagonal = ~torch.eye(same_part.shape[1], dtype=torch.bool, device=same_part.device)
    within, across = same_part & off_diagonal, ~same_part
    nan = torch.tensor(float("nan"), device=same_part.device)
    gap = torch.where(cut.has_cut, _pair_mean(cut.weights, within) - _pair_mean(cut.weights, across), nan)
    cosine_gap = torch.where(cut.has_cut, _pair_mean(similarity, within) - _pair_mean(similarity, across), nan)
    return gap, cosine_gap


class PositionShare:
    """How much of the patch features is grid position rather than content, per block, accumulated over batches.

    From the L2-normalised features u[b, n] of images b at grid positions n (all images on the same grid):
    - `same_position_cosine`: mean cosine between the features of one position in two different images;
    - `within_image_cosine`: mean cosine between two different positions of one image;
    - `position_share`: the share of the features' variance (around their mean over images and positions) that the
      per-position means explain: mean_n |mean_b u[b, n] - mean u|² / (1 - |mean u|²). Features that are a function
      of the position alone give 1; features that do not depend on position give about 0 (1/B from sampling).
    """

    def __init__(self) -> None:
        self.position_sums: list[torch.Tensor] = []  # per block [N, D]: sum over images of u[b, n]
        self.within_sums: list[float] = []  # per block: sum over images of the within-image mean cosine
        self.num_images = 0

    @torch.no_grad()
    def update(self, block_features: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> None:
        """Add a batch: one [B, N, D] feature tensor per block (the same images in each)."""
        if not self.position_sums:
            self.position_sums = [torch.zeros(f.shape[1:], dtype=torch.float64) for f in block_features]
            self.within_sums = [0.0] * len(block_features)
        for index, features in enumerate(block_features):
            unit = nn.functional.normalize(features.double(), dim=-1).cpu()
            num_patches = unit.shape[1]
            self.position_sums[index] += unit.sum(dim=0)
            image_sums = unit.sum(dim=1).square().sum(dim=-1)  # |sum_n u|² = N + sum over n != m of cosines
            self.within_sums[index] += ((image_sums - num_patches) / (num_patches * (num_patches - 1))).sum().item()
        self.num_images += block_features[0].shape[0]

    def result(self) -> dict[str, list[float]]:
        """Per block (first to last): `position_share`, `same_position_cosine`, `within_image_cosine`."""
        count = self.num_images
        shares, same, within = [], [], []
        for sums, within_sum in zip(self.position_sums, self.within_sums, strict=True):
            position_means = sums / count
            grand_mean = position_means.mean(dim=0)
            between = (position_means - grand_mean).square().sum(dim=-1).mean()
            shares.append((between / (1 - grand_mean.square().sum())).item())
            pairs = (sums.square().sum(dim=-1) - count) / (count * (count - 1))  # per position
            same.append(pairs.mean().item())
            within.append(within_sum / count)
        return {"position_share": shares, "same_position_cosine": same, "within_image_cosine": within}


@torch.no_grad()
def masking_position_mean(
    model: SGMAEForPreTraining, chunks: list[torch.Tensor] | tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """Each grid position's mean masking feature over images [N, D] (`SGMAEModel.masking_features`, uncentred), over
    chunks of normalised images [B, C, H, W]: the `position_mean` that `feature_centring` subtracts."""
    total, count = None, 0
    for chunk in chunks:
        patch_tokens, cls_token, _ = model.vit.embeddings(chunk.to(device=model.device, dtype=model.dtype))
        features = model.vit.masking_features(patch_tokens, cls_token, centre=False).float()
        total = features.sum(dim=0) if total is None else total + features.sum(dim=0)
        count += features.shape[0]
    return total / count


# ----- attention ----------------------------------------------------------------------------------------------------


def patch_distances(grid: tuple[int, int], patch_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Euclidean distance in pixels between the centres of every two patches of a row-major grid: [N, N]."""
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij"
    )
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).float() * patch_size
    return torch.cdist(centres, centres)


@torch.no_grad()
def attention_distance(attentions: tuple[torch.Tensor, ...], grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Mean attention distance per layer in pixels: [L].

    For each patch query, the attention-weighted mean distance to the patch keys (the [CLS] row and column are
    left out and each query's weights over the patch keys renormalised to sum to 1), averaged over queries, heads
    and images. attentions: per layer [B, heads, 1 + N, 1 + N], from the full (unmasked) image.
    """
    num_patches = grid[0] * grid[1]
    distances = None
    per_layer = []
    for weights in attentions:
        if weights.shape[-2:] != (1 + num_patches, 1 + num_patches):
            raise ValueError(f"attention maps must be [..., {1 + num_patches}, {1 + num_patches}] for grid {grid}")
        if distances is None:
            distances = patch_distances(grid, patch_size, weights.device)
        patch_weights = weights[..., 1:, 1:].float()
        mean_distance = (patch_weights * distances).sum(dim=-1) / patch_weights.sum(dim=-1).clamp(min=1e-12)
        per_layer.append(mean_distance.mean())
    return torch.stack(per_layer)


# ----- all metrics ------------------------------------------------------------------------------------------------


@torch.no_grad()
def analysis_metrics(
    model: SGMAEForPreTraining,
    pixel_values: torch.Tensor,
    batch_size: int = 64,
    seed: int = 0,
    feature_layer: int | None = None,
) -> dict[str, Any]:
    """All §5 metrics of `model` on a probe batch [B, C, H, W] (normalised pixels), as a JSON-serialisable dict.

    Features and attention distances come from the full image (features after `feature_layer` blocks, default
    the last); exploitation rates and the reconstruction loss from random masks drawn with `seed`. The cut and the
    informed mask use the masking's own features (`SGMAEModel.masking_features`: the config's source and, with
    `feature_centring`, each position's mean over the whole probe batch removed); the position share of every
    block (`PositionShare`) comes from the block outputs. The model runs in eval mode under no_grad, in chunks of
    `batch_size` images; its training mode and buffers are left as found.
    """
    config = model.config
    was_training = model.training
    model.eval()
    try:
        num_patches = config.grid_size[0] * config.grid_size[1]
        noise = probe_noise(pixel_values.shape[0], num_patches, seed).split(batch_size)
        chunks = [chunk.to(device=model.device, dtype=model.dtype) for chunk in pixel_values.split(batch_size)]
        position_mean = masking_position_mean(model, chunks) if config.feature_centring == "position_mean" else None
        position_share = PositionShare()
        measured = [
            _chunk_metrics(model, chunk, chunk_noise, feature_layer, position_mean, position_share)
            for chunk, chunk_noise in zip(chunks, noise, strict=True)
        ]
    finally:
        model.train(was_training)
    statistics, distances, rates, losses = zip(*measured, strict=True)
    weights = torch.tensor([len(chunk) for chunk in chunks], dtype=torch.float64) / pixel_values.shape[0]

    def weighted(values: tuple[torch.Tensor, ...]) -> torch.Tensor:  # every image counts once
        stacked = torch.stack([value.double().cpu() for value in values])
        return (stacked * weights.view(-1, *[1] * (stacked.ndim - 1))).sum(dim=0)

    rate_means = weighted(rates)
    return {
        "num_images": int(pixel_values.shape[0]),
        "training_step": model.schedule.read("training_step"),
        "informed_masking_active": bool(model.informed_masking_active),
        "feature_layer": feature_layer or config.num_hidden_layers,
        **{name: getattr(config, name) for name in REPORTED_MASKING_FIELDS},
        **FeatureStatistics.cat(list(statistics)).summary(),
        **position_share.result(),
        "attention_distance": weighted(distances).tolist(),
        "exploitation_rate_visible": rate_means[:, 0].tolist(),
        "exploitation_rate_mask": rate_means[:, 1].tolist(),
        "reconstruction_loss": weighted(losses).item(),
        "probe_seed": seed,
    }


# The masking choices a metrics record names (as its keys: `feature_centering` keeps the name earlier records use).
REPORTED_MASKING_FIELDS = (
    "graph_edges",
    "fiedler_solver",
    "foreground_rule",
    "mask_feature_source",
    "feature_centering",
    "partition_split",
)


@torch.no_grad()
def _chunk_metrics(
    model: SGMAEForPreTraining,
    chunk: torch.Tensor,
    noise: torch.Tensor,
    feature_layer: int | None,
    position_mean: torch.Tensor | None,
    position_share: PositionShare,
) -> tuple[FeatureStatistics, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk's feature statistics, attention distances, exploitation rates and reconstruction loss (under the
    random masks of `noise` [B, N]); its block outputs are added to `position_share`."""
    config = model.config
    patch_tokens, cls_token, _ = model.vit.embeddings(chunk)
    _, hidden_states, _ = model.vit.encode(patch_tokens, cls_token, output_hidden_states=True)
    position_share.update([hidden[:, 1:] for hidden in hidden_states[1:]])
    masking_features = None  # another block than the masking's: cut that block's output
    if feature_layer in (None, config.feature_layer):
        masking_features = model.vit.masking_features(patch_tokens, cls_token, position_mean)
    features, attentions, grid = full_image_encoding(model, chunk, feature_layer, output_attentions=True)
    statistics = feature_statistics(features, config, grid, masking_features)
    if feature_layer is not None and feature_layer != config.num_hidden_layers:
        _, attentions, grid = full_image_encoding(model, chunk, output_attentions=True)
    distances = attention_distance(attentions, grid, config.patch_size)
    output = model(chunk, noise=noise.to(chunk.device), output_decoder_attentions=True, return_dict=True)
    return statistics, distances, exploitation_rates(output.decoder_attentions, output.mask), output.loss.float()


# ----- Figure-1 panel ---------------------------------------------------------------------------------------------


def unnormalize(pixel_values: torch.Tensor, image_mean: tuple[float, ...], image_std: tuple[float, ...]) -> np.ndarray:
    """Normalised images [B, C, H, W] -> RGB arrays [B, H, W, 3] in [0, 1] (float32), for display: with fewer than
    three channels the first is shown grey, with more the first three (RGB of RGBA)."""
    mean = torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1)
    images = pixel_values.detach().float().cpu() * std + mean
    images = images[:, :1].expand(-1, 3, -1, -1) if images.shape[1] < 3 else images[:, :3]
    return images.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def visible_patch_statistics(
    patches: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's mean and std [B, N, 1] (`patch_mean_std`) as far as the visible patches tell.

    A visible patch keeps its own; a masked patch gets the visible patches' values averaged with weights
    1 / distance² (Shepard interpolation over the patch grid), so it takes mostly its nearest visible neighbours'
    brightness and contrast. patches: [B, N, p*p*C]; mask: [B, N] bool, True = masked.
    """
    mean, std = patch_mean_std(patches)
    distances = patch_distances(grid, 1, patches.device).fill_diagonal_(float("inf"))
    weights = (~mask)[:, None, :] / distances.square()  # [B, masked query, visible key]; no self-weight
    weights = weights / weights.sum(dim=2, keepdim=True)
    own = ~mask[:, :, None]
    return torch.where(own, mean, weights @ mean), torch.where(own, std, weights @ std)


def predicted_pixel_values(
    model: SGMAEForPreTraining, logits: torch.Tensor, pixel_values: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The decoder's prediction [B, N, p*p*C] as normalised images [B, C, H, W] (the space of `pixel_values`).

    With `norm_pix_loss` the prediction is in normalised-patch space: each patch is de-normalised with the mean
    and std of the corresponding target patch, as MAE's visualisation does (for a masked patch, values the model
    never saw), or, given `mask` ([B, N], True = masked), with those of `visible_patch_statistics`.
    """
    logits = logits.float()
    if model.config.norm_pix_loss:
        patches = model.patchify(pixel_values.float())
        if mask is None:
            mean, std = patch_mean_std(patches)
        else:
            grid = (pixel_values.shape[2] // model.config.patch_size, pixel_values.shape[3] // model.config.patch_size)
            mean, std = visible_patch_statistics(patches, mask.bool(), grid)
        logits = logits * std + mean
    return model.unpatchify(logits, tuple(pixel_values.shape[2:]))


def _patch_map(mask: torch.Tensor, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """Patch flags [B, N] -> pixel flags [B, H, W, 1] (float)."""
    flags = mask.float().cpu().view(-1, *grid)
    flags = flags.repeat_interleave(patch_size, dim=1).repeat_interleave(patch_size, dim=2)
    return flags[..., None].numpy()


def _tint(images: np.ndarray, where: np.ndarray, colour: tuple[float, float, float], strength: float) -> np.ndarray:
    """Blend `colour` into `images` [B, H, W, 3] where the pixel flags [B, H, W, 1] are set."""
    blend = strength * where
    return images * (1 - blend) + np.asarray(colour, dtype=np.float32) * blend


def _outline_object(images: np.ndarray, part: np.ndarray, dim: float = 0.45) -> np.ndarray:
    """The object part [B, H, W, 1] shown on any photo: its own pixels unchanged, the rest dimmed and greyed, and a
    two-tone outline along its edge (OBJECT_OUTLINE inside, BACKGROUND_OUTLINE outside), legible whatever the
    photo's colours (a colour tint vanishes on a photo of that colour)."""
    inside = part[..., 0] > 0.5
    padded = np.pad(inside, ((0, 0), (1, 1), (1, 1)), mode="edge")
    neighbours = [padded[:, 1:-1, :-2], padded[:, 1:-1, 2:], padded[:, :-2, 1:-1], padded[:, 2:, 1:-1]]
    any_inside, all_inside = np.logical_or.reduce(neighbours), np.logical_and.reduce(neighbours)
    grey = images.mean(axis=-1, keepdims=True)
    shown = np.where(inside[..., None], images, dim * grey)
    shown = np.where((inside & ~all_inside)[..., None], np.asarray(OBJECT_OUTLINE, dtype=np.float32), shown)
    return np.where((~inside & any_inside)[..., None], np.asarray(BACKGROUND_OUTLINE, dtype=np.float32), shown)


MASKED_GREY = (0.5, 0.5, 0.5)
OBJECT_OUTLINE = (1.0, 1.0, 1.0)  # the object part's edge, inside; the background beside it is drawn black
BACKGROUND_OUTLINE = (0.0, 0.0, 0.0)
HINT_GREEN = (0.1, 0.85, 0.1)


@dataclass
class FigurePanel:
    """The paper's Figure-1 columns for a few images, as float RGB arrays [B, H, W, 3] in [0, 1], and what the
    masking saw in each image (arrays [B])."""

    columns: dict[str, np.ndarray] = field(default_factory=dict)  # column title -> images
    has_cut: np.ndarray | None = None  # bool; False where training would use a random mask instead
    mask_type: np.ndarray | None = None  # MaskType of the last two columns' mask: INFORMED, or FALLBACK (random)
    object_part_size: np.ndarray | None = None  # patches in the object part; -1 where the mask is a fallback
    edge_density: np.ndarray | None = None  # share of real edges in the affinity graph
    centre_masked_share: np.ndarray | None = None  # central patches the informed mask (no hints) hides; NaN: no cut
    half_cut: np.ndarray | None = None  # bool: the object part is a spatial half (`half_cuts`)
    object_centre_share: np.ndarray | None = None  # share of the object part in the central region; NaN: no cut

    def grid(self) -> np.ndarray:
        """All columns side by side, one image per row: a uint8 array [B * H, columns * W, 3] (e.g. for logging)."""
        rows = np.concatenate(list(self.columns.values()), axis=2)
        return (np.concatenate(list(rows), axis=0) * 255).round().astype(np.uint8)

    def save(self, path: str | Path, cell_inches: float = 1.5, dpi: int = 100) -> None:
        """Write the panel as a PNG with column titles: (columns x cell) by (rows x cell + 0.3) inches at `dpi`."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        names = list(self.columns)
        num_rows = len(next(iter(self.columns.values())))
        figure = Figure(figsize=(len(names) * cell_inches, num_rows * cell_inches + 0.3), dpi=dpi)
        FigureCanvasAgg(figure)
        axes = figure.subplots(num_rows, len(names), squeeze=False)
        top = 1 - 0.3 / (num_rows * cell_inches + 0.3)  # a 0.3-inch band for the titles
        figure.subplots_adjust(left=0.03, right=0.99, bottom=0.01, top=top, wspace=0.05, hspace=0.05)
        for row in range(num_rows):
            for column, name in enumerate(names):
                axis = axes[row, column]
                axis.imshow(self.columns[name][row], interpolation="nearest")
                axis.set_xticks([])
                axis.set_yticks([])
                if row == 0:
                    axis.set_title(name, fontsize=8)
                if column == 0 and self.has_cut is not None and not self.has_cut[row]:
                    axis.set_ylabel("no cut: random mask", fontsize=6)
        figure.savefig(str(path), dpi=dpi)


@torch.no_grad()
def figure_panel(
    model: SGMAEForPreTraining,
    pixel_values: torch.Tensor,
    image_mean: tuple[float, ...] = MAE_IMAGE_MEAN,
    image_std: tuple[float, ...] = MAE_IMAGE_STD,
    seed: int = 0,
    visible_statistics: bool = False,
    position_mean: torch.Tensor | None = None,
) -> FigurePanel:
    """Figure-1 columns for images [B, C, H, W] (normalised with image_mean / image_std).

    input; a random mask; the NCut bi-partition (object part outlined, the rest dimmed); the informed mask before
    hints; the informed mask with hints (hints in green); the reconstruction under that mask, visible patches pasted
    in.
    The masks are the ones training builds (`SGMAEForPreTraining.informed_masking`); an image without a usable cut
    gets training's fallback random mask in the last two columns. With `norm_pix_loss`, `visible_statistics`
    de-normalises the predicted patches with the visible patches' statistics (`visible_patch_statistics`) instead
    of each hidden patch's own. With `feature_centring`, `position_mean` [N, D] (`masking_position_mean` over many
    images) is the mean removed at each position; without it, the mean over these few images is.
    """
    config = model.config
    was_training = model.training
    model.eval()
    try:
        pixel_values = pixel_values.to(device=model.device, dtype=model.dtype)
        generator = torch.Generator(device=model.device).manual_seed(seed)
        patch_tokens, cls_token, grid = model.vit.embeddings(pixel_values)
        masking = model.informed_masking(patch_tokens, cls_token, generator, position_mean=position_mean)
        informed, hinted, cut = masking.informed_mask, masking.mask, masking.bipartition
        num_masked = num_masked_patches(hinted.shape[1], config.mask_ratio)
        noise = torch.rand(hinted.shape, generator=generator, device=model.device)
        random = mask_from_noise(noise, num_masked)
        output = model(pixel_values, mask=hinted, return_dict=True)
        predicted = predicted_pixel_values(model, output.logits, pixel_values, hinted if visible_statistics else None)
    finally:
        model.train(was_training)

    images = unnormalize(pixel_values, image_mean, image_std)
    reconstruction = unnormalize(predicted, image_mean, image_std)
    flags = {"random": random, "object": cut.object_part, "informed": informed, "hinted": hinted}
    maps = {name: _patch_map(value, grid, config.patch_size) for name, value in flags.items()}
    maps["hints"] = _patch_map(informed & ~hinted, grid, config.patch_size)
    columns = {
        "input": images,
        "random mask": _tint(images, maps["random"], MASKED_GREY, 0.85),
        "NCut bi-partition": _outline_object(images, maps["object"]),
        "informed mask": _tint(images, maps["informed"], MASKED_GREY, 0.85),
        "informed + hints": _tint(_tint(images, maps["hinted"], MASKED_GREY, 0.85), maps["hints"], HINT_GREEN, 0.45),
        "reconstruction": maps["hinted"] * reconstruction + (1 - maps["hinted"]) * images,
    }
    return FigurePanel(
        columns={name: array.astype(np.float32) for name, array in columns.items()},
        has_cut=cut.has_cut.cpu().numpy(),
        mask_type=masking.mask_type.cpu().numpy(),
        object_part_size=masking.object_part_size.cpu().numpy(),
        edge_density=masking.edge_density.float().cpu().numpy(),
        **cut_position_statistics(cut, informed, grid),
    )


def cut_position_statistics(cut: Bipartition, informed: torch.Tensor, grid: tuple[int, int]) -> dict[str, np.ndarray]:
    """Where the cut and the informed mask [B, N] (before hints) lie on the grid, per image, as `FigurePanel` fields:
    the central patches masked, whether the object part is a spatial half, its share in the centre (NaN: no cut)."""
    nan = torch.tensor(float("nan"), device=informed.device)
    return {
        "centre_masked_share": centre_masked_share(informed, cut.has_cut, grid).cpu().numpy(),
        "half_cut": (half_cuts(cut.object_part, grid) & cut.has_cut).cpu().numpy(),
        "object_centre_share": torch.where(cut.has_cut, object_centre_share(cut.object_part, grid), nan).cpu().numpy(),
    }
