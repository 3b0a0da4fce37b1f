"""Random and self-guided informed masking (docs/method.md §3).

Conventions: `features` is `[B, N, D]` (patch tokens, no [CLS]); a mask is a bool `[B, N]` tensor where
True means *masked* (hidden from the encoder, reconstructed by the decoder); every mask hides exactly
`num_masked` patches per image.

Informed masking is split in two (docs/method.md §3): `SelfGuidedMasking.ranking_scores` turns a whole image's patch
features into one ranking score per patch (steps 2-5), and `mask_from_scores` masks the top of a ranking and adds
hints (steps 6-7). Between the two, a training application may store the scores of each image and crop them with
each augmented view (§8), or use them at once (the per-step source).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import nn

from .configuration_sgmae import SGMAEConfig


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


def center_by_position(features: torch.Tensor, position_mean: torch.Tensor | None = None) -> torch.Tensor:
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


def normalized_affinity(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M = D^-1/2 W D^-1/2 and D^-1/2 (as a vector [B, N])."""
    inv_sqrt_degree = weights.sum(dim=2).rsqrt()
    return inv_sqrt_degree[:, :, None] * weights * inv_sqrt_degree[:, None, :], inv_sqrt_degree


def fiedler_vector_eigh(weights: torch.Tensor) -> torch.Tensor:
    """Reference solver: the second eigenvector of I - D^-1/2 W D^-1/2, mapped back by y = D^-1/2 z. [B, N]."""
    normalized, inv_sqrt_degree = normalized_affinity(weights.double())
    eye = torch.eye(weights.shape[1], dtype=normalized.dtype, device=weights.device)
    _, eigenvectors = torch.linalg.eigh(eye - normalized)
    return (eigenvectors[:, :, 1] * inv_sqrt_degree).to(weights.dtype)


