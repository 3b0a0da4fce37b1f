"""Random and self-guided informed masking (docs/method.md §3), in the method's order.

Step 1, the features: the model's own patch features of the full image (`SGMAEModel.masking_features`), optionally
centred per grid position here (`centre_by_position`) and L2-normalised. Step 2, the graph: `affinity_graph` of their
cosine similarities. Step 3, the cut: the Fiedler vector of the graph (`fiedler_solvers`) split in two
(`ncut_bipartition`). Step 4, the object part: `object_part`. Step 5, the ranking: each patch's similarity to the
object's prototype, the object part first (`ranking_scores`). Steps 6-7, the mask and hints: the top K of a ranking
(`informed_mask`) with hints revealed and as many patches masked instead (`add_hints`). Step 8: an image without a
usable cut gets a random mask (MAE's `mask_from_noise`).

`SelfGuidedMasking.rank` runs steps 2-5 and `mask_from_scores` steps 6-8. Between the two, a training application may
store the ranking of each whole image and crop it with each augmented view (§8, `mask_cache`), or use it at once (the
per-step source). Conventions: features are [B, N, D] (patch tokens, no [CLS]); a mask is a bool [B, N] tensor where
True means *masked* (hidden from the encoder, reconstructed by the decoder); every mask hides exactly `num_masked`
patches per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import nn

from .configuration_sgmae import SGMAEConfig
from .fiedler_solvers import fiedler_vector


class MaskType(IntEnum):
    """Which kind of mask a sample got, as reported in `SGMAEForPreTrainingOutput.mask_type`."""

    RANDOM = 0
    INFORMED = 1
    FALLBACK = 2  # informed masking was due, but the image had no usable bi-partition: random mask instead
    GIVEN = 3  # an explicit `mask` or `noise` was passed to forward


def mask_from_noise(noise: torch.Tensor, num_masked: int) -> torch.Tensor:
    """MAE's random masking: the `num_masked` patches with the largest noise are masked. noise: [B, N]."""
    ids_shuffle = torch.argsort(noise, dim=1)
    mask = torch.zeros_like(noise, dtype=torch.bool)
    num_kept = noise.shape[1] - num_masked
    return mask.scatter_(1, ids_shuffle[:, num_kept:], True)


# ----- step 1: the features -----------------------------------------------------------------------------------------


def centre_by_position(features: torch.Tensor, position_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Subtract from each patch feature [B, N, D] the mean feature of its grid position over images [N, D].

    Without `position_mean`, the batch's own mean is used (a batch of one image is returned unchanged: its mean
    is the image itself). What all images share at a grid position (the position embedding's trace, which
    dominates a small MAE's features) goes; what the image adds there stays.
    """
    if position_mean is None:
        if features.shape[0] < 2:
            return features
        position_mean = features.mean(dim=0)
    return features - position_mean.to(features.dtype)


# ----- step 2: the graph --------------------------------------------------------------------------------------------


def affinity_graph(
    similarity: torch.Tensor,
    edges: str,
    threshold: float,
    eps: float,
    quantile: float = 0.5,
    knn: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affinity W [B, N, N] of cosine similarities [B, N, N], and each graph's edge density [B].

    `edges`: `similarity` (max(S, 0)); binary graphs joining the pairs whose similarity is above `threshold`
    (`binary_fixed`), the image's mean similarity (`binary_mean`) or the image's `quantile` quantile of its
    off-diagonal similarities (`binary_quantile`); or `knn`, joining each patch to its `knn` most similar other
    patches (and so, symmetrised, to every patch that counts it among its own `knn`). Edge density is the share of
    off-diagonal pairs joined by a real edge (weight above eps): near 1 means the graph is almost complete and the
    cut is decided by very few edges.
    """
    num_nodes = similarity.shape[1]
    off_diagonal = ~torch.eye(num_nodes, dtype=torch.bool, device=similarity.device)
    if edges == "similarity":
        weights = similarity.clamp(min=0)
    elif edges == "knn":
        neighbours = similarity.masked_fill(~off_diagonal, float("-inf")).topk(min(knn, num_nodes - 1), dim=2).indices
        joined = torch.zeros_like(similarity, dtype=torch.bool).scatter_(2, neighbours, True)
        weights = (joined | joined.transpose(1, 2)).to(similarity.dtype)
    else:
        if edges == "binary_fixed":
            tau = torch.full_like(similarity[:, :1, :1], threshold)
        elif edges == "binary_quantile":
            tau = off_diagonal_quantile(similarity, quantile)[:, None, None]
        else:  # binary_mean: the image's own mean similarity, so the graph is never near complete
            tau = similarity.mean(dim=(1, 2), keepdim=True)
        weights = (similarity > tau).to(similarity.dtype)
    density = ((weights > 0) & off_diagonal).sum(dim=(1, 2)) / max(num_nodes * (num_nodes - 1), 1)
    return weights + eps, density


def off_diagonal_quantile(similarity: torch.Tensor, quantile: float) -> torch.Tensor:
    """The order statistic of each symmetric [N, N] matrix's off-diagonal entries at `quantile` [B]: the largest
    value not above `torch.quantile`'s linear interpolation, so `similarity > it` joins the same pairs. Found by
    selection (`kthvalue`) among the N(N-1)/2 pairs above the diagonal, each of which appears twice in the full list,
    instead of sorting all N(N-1)."""
    num_nodes = similarity.shape[1]
    rows, columns = torch.triu_indices(num_nodes, num_nodes, offset=1, device=similarity.device)
    lower = math.floor(quantile * (num_nodes * (num_nodes - 1) - 1))  # torch.quantile's lower index, full list
    return similarity[:, rows, columns].kthvalue(lower // 2 + 1, dim=1).values


# ----- step 3: the cut ----------------------------------------------------------------------------------------------


@dataclass
class Bipartition:
    """The Normalized-Cut bi-partition of each image's affinity graph (docs/method.md §3, steps 2-4 and 8)."""

    weights: torch.Tensor  # [B, N, N] affinity graph W (with its eps)
    fiedler: torch.Tensor  # [B, N] Fiedler vector y
    object_part: torch.Tensor  # [B, N] bool, the part chosen as the object by `foreground_rule`
    edge_density: torch.Tensor  # [B] share of off-diagonal pairs joined by a real edge
    has_cut: torch.Tensor  # [B] bool; False where the image gets a random mask instead (step 8)


def ncut_bipartition(features: torch.Tensor, config: SGMAEConfig, early_stop: bool = True) -> Bipartition:
    """Bi-partition unit (L2-normalised) masking features [B, N, D] with the config's graph, Fiedler solver and
    foreground rule; without `early_stop` the Lanczos solver takes all its steps (nothing is read back)."""
    similarity = features @ features.transpose(1, 2)
    weights, density = affinity_graph(
        similarity,
        config.graph_edges,
        config.graph_threshold,
        config.graph_eps,
        config.graph_quantile,
        config.graph_knn,
    )
    tolerance = config.fiedler_lanczos_tolerance if early_stop else None
    fiedler = fiedler_vector(
        weights, config.fiedler_solver, config.fiedler_lanczos_steps, tolerance, config.fiedler_power_steps
    )
    num_patches = features.shape[1]
    grid = config.grid_size if config.grid_size[0] * config.grid_size[1] == num_patches else None
    if grid is None and math.isqrt(num_patches) ** 2 == num_patches:  # another image size: a square grid
        grid = (math.isqrt(num_patches),) * 2
    rule = config.foreground_rule if grid is not None or config.foreground_rule != "inner" else "max_abs"
    part = object_part(fiedler, rule, config.partition_split, grid)  # `inner` without a known grid: `max_abs`
    part_size = part.sum(dim=1)
    # Patches that are all alike (e.g. identical features), or a graph whose edges all weigh the same (a binary
    # graph with every pair above the threshold), have no cut worth following.
    similarity_spread = similarity.amin(dim=(1, 2))
    weight_max = weights.amax(dim=(1, 2))
    flat_graph = weight_max - weights.amin(dim=(1, 2)) <= 1e-6 * weight_max
    has_cut = (
        torch.isfinite(fiedler).all(dim=1)
        & (part_size > 0)
        & (part_size < features.shape[1])
        & (similarity_spread < 1 - 1e-4)
        & ~flat_graph
    )
    return Bipartition(weights, fiedler, part, density, has_cut)


# ----- step 4: the object part --------------------------------------------------------------------------------------


def border_patches(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """[N] bool: the patches in the first or last row or column of a row-major grid."""
    rows = torch.arange(grid[0], device=device)[:, None]
    columns = torch.arange(grid[1], device=device)[None, :]
    return ((rows == 0) | (rows == grid[0] - 1) | (columns == 0) | (columns == grid[1] - 1)).flatten()


def object_part(
    fiedler: torch.Tensor, rule: str, split: str = "mean", grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """Bi-partition y at its mean (`split="mean"`) or at zero (`"zero"`) and pick the object part [B, N] (bool).

    `max_abs` (TokenCut): the part holding the node with the largest |y|; `smaller`: the part with fewer nodes
    (at a tie, the `max_abs` part); `inner`: the part with the smaller share of its patches on the border of the
    patch grid (rows, columns) `grid` (the boundary prior of saliency detection: the background touches the frame;
    at a tie, the `max_abs` part). All are invariant to the sign of y, which eigen-solvers leave arbitrary.
    """
    boundary = fiedler.mean(dim=1, keepdim=True) if split == "mean" else torch.zeros_like(fiedler[:, :1])
    upper = fiedler > boundary
    extreme = fiedler.abs().argmax(dim=1, keepdim=True)
    max_abs_part = upper == upper.gather(1, extreme)
    if rule == "max_abs":
        return max_abs_part
    if rule == "inner":
        if grid is None:
            raise ValueError("foreground_rule 'inner' needs the patch grid")
        border = border_patches(grid, fiedler.device).to(fiedler.dtype)
        upper_float = upper.to(fiedler.dtype)
        upper_share = (upper_float * border).sum(dim=1, keepdim=True) / upper_float.sum(dim=1, keepdim=True).clamp(
            min=1
        )
        lower_share = ((1 - upper_float) * border).sum(dim=1, keepdim=True) / (1 - upper_float).sum(
            dim=1, keepdim=True
        ).clamp(min=1)
        inner_part = upper == (upper_share < lower_share)
        return torch.where(upper_share == lower_share, max_abs_part, inner_part)
    upper_size = upper.sum(dim=1, keepdim=True) * 2
    smaller_part = upper == (upper_size < fiedler.shape[1])
    return torch.where(upper_size == fiedler.shape[1], max_abs_part, smaller_part)


# ----- step 5: the ranking ------------------------------------------------------------------------------------------


def object_similarity(features: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """s_i = <f_i, c>, c the normalised mean feature of the object part. features: [B, N, D] unit rows."""
    weights = part.to(features.dtype)
    prototype = (weights[:, :, None] * features).sum(dim=1) / weights.sum(dim=1, keepdim=True).clamp(min=1)
    prototype = nn.functional.normalize(prototype, dim=-1)
    return (features @ prototype[:, :, None]).squeeze(2)


# Added to the object part's similarities, which lie in [-1, 1], so that the whole part ranks above the background.
OBJECT_RANK_OFFSET = 3.0


def ranking_scores(similarity: torch.Tensor, part: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
    """The informed-mask ranking [B, N]: object part first (s_i + 3), then the other patches by s_i; NaN rows where
    the image has no usable cut (`usable` [B] False), which `mask_from_scores` gives a random mask."""
    scores = similarity + OBJECT_RANK_OFFSET * part.to(similarity.dtype)
    return scores.masked_fill(~usable[:, None], float("nan"))


def object_part_of_scores(scores: torch.Tensor) -> torch.Tensor:
    """The patches [B, N] (bool) a ranking places in the object part: above the midpoint of the offset gap, so that
    a ranking resampled with a crop counts a patch as object when it mostly lies on the object."""
    return scores > OBJECT_RANK_OFFSET / 2


# ----- steps 6-7: the mask and hints --------------------------------------------------------------------------------


def informed_mask(scores: torch.Tensor, num_masked: int) -> torch.Tensor:
    """Mask the `num_masked` patches of highest ranking score [B, N] (finite): the object part first, then the most
    object-like other patches. [B, N] bool."""
    masked_ids = scores.topk(num_masked, dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, masked_ids, True)


def hint_plan(config: SGMAEConfig, num_patches: int, num_masked: int, decay: float = 1.0) -> tuple[int, float | None]:
    """How many hints, and the share of the ranking they are drawn from (None: all masked patches), at `decay`
    (1 at the informed start, falling to 0 at the end of training with `hint_decay_power`; docs/method.md §3 step 7).

    The count is round(ratio x K) (`hint_count_base="masked"`) or int(ratio x N) (`"patches"`, the authors' code),
    at least `hint_min_count` when the ratio is above 0, at most K and N - K. With `hint_decay_power`, the ratio and
    the portion move linearly from their values to `hint_ratio_final` / `hint_portion_final` as `decay` goes to 0."""
    ratio, portion = config.hint_ratio, config.hint_portion
    if config.hint_decay_power is not None:
        ratio = config.hint_ratio_final + decay * (ratio - config.hint_ratio_final)
        if portion is not None:
            portion = config.hint_portion_final + decay * (portion - config.hint_portion_final)
    count = round(ratio * num_masked) if config.hint_count_base == "masked" else int(ratio * num_patches)
    if ratio > 0:
        count = max(count, config.hint_min_count)
    return min(count, num_patches - num_masked, num_masked), portion


def hint_decay(step: int, start: int, total_steps: int, power: float | None) -> float:
    """1 - ((step - start) / (total - start)) ** power from the informed start to the end of training (the authors'
    polynomial schedule); 1 without a power or an unknown schedule length."""
    if power is None or total_steps <= start:
        return 1.0
    progress = min(max((step - start) / (total_steps - start), 0.0), 1.0)
    return 1.0 - progress**power


def add_hints(
    mask: torch.Tensor,
    scores: torch.Tensor,
    num_hints: int,
    sampling: str,
    generator: torch.Generator | None = None,
    portion: float | None = None,
) -> torch.Tensor:
    """Reveal `num_hints` masked patches and mask as many visible ones, so the count of masked stays the same.

    Hints are drawn among the masked patches with probability proportional to their rank by the ranking score
    (`similarity`: the most object-like masked patch is the likeliest) or uniformly; with `portion`, uniformly among
    the masked patches in the top `portion` of the ranking (the authors' `hint_portion`; then the other masked ones
    if those run out). The patches masked instead are drawn uniformly among the visible non-hints.
    """
    if num_hints == 0:
        return mask
    if portion is not None:
        top = max(1, math.ceil(portion * scores.shape[1]))
        in_top = torch.zeros_like(mask).scatter_(1, scores.topk(top, dim=1).indices, True)
        hint_weights = (mask & in_top).to(scores.dtype) + 1e-6 * mask.to(scores.dtype)
    elif sampling == "similarity":
        ranks = scores.masked_fill(~mask, float("-inf")).argsort(dim=1).argsort(dim=1)
        hint_weights = (ranks - (~mask).sum(dim=1, keepdim=True) + 1).clamp(min=0).to(scores.dtype)
    else:
        hint_weights = mask.to(scores.dtype)
    hints = torch.multinomial(hint_weights, num_hints, replacement=False, generator=generator)
    newly_masked = torch.multinomial((~mask).to(scores.dtype), num_hints, replacement=False, generator=generator)
    return mask.scatter(1, hints, False).scatter(1, newly_masked, True)


@dataclass
class InformedMasks:
    """Informed masks built from rankings (steps 6-8)."""

    mask: torch.Tensor  # [B, N] bool, True = masked: exactly K per row, hints included (a random mask: no cut)
    mask_type: torch.Tensor  # [B] long: MaskType.INFORMED, or FALLBACK where the ranking was not finite
    before_hints: torch.Tensor  # [B, N] bool, the top K of the ranking before hints


# ----- the masking module -------------------------------------------------------------------------------------------


@dataclass
class Ranking:
    """Steps 2-5 of a batch: the cut, each patch's similarity to the object, and the ranking a mask is the top of."""

    bipartition: Bipartition  # the cut: graph, Fiedler vector, object part, has_cut
    similarity: torch.Tensor  # [B, N] s_i = <f_i, c>, c the object part's prototype
    usable: torch.Tensor  # [B] bool: finite features and a usable cut (else a random mask, step 8)
    scores: torch.Tensor  # [B, N] the ranking (`ranking_scores`); NaN rows where not usable


@dataclass
class MaskingResult:
    """A batch of masks with what the masking saw (for training statistics, the analysis and the Figure-1 panel)."""

    mask: torch.Tensor  # [B, N] bool, True = masked: the informed mask with hints, or the fallback random mask
    mask_type: torch.Tensor  # [B] long, MaskType values
    object_part_size: torch.Tensor  # [B] long, patches in the object part; -1 where no partition was used
    edge_density: torch.Tensor  # [B] float, share of real edges in the affinity graph
    object_part: torch.Tensor  # [B, N] bool, the NCut object part (all False where not used)
    informed_mask: torch.Tensor  # [B, N] bool, the informed mask before hints (whether or not it was used)
    scores: torch.Tensor  # [B, N] similarity of each patch to the object prototype
    bipartition: Bipartition  # the cut itself: graph, Fiedler vector, object part, has_cut


class SelfGuidedMasking(nn.Module):
    """Builds informed masks from the model's own patch features (docs/method.md §3, steps 2-8). No parameters.

    `ranking_scores` (steps 2-5) and `mask_from_scores` (steps 6-8) are the two halves; `forward` runs both on the
    same features and reports what it saw."""

    def __init__(self, config: SGMAEConfig):
        super().__init__()
        self.config = config

    @torch.no_grad()
    def rank(self, features: torch.Tensor, early_stop: bool = True) -> Ranking:
        """Steps 2-5 on masking features [B, N, D] (any dtype; unit float32 inside): the cut and the ranking."""
        features = features.float()
        finite = torch.isfinite(features).all(dim=(1, 2))
        features = nn.functional.normalize(torch.nan_to_num(features, nan=0.0, posinf=0.0, neginf=0.0), dim=-1)
        cut = ncut_bipartition(features, self.config, early_stop)
        usable = finite & cut.has_cut
        similarity = object_similarity(features, cut.object_part)
        return Ranking(cut, similarity, usable, ranking_scores(similarity, cut.object_part, usable))

    def ranking_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Ranking scores [B, N] of whole-image masking features [B, N, D] (NaN rows: no usable cut)."""
        return self.rank(features).scores

    @torch.no_grad()
    def mask_from_scores(
        self,
        scores: torch.Tensor,
        num_masked: int,
        generator: torch.Generator | None = None,
        hint_decay: float = 1.0,
    ) -> InformedMasks:
        """Informed masks from ranking scores [B, N] (a whole image's, or cropped with its view): the top
        `num_masked`, then hints (steps 6-7, as many as `hint_plan` says at `hint_decay`); a random mask for a row
        with a non-finite score (step 8)."""
        batch_size, num_patches = scores.shape
        if not 0 < num_masked < num_patches:
            raise ValueError(f"num_masked must be in [1, {num_patches - 1}], got {num_masked}")
        scores = scores.float()
        usable = torch.isfinite(scores).all(dim=1)
        scores = torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
        before_hints = informed_mask(scores, num_masked)
        num_hints, portion = hint_plan(self.config, num_patches, num_masked, hint_decay)
        mask = add_hints(before_hints, scores, num_hints, self.config.hint_sampling, generator, portion)
        noise = torch.rand(batch_size, num_patches, device=scores.device, generator=generator)
        mask = torch.where(usable[:, None], mask, mask_from_noise(noise, num_masked))
        mask_type = torch.where(usable, int(MaskType.INFORMED), int(MaskType.FALLBACK))
        return InformedMasks(mask, mask_type, before_hints)

    @torch.no_grad()
    def forward(
        self,
        features: torch.Tensor,
        num_masked: int,
        generator: torch.Generator | None = None,
        hint_decay: float = 1.0,
    ) -> MaskingResult:
        """features: [B, N, D] patch features of the full image (any dtype; computed in float32)."""
        num_patches = features.shape[1]
        if not 0 < num_masked < num_patches:
            raise ValueError(f"num_masked must be in [1, {num_patches - 1}], got {num_masked}")
        # Inside a training step: no early stop, so the step never waits for the device.
        ranking = self.rank(features, early_stop=False)
        cut, usable = ranking.bipartition, ranking.usable
        masks = self.mask_from_scores(ranking.scores, num_masked, generator, hint_decay)
        part = cut.object_part
        return MaskingResult(
            mask=masks.mask,
            mask_type=masks.mask_type,
            object_part_size=torch.where(usable, part.sum(dim=1), -1),
            edge_density=cut.edge_density,
            object_part=part & usable[:, None],
            informed_mask=masks.before_hints,
            scores=ranking.similarity,
            bipartition=cut,
        )