def _project_out(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """P A P with P = I - v vᵀ, for unit v [B, N]: removes the trivial eigenvector from both sides of A."""
    a_v = matrix @ vector[:, :, None]
    v_a = vector[:, None, :] @ matrix
    v_a_v = v_a @ vector[:, :, None]
    return (
        matrix - a_v * vector[:, None, :] - vector[:, :, None] * v_a + vector[:, :, None] * v_a_v * vector[:, None, :]
    )


def _spectral_radius(matrix: torch.Tensor, squarings: int = 4) -> torch.Tensor:
    """Upper estimate of the spectral radius of symmetric matrices [B, N, N]: ||A^(2^k)||_F^(2^-k) >= rho. [B].

    With k = 4 squarings the estimate is at most N^(1/32) (< 1.2 for N <= 256) times too large, which is harmless
    for its one use, a shift that makes the deflated operator positive semi-definite.
    """
    power = matrix
    log_scale = torch.zeros(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    for _ in range(squarings):
        norm = power.norm(dim=(1, 2))
        log_scale = 2 * (log_scale + norm.log())
        power = power / norm[:, None, None]
        power = power @ power
    return ((log_scale + power.norm(dim=(1, 2)).log()) / 2**squarings).exp()


def fiedler_vector_power(weights: torch.Tensor, steps: int = 16) -> torch.Tensor:
    """Fiedler vector by batched power iteration, as repeated squaring of a shifted, deflated operator. [B, N].

    The Fiedler vector z is the eigenvector of the second-largest eigenvalue mu_2 of M = D^-1/2 W D^-1/2, whose
    largest is 1 with eigenvector sqrt(d). Projecting sqrt(d) out gives A; shifting by an estimate r of A's
    spectral radius makes A + rI positive semi-definite with top eigenvector z. The shift matters: feature graphs
    are near-complete (MAE features have mean cosine ~0.6), so mu_2 is tiny (~0.01) and close to mu_3; the
    textbook shift (M + I) / 2 squeezes the ratio (1 + mu_3) / (1 + mu_2) to within 1e-5 of 1, while
    (mu_3 + r) / (mu_2 + r) with r ~ mu_2 keeps it ~50x further from 1. Squaring `steps` times raises the operator
    to the power 2**steps in `steps` batched matmuls, which is fast on CPU and GPU alike (batched eigh is slow on
    CUDA). Returns non-finite values where the operator vanishes, so callers can fall back.
    """
    normalized, inv_sqrt_degree = normalized_affinity(weights)
    trivial = weights.sum(dim=2).sqrt()
    trivial = trivial / trivial.norm(dim=1, keepdim=True)
    deflated = _project_out(normalized, trivial)
    eye = torch.eye(weights.shape[1], dtype=weights.dtype, device=weights.device)
    shift = _spectral_radius(deflated)
    operator = _project_out(deflated + shift[:, None, None] * eye, trivial)
    power = operator
    for _ in range(steps):
        power = power / power.norm(dim=(1, 2), keepdim=True)
        power = _project_out(power @ power, trivial)
    # The power is (close to) rank one, z zᵀ: its largest column is a multiple of z.
    column = power.norm(dim=1).argmax(dim=1)
    z = power.gather(2, column[:, None, None].expand(-1, power.shape[1], 1)).squeeze(2)
    for _ in range(2):  # two plain power steps polish the direction
        z = (operator @ z[:, :, None]).squeeze(2)
        z = z - (z * trivial).sum(dim=1, keepdim=True) * trivial
        z = z / z.norm(dim=1, keepdim=True)
    return z * inv_sqrt_degree


def _ritz_pairs(alphas: torch.Tensor, betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz values [B, k] (ascending) and vectors [B, k, k] of the Lanczos tridiagonal with diagonal `alphas` [B, k]
    and off-diagonal `betas` [B, k - 1], in float64."""
    tridiagonal = torch.diag_embed(alphas) + torch.diag_embed(betas, 1) + torch.diag_embed(betas, -1)
    return torch.linalg.eigh(tridiagonal.double())


def fiedler_vector_lanczos(weights: torch.Tensor, steps: int = 32, tolerance: float | None = 1e-3) -> torch.Tensor:
    """Fiedler vector by batched Lanczos iteration with full re-orthogonalisation. [B, N].

    Krylov vectors of M = D^-1/2 W D^-1/2 are built from a fixed start vector with the trivial eigenvector sqrt(d)
    projected out, so the top Ritz vector of the small tridiagonal matrix is z, the eigenvector of mu_2. Each step
    costs one batched matrix-vector product (N^2 per image) instead of the power solver's matrix squarings (N^3 each):
    Lanczos converges on an extreme eigenvalue with the square root of the power method's gap dependence, and with
    `steps` >= N - 1 it is exact. Each new vector is orthogonalised against the earlier ones and the trivial vector
    twice (classical Gram-Schmidt). A row whose Krylov space is exhausted early stops growing
    (its later Ritz values are pushed below the spectrum).

    With a `tolerance`, the iteration stops once every row's top Ritz pair has converged: its residual
    ||M z - theta z|| = beta_k |y_k| is at most `tolerance` times the gap to the next Ritz value, which bounds the
    sine of z's angle to the true eigenvector by about `tolerance` (Davis-Kahan). It is checked after 12 steps and
    then at 1.5 times the last check (each check is a small batched `eigh`): graphs with a clear cut stop after a
    dozen steps; nearly degenerate ones (a sparse binary graph with several loose clusters) run up to `steps`.
    Returns non-finite values where the operator vanishes, so callers can fall back.
    """
    normalized, inv_sqrt_degree = normalized_affinity(weights)
    batch_size, num_nodes, _ = weights.shape
    steps = min(steps, num_nodes - 1)
    trivial = weights.sum(dim=2).sqrt()
    trivial = trivial / trivial.norm(dim=1, keepdim=True)
    # A fixed, deterministic start that no graph's Fiedler vector is orthogonal to in practice (no RNG drawn).
    start = torch.linspace(1.0, 2.0, num_nodes, dtype=weights.dtype, device=weights.device).sin() + 0.1
    vector = start.expand(batch_size, -1) - (start * trivial).sum(dim=1, keepdim=True) * trivial
    vector = vector / vector.norm(dim=1, keepdim=True)
    # Rows of the basis, with the trivial vector first: orthogonalising against it keeps sqrt(d) out.
    basis = torch.zeros(batch_size, steps + 1, num_nodes, dtype=weights.dtype, device=weights.device)
    basis[:, 0] = trivial
    alphas = torch.zeros(batch_size, steps, dtype=weights.dtype, device=weights.device)
    betas = torch.zeros(batch_size, steps, dtype=weights.dtype, device=weights.device)
    growing = torch.ones(batch_size, dtype=torch.bool, device=weights.device)
    size, next_check = steps, 12
    for step in range(steps):
        basis[:, step + 1] = vector
        product = torch.bmm(normalized, vector[:, :, None]).squeeze(2)
        alphas[:, step] = torch.where(growing, (product * vector).sum(dim=1), -3.0)  # -3: below M's spectrum
        known = basis[:, : step + 2]
        for _ in range(2):  # twice is enough (Kahan): once loses orthogonality when eigenvalues cluster
            product = product - torch.bmm(known.transpose(1, 2), torch.bmm(known, product[:, :, None])).squeeze(2)
        norm = product.norm(dim=1)
        if step + 1 == steps:
            break
        growing = growing & (norm > 1e-6)
        betas[:, step] = torch.where(growing, norm, 0.0)
        vector = torch.where(growing[:, None], product / norm.clamp(min=1e-30)[:, None], 0.0)
        if tolerance is not None and step + 1 == next_check:
            next_check = math.ceil(next_check * 1.5)
            values, vectors = _ritz_pairs(alphas[:, : step + 1], betas[:, :step])
            residual = betas[:, step].double() * vectors[:, -1, -1].abs()
            if bool((residual <= tolerance * (values[:, -1] - values[:, -2])).all()):
                size = step + 1
                break
    _, ritz_vectors = _ritz_pairs(alphas[:, :size], betas[:, : size - 1])
    z = torch.bmm(basis[:, 1 : size + 1].transpose(1, 2), ritz_vectors[:, :, -1:].to(weights.dtype)).squeeze(2)
    return z * inv_sqrt_degree


def fiedler_vector(weights: torch.Tensor, config: SGMAEConfig, early_stop: bool = True) -> torch.Tensor:
    """The Fiedler vector [B, N] with the config's solver; Lanczos without `early_stop` takes all its steps (its
    convergence check reads a value back from the device)."""
    if config.fiedler_solver == "eigh":
        return fiedler_vector_eigh(weights)
    if config.fiedler_solver == "power":
        return fiedler_vector_power(weights, config.fiedler_power_steps)
    tolerance = config.fiedler_lanczos_tolerance if early_stop else None
    return fiedler_vector_lanczos(weights, config.fiedler_lanczos_steps, tolerance)


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
class Bipartition:
    """The Normalized-Cut bi-partition of each image's affinity graph (docs/method.md §3, steps 2-4 and 8)."""

    weights: torch.Tensor  # [B, N, N] affinity graph W (with its eps)
    fiedler: torch.Tensor  # [B, N] Fiedler vector y
    object_part: torch.Tensor  # [B, N] bool, the part chosen as the object by `foreground_rule`
    edge_density: torch.Tensor  # [B] share of off-diagonal pairs joined by a real edge
    has_cut: torch.Tensor  # [B] bool; False where the image gets a random mask instead (step 8)


def ncut_bipartition(unit_features: torch.Tensor, config: SGMAEConfig, early_stop: bool = True) -> Bipartition:
    """Bi-partition L2-normalised features [B, N, D] with the config's graph, solver (`fiedler_vector`) and
    foreground rule."""
    similarity = unit_features @ unit_features.transpose(1, 2)
    weights, density = affinity_graph(
        similarity,
        config.graph_edges,
        config.graph_threshold,
        config.graph_eps,
        config.graph_quantile,
        config.graph_knn,
    )
    fiedler = fiedler_vector(weights, config, early_stop)
    num_patches = unit_features.shape[1]
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
        & (part_size < unit_features.shape[1])
        & (similarity_spread < 1 - 1e-4)
        & ~flat_graph
    )
    return Bipartition(weights, fiedler, part, density, has_cut)


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
    def cut(
        self, features: torch.Tensor, early_stop: bool = True
    ) -> tuple[Bipartition, torch.Tensor, torch.Tensor, torch.Tensor]:
        """NCut of patch features [B, N, D] (any dtype; float32 inside): the bi-partition, the similarity s [B, N] to
        the object prototype, the usable images [B] and the ranking scores [B, N] (NaN rows where not usable)."""
        features = features.float()
        finite = torch.isfinite(features).all(dim=(1, 2))
        features = nn.functional.normalize(torch.nan_to_num(features, nan=0.0, posinf=0.0, neginf=0.0), dim=-1)
        cut = ncut_bipartition(features, self.config, early_stop)
        usable = finite & cut.has_cut
        similarity = object_similarity(features, cut.object_part)
        return cut, similarity, usable, ranking_scores(similarity, cut.object_part, usable)

    def ranking_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Ranking scores [B, N] of whole-image patch features [B, N, D] (NaN rows: no usable cut)."""
        return self.cut(features)[3]

    @torch.no_grad()
    def mask_from_scores(
        self,
        scores: torch.Tensor,
        num_masked: int,
        generator: torch.Generator | None = None,
        hint_decay: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Informed masks from ranking scores [B, N] (a whole image's, or cropped with its view): the top
        `num_masked`, then hints (steps 6-7, as many as `hint_plan` says at `hint_decay`); a random mask for a row
        with a non-finite score (step 8).

        Returns the mask [B, N] (exactly `num_masked` per row), the mask types [B] and the mask before hints."""
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
        return mask, mask_type, before_hints

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
        cut, similarity, usable, scores = self.cut(features, early_stop=False)
        mask, mask_type, before_hints = self.mask_from_scores(scores, num_masked, generator, hint_decay)
        part = cut.object_part
        return MaskingResult(
            mask=mask,
            mask_type=mask_type,
            object_part_size=torch.where(usable, part.sum(dim=1), -1),
            edge_density=cut.edge_density,
            object_part=part & usable[:, None],
            informed_mask=before_hints,
            scores=similarity,
            bipartition=cut,
        )
