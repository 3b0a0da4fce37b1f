"""Self-guided masking (docs/method.md §3): graphs, Fiedler solvers, object part, informed mask, hints, fallbacks."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from conftest import gram, tiny_config
from torch import nn

from modeling_sgmae import MaskType, SelfGuidedMasking, SGMAEForPreTraining
from modeling_sgmae.configuration_sgmae import num_masked_patches
from modeling_sgmae.fiedler_solvers import fiedler_vector_eigh, fiedler_vector_lanczos, fiedler_vector_power
from modeling_sgmae.masking_sgmae import (
    add_hints,
    affinity_graph,
    hint_decay,
    hint_plan,
    informed_mask,
    mask_from_noise,
    object_part,
    object_similarity,
    ranking_scores,
)

NUM_PATCHES = 64
NUM_MASKED = 48  # K for 64 patches at mask ratio 0.75
HINT_SETTINGS = [(0.0, "similarity"), (0.06, "similarity"), (0.2, "uniform")]


def clustered_features(
    batch_size: int,
    num_patches: int,
    dim: int = 32,
    object_size: int | None = None,
    noise: float = 0.3,
    offset: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [B, N, D] of an object cluster and a background cluster, and the object membership [B, N]."""
    if object_size is None:
        sizes = torch.randint(num_patches // 8, num_patches // 3, (batch_size,), generator=generator)
    else:
        sizes = torch.full((batch_size,), object_size)
    order = torch.rand(batch_size, num_patches, generator=generator).argsort(dim=1)
    is_object = order < sizes[:, None]
    # Two orthogonal cluster centres of norm sqrt(dim), like the noise, so cosines depend only on noise and offset.
    centers = torch.linalg.qr(torch.randn(batch_size, dim, 2, generator=generator)).Q.transpose(1, 2) * dim**0.5
    features = centers.gather(1, is_object.long()[:, :, None].expand(-1, -1, dim))
    features = features + noise * torch.randn(batch_size, num_patches, dim, generator=generator) + offset
    return features, is_object


def unit(features: torch.Tensor) -> torch.Tensor:
    return nn.functional.normalize(features, dim=-1)


def masking(**overrides) -> SelfGuidedMasking:
    return SelfGuidedMasking(tiny_config(**overrides))


# ----- K and the basic mask functions ---------------------------------------------------------------------------
def test_num_masked_patches_uses_mae_rounding():
    assert num_masked_patches(64, 0.75) == 48
    assert num_masked_patches(196, 0.75) == 147
    assert num_masked_patches(10, 0.75) == 8  # int(10 * 0.25) = 2 kept
    assert num_masked_patches(50, 0.6) == 30


def test_mask_from_noise_masks_the_largest_noise():
    noise = torch.rand(4, NUM_PATCHES)
    mask = mask_from_noise(noise, NUM_MASKED)
    assert mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [NUM_MASKED] * 4
    kept_max = noise.masked_fill(mask, -1).amax(dim=1)
    masked_min = noise.masked_fill(~mask, 2).amin(dim=1)
    assert bool((kept_max < masked_min).all())


@pytest.mark.parametrize("graph_edges", ["similarity", "binary_fixed", "binary_mean"])
@pytest.mark.parametrize("foreground_rule", ["max_abs", "smaller"])
@pytest.mark.parametrize(("hint_ratio", "hint_sampling"), HINT_SETTINGS)
def test_informed_masks_hide_exactly_k(graph_edges, foreground_rule, hint_ratio, hint_sampling):
    features, _ = clustered_features(16, NUM_PATCHES)
    module = masking(
        graph_edges=graph_edges, foreground_rule=foreground_rule, hint_ratio=hint_ratio, hint_sampling=hint_sampling
    )
    result = module(features, NUM_MASKED)
    assert result.mask.shape == (16, NUM_PATCHES)
    assert result.mask.dtype == torch.bool
    assert result.mask.sum(dim=1).tolist() == [NUM_MASKED] * 16
    assert result.mask_type.tolist() == [int(MaskType.INFORMED)] * 16
    assert bool((result.object_part_size == result.object_part.sum(dim=1)).all())


@pytest.mark.parametrize("num_masked", [1, 10, 32, 63])
def test_informed_masks_hide_exactly_k_for_any_budget(num_masked):
    features, _ = clustered_features(8, NUM_PATCHES)
    result = masking(hint_ratio=0.5)(features, num_masked)
    assert result.mask.sum(dim=1).tolist() == [num_masked] * 8


@pytest.mark.parametrize("num_masked", [0, NUM_PATCHES])
def test_masking_rejects_a_budget_without_masked_or_visible_patches(num_masked):
    features, _ = clustered_features(2, NUM_PATCHES)
    with pytest.raises(ValueError, match="num_masked"):
        masking()(features, num_masked)


def model_for_strategy(strategy: str) -> SGMAEForPreTraining:
    model = SGMAEForPreTraining(tiny_config(informed_mask_source="cached" if strategy == "cached" else "step"))
    if strategy in ("informed", "fallback", "cached"):
        model.set_training_progress(1, 1)
    if strategy == "fallback":
        # Every patch embeds to the same vector (no pixels, no positions): no bi-partition exists.
        with torch.no_grad():
            model.vit.embeddings.patch_embeddings.projection.weight.zero_()
            model.vit.embeddings.position_embeddings.zero_()
    return model


@pytest.mark.parametrize("strategy", ["random", "noise", "mask", "informed", "fallback", "cached"])
def test_every_model_strategy_hides_exactly_k(strategy):
    model = model_for_strategy(strategy)
    pixel_values = torch.randn(3, 3, 32, 32)
    kwargs = {}
    if strategy == "noise":
        kwargs["noise"] = torch.rand(3, NUM_PATCHES)
    if strategy == "mask":
        kwargs["mask"] = mask_from_noise(torch.rand(3, NUM_PATCHES), NUM_MASKED)
    if strategy == "cached":
        kwargs["mask_scores"] = model.informed_mask_scores(pixel_values)
    output = model(pixel_values, **kwargs)
    assert output.mask.sum(dim=1).tolist() == [NUM_MASKED] * 3
    expected_type = {
        "random": MaskType.RANDOM,
        "noise": MaskType.GIVEN,
        "mask": MaskType.GIVEN,
        "informed": MaskType.INFORMED,
        "fallback": MaskType.FALLBACK,
        "cached": MaskType.INFORMED,
    }[strategy]
    assert output.mask_type.tolist() == [int(expected_type)] * 3
    if strategy == "mask":
        assert torch.equal(output.mask.bool(), kwargs["mask"])
    assert torch.isfinite(output.loss)


# ----- informed mask and hints --------------------------------------------------------------------------------
@pytest.mark.parametrize("object_size", [5, 20, NUM_MASKED])
def test_small_object_part_is_masked_entirely_then_most_object_like_background(object_size):
    features, _ = clustered_features(8, NUM_PATCHES, object_size=object_size)
    result = masking(hint_ratio=0.0)(features, NUM_MASKED)
    assert result.mask_type.tolist() == [int(MaskType.INFORMED)] * 8
    part, mask = result.object_part, result.mask
    assert bool((part.sum(dim=1) <= NUM_MASKED).all())
    assert bool((mask | ~part).all()), "a patch of the object part stayed visible"
    # The rest of the budget went to the background patches most similar to the object prototype.
    scores = object_similarity(unit(features), part)
    for row in range(8):
        background = ~part[row]
        masked_background = scores[row][background & mask[row]]
        visible = scores[row][~mask[row]]
        if masked_background.numel():
            assert masked_background.min() >= visible.max()


def test_large_object_part_masks_its_most_object_like_patches():
    similarity = torch.tensor([[0.9, 0.1, 0.5, 0.8, -0.2, 0.3]])
    part = torch.tensor([[True, True, True, True, False, False]])
    scores = ranking_scores(similarity, part, torch.tensor([True]))
    mask = informed_mask(scores, 2)
    assert mask.tolist() == [[True, False, False, True, False, False]]
    mask = informed_mask(scores, 5)  # the whole part, then the best background patch
    assert mask.tolist() == [[True, True, True, True, False, True]]


@pytest.mark.parametrize("hint_sampling", ["similarity", "uniform"])
@pytest.mark.parametrize("hint_ratio", [0.06, 0.1, 0.3])
def test_hints_reveal_round_hint_ratio_k_masked_patches_and_mask_as_many_others(hint_ratio, hint_sampling):
    features, _ = clustered_features(16, NUM_PATCHES)
    without = masking(hint_ratio=0.0)(features, NUM_MASKED)
    generator = torch.Generator().manual_seed(0)
    module = masking(hint_ratio=hint_ratio, hint_sampling=hint_sampling)
    with_hints = module(features, NUM_MASKED, generator=generator)
    num_hints = round(hint_ratio * NUM_MASKED)
    assert num_hints > 0
    revealed = without.mask & ~with_hints.mask  # the hints: informed-masked patches shown to the encoder
    newly_masked = ~without.mask & with_hints.mask
    assert revealed.sum(dim=1).tolist() == [num_hints] * 16
    assert newly_masked.sum(dim=1).tolist() == [num_hints] * 16
    assert with_hints.mask.sum(dim=1).tolist() == [NUM_MASKED] * 16
    assert torch.equal(with_hints.object_part, without.object_part)


def test_similarity_hints_favour_object_like_patches():
    """Hints are drawn with probability increasing with s: over many draws they sit higher in the ranking."""
    scores = torch.linspace(-1, 1, NUM_PATCHES).expand(4000, -1)
    mask = torch.zeros(4000, NUM_PATCHES, dtype=torch.bool)
    mask[:, NUM_PATCHES - NUM_MASKED :] = True  # the K highest scores are masked
    mean_rank = {}
    for sampling in ("similarity", "uniform"):
        generator = torch.Generator().manual_seed(0)
        hinted = add_hints(mask, scores, 3, sampling, generator)
        hints = mask & ~hinted
        assert hints.sum(dim=1).eq(3).all()
        ranks = torch.arange(NUM_PATCHES).expand(4000, -1)[hints] - (NUM_PATCHES - NUM_MASKED) + 1  # 1..K
        mean_rank[sampling] = ranks.float().mean().item()
    # Rank-proportional sampling: E[rank] ~ (2K + 1) / 3 = 32.3; uniform: (K + 1) / 2 = 24.5.
    assert mean_rank["uniform"] == pytest.approx(24.5, abs=1.0)
    assert mean_rank["similarity"] > 29.0


def test_patches_masked_instead_of_hints_are_visible_non_hints():
    scores = torch.rand(200, NUM_PATCHES)
    mask = mask_from_noise(torch.rand(200, NUM_PATCHES), NUM_MASKED)
    hinted = add_hints(mask, scores, 5, "similarity", torch.Generator().manual_seed(1))
    newly_masked = hinted & ~mask
    assert newly_masked.sum(dim=1).eq(5).all()
    hints = mask & ~hinted
    assert not bool((hints & newly_masked).any())


# ----- Fiedler solvers ----------------------------------------------------------------------------------------
ITERATIVE_SOLVERS = {"power": fiedler_vector_power, "lanczos": fiedler_vector_lanczos}


def solver_agreement(
    features: torch.Tensor, edges: str = "similarity", solver: str = "power"
) -> tuple[torch.Tensor, torch.Tensor]:
    """|cos| between an iterative solver's and eigh's Fiedler vectors, and the share of nodes whose side agrees."""
    weights, _ = affinity_graph(gram(unit(features)), edges, 0.2, 1e-5)
    power, reference = ITERATIVE_SOLVERS[solver](weights), fiedler_vector_eigh(weights)
    assert torch.isfinite(power).all()
    cosine = nn.functional.cosine_similarity(power, reference, dim=1).abs()
    sides_power = power > power.mean(dim=1, keepdim=True)
    sides_reference = reference > reference.mean(dim=1, keepdim=True)
    same = (sides_power == sides_reference).float().mean(dim=1)
    return cosine, torch.maximum(same, 1 - same)  # up to the sign of the eigenvector


@pytest.mark.parametrize("num_patches", [64, 196])
@pytest.mark.parametrize(
    ("dim", "offset"),
    # offset 0: mean cosine ~0; offset 1.5 / 2.5: mean cosine ~0.7 / ~0.86, the near-complete graphs of a trained
    # MAE (docs/method.md: mean similarity 0.58-0.68), where mu_2 and mu_3 are within ~1e-4 of each other.
    [(64, 0.0), (192, 0.0), (192, 1.5), (192, 2.5)],
)
@pytest.mark.parametrize("solver", ITERATIVE_SOLVERS)
def test_iterative_solvers_match_eigh_on_random_graphs(num_patches, dim, offset, solver):
    generator = torch.Generator().manual_seed(num_patches + dim)
    features = torch.randn(24, num_patches, dim, generator=generator) + offset
    cosine, agreement = solver_agreement(features, solver=solver)
    assert agreement.min() >= 0.99
    assert cosine.min() > 0.999


@pytest.mark.parametrize("num_patches", [64, 196])
@pytest.mark.parametrize("edges", ["similarity", "binary_fixed", "binary_mean", "binary_quantile", "knn"])
@pytest.mark.parametrize("solver", ITERATIVE_SOLVERS)
def test_iterative_solvers_match_eigh_on_clustered_graphs(num_patches, edges, solver):
    generator = torch.Generator().manual_seed(7)
    features, is_object = clustered_features(24, num_patches, dim=64, noise=0.6, offset=0.5, generator=generator)
    cosine, agreement = solver_agreement(features, edges, solver)
    assert agreement.min() >= 0.99
    assert cosine.min() > 0.9999
    # binary_fixed: with tau = 0.2 many cross-cluster pairs (cosine ~0.15 +- 0.1) are edges too; binary_quantile and
    # knn: a fixed share of pairs or neighbours, not the clusters, decides the edges
    if edges in ("similarity", "binary_mean"):
        weights, _ = affinity_graph(gram(unit(features)), edges, 0.2, 1e-5)
        sides = ITERATIVE_SOLVERS[solver](weights)
        sides = sides > sides.mean(dim=1, keepdim=True)
        recovered = (sides == is_object).float().mean(dim=1)
        assert torch.maximum(recovered, 1 - recovered).min() == 1.0  # the planted clusters


def test_every_solver_gives_the_same_masks():
    features, _ = clustered_features(16, NUM_PATCHES)
    solvers = ("lanczos", "power", "eigh")
    results = [masking(fiedler_solver=solver, hint_ratio=0.0)(features, NUM_MASKED) for solver in solvers]
    for result in results[1:]:
        assert torch.equal(results[0].object_part, result.object_part)
        assert torch.equal(results[0].mask, result.mask)


def is_lanczos_step(call) -> bool:
    """A bmm of a square operator with one vector per image: one Lanczos step (re-orthogonalisation multiplies by
    the [B, k, N] basis)."""
    operator, vector = call.args
    return operator.shape[1] == operator.shape[2] and vector.shape[2] == 1


@pytest.mark.parametrize("edges", ["similarity", "binary_quantile"])
def test_lanczos_stops_once_every_fiedler_vector_has_converged(edges):
    generator = torch.Generator().manual_seed(3)
    features, _ = clustered_features(24, 196, dim=64, noise=0.6, offset=0.5, generator=generator)
    weights, _ = affinity_graph(gram(unit(features)), edges, 0.2, 1e-5, quantile=0.8)
    reference = fiedler_vector_eigh(weights)
    reference_sides = reference > reference.mean(dim=1, keepdim=True)
    counts = []
    for tolerance in (1e-3, None):
        with mock.patch("torch.bmm", wraps=torch.bmm) as bmm:
            fiedler = fiedler_vector_lanczos(weights, steps=64, tolerance=tolerance)
        counts.append(sum(is_lanczos_step(call) for call in bmm.call_args_list))
        assert nn.functional.cosine_similarity(fiedler, reference, dim=1).abs().min() > 0.999
        sides = fiedler > fiedler.mean(dim=1, keepdim=True)
        assert ((sides == reference_sides).all(dim=1) | (sides != reference_sides).all(dim=1)).all()
    assert counts[1] == 64
    # a clear cut on the weighted graph converges in a fraction of the 64 steps; the sparse binary one takes longer
    assert counts[0] <= (12 if edges == "similarity" else 63)


def test_lanczos_stops_growing_an_exhausted_krylov_space():
    """Two identical blocks of patches: the normalised operator has few distinct eigenvalues, so the Krylov space
    is exhausted long before `steps`; the Fiedler vector still splits the blocks, and nothing is NaN."""
    block = torch.zeros(1, 8, 8)
    features = torch.cat([block + torch.tensor([1.0] + [0.0] * 7), block + torch.tensor([0.0, 1.0] + [0.0] * 6)], 1)
    weights, _ = affinity_graph(gram(unit(features)), "similarity", 0.2, 1e-5)
    fiedler = fiedler_vector_lanczos(weights, steps=15)
    assert torch.isfinite(fiedler).all()
    sides = fiedler > fiedler.mean(dim=1, keepdim=True)
    assert sides[0, :8].all() != sides[0, 8:].any() and sides[0, :8].unique().numel() == 1


# ----- object part ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["max_abs", "smaller"])
def test_object_part_rules_are_sign_invariant(rule):
    fiedler = torch.randn(500, NUM_PATCHES) * torch.rand(500, 1) + torch.randn(500, 1)
    assert torch.equal(object_part(fiedler, rule), object_part(-fiedler, rule))


def test_smaller_rule_is_sign_invariant_at_an_exact_tie():
    fiedler = torch.tensor([[3.0, 1.0, -1.0, -1.5], [-0.5, 0.5, -2.0, 2.5]])  # two nodes above the mean each
    assert torch.equal(object_part(fiedler, "smaller"), object_part(-fiedler, "smaller"))
    assert object_part(fiedler, "smaller").sum(dim=1).tolist() == [2, 2]


def test_object_part_rules_pick_the_documented_part():
    # Mean 0.22: the part above it is {0, 1} (2 nodes), below it {2, 3, 4, 5}; the largest |y| (-3) is below.
    fiedler = torch.tensor([[2.0, 2.5, -0.5, -3.0, 0.2, 0.1]])
    assert object_part(fiedler, "max_abs").tolist() == [[False, False, True, True, True, True]]
    assert object_part(fiedler, "smaller").tolist() == [[True, True, False, False, False, False]]


def two_colour_image(object_rows: slice, object_cols: slice, generator: torch.Generator) -> torch.Tensor:
    """A 32x32 image: a red rectangle on a blue background, with a little pixel noise."""
    image = torch.zeros(1, 3, 32, 32)
    image[:, 2] = 1.0
    image[:, :, object_rows, object_cols] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    return image + 0.05 * torch.rand(image.shape, generator=generator)


@pytest.mark.parametrize("graph_edges", ["similarity", "binary_fixed", "binary_mean"])
@pytest.mark.parametrize("foreground_rule", ["max_abs", "smaller"])
def test_two_colour_image_is_cut_along_the_colour_boundary(graph_edges, foreground_rule):
    generator = torch.Generator().manual_seed(0)
    config = tiny_config(graph_edges=graph_edges, foreground_rule=foreground_rule, hint_ratio=0.0)
    model = SGMAEForPreTraining(config)
    images = torch.cat(
        [
            two_colour_image(slice(8, 20), slice(4, 16), generator),  # a 3x3-patch object
            two_colour_image(slice(0, 32), slice(20, 32), generator),  # a 3-column object on the right edge
        ]
    )
    object_patches = model.patchify(images)[:, :, 0] > 0.5  # red channel of the first pixel of each patch
    assert object_patches.sum(dim=1).tolist() == [9, 24]
    # The patch pixels themselves are features that split cleanly by colour.
    result = model.masking(model.patchify(images), NUM_MASKED)
    assert result.mask_type.tolist() == [int(MaskType.INFORMED)] * 2
    assert torch.equal(result.object_part, object_patches)
    assert bool((result.mask | ~object_patches).all())  # the whole object is hidden


# ----- degenerate images ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_features_fall_back_to_a_random_mask(bad_value):
    features, _ = clustered_features(4, NUM_PATCHES)
    features[1, 3, 5] = bad_value
    features[2] = bad_value
    result = masking()(features, NUM_MASKED)
    assert result.mask_type.tolist() == [
        int(MaskType.INFORMED),
        int(MaskType.FALLBACK),
        int(MaskType.FALLBACK),
        int(MaskType.INFORMED),
    ]
    assert result.mask.sum(dim=1).tolist() == [NUM_MASKED] * 4
    assert result.object_part_size[1:3].tolist() == [-1, -1]
    assert not result.object_part[1:3].any()
    assert torch.isfinite(result.edge_density).all()


@pytest.mark.parametrize("graph_edges", ["similarity", "binary_fixed", "binary_mean"])
def test_identical_features_fall_back_to_a_random_mask(graph_edges):
    features = torch.randn(3, 1, 32).expand(-1, NUM_PATCHES, -1).clone()
    result = masking(graph_edges=graph_edges)(features, NUM_MASKED)
    assert result.mask_type.tolist() == [int(MaskType.FALLBACK)] * 3
    assert result.mask.sum(dim=1).tolist() == [NUM_MASKED] * 3
    assert result.object_part_size.tolist() == [-1] * 3


def test_complete_binary_graph_falls_back_to_a_random_mask():
    """All pairs above tau: every edge weighs the same and no cut is worth following."""
    features, _ = clustered_features(3, 196, noise=0.3, offset=3.0)  # all cosines well above 0.2
    _, density = affinity_graph(gram(unit(features)), "binary_fixed", 0.2, 1e-5)
    assert density.tolist() == [1.0] * 3
    result = masking(graph_edges="binary_fixed")(features, 147)
    assert result.mask_type.tolist() == [int(MaskType.FALLBACK)] * 3
    assert result.mask.sum(dim=1).tolist() == [147] * 3


# ----- determinism -----------------------------------------------------------------------------------------------
def test_masks_are_deterministic_under_a_seeded_generator():
    features, _ = clustered_features(6, NUM_PATCHES)
    features[5] = float("nan")  # one fallback, drawn from the generator too
    module = masking(hint_ratio=0.2)
    first = module(features, NUM_MASKED, generator=torch.Generator().manual_seed(11))
    torch.manual_seed(123)  # the global RNG must not matter
    second = module(features, NUM_MASKED, generator=torch.Generator().manual_seed(11))
    other = module(features, NUM_MASKED, generator=torch.Generator().manual_seed(12))
    assert torch.equal(first.mask, second.mask)
    assert not torch.equal(first.mask, other.mask)

    model = SGMAEForPreTraining(tiny_config())
    pixel_values = torch.randn(2, 3, 32, 32)
    masks = [model(pixel_values, generator=torch.Generator().manual_seed(seed)).mask for seed in (5, 5, 6)]
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])


# ----- graphs and edge density --------------------------------------------------------------------------------
def three_unit_vectors() -> torch.Tensor:
    """Cosines: S01 = 0.5, S02 = -1, S12 = -0.5."""
    angle = math.pi / 3
    return torch.tensor([[[1.0, 0.0], [math.cos(angle), math.sin(angle)], [-1.0, 0.0]]])


def test_similarity_graph_weights_and_density():
    weights, density = affinity_graph(gram(three_unit_vectors()), "similarity", 0.2, 1e-5)
    expected = torch.tensor([[[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]]]) + 1e-5
    assert torch.allclose(weights, expected, atol=1e-6)
    assert density.tolist() == pytest.approx([2 / 6])


@pytest.mark.parametrize(("threshold", "expected_density"), [(0.2, 2 / 6), (0.6, 0.0), (-0.7, 4 / 6)])
def test_binary_fixed_graph_weights_and_density(threshold, expected_density):
    weights, density = affinity_graph(gram(three_unit_vectors()), "binary_fixed", threshold, 1e-3)
    similarity = three_unit_vectors() @ three_unit_vectors().transpose(1, 2)
    expected = (similarity > threshold).float() + 1e-3
    assert torch.allclose(weights, expected)  # 1 + eps for an edge, eps otherwise
    assert density.tolist() == pytest.approx([expected_density])


def test_binary_mean_graph_uses_each_images_mean_similarity():
    features = torch.cat([three_unit_vectors(), three_unit_vectors()[:, [0, 0, 1]]])  # second: S = 1, 1, 0.5
    weights, density = affinity_graph(gram(features), "binary_mean", 0.2, 1e-5)
    # Image 0: mean S = 1/9, so only the 0.5 pair is an edge. Image 1: mean S = 7/9, so only the 1.0 pair is.
    assert (weights[0] > 0.5).tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    assert (weights[1] > 0.5).tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    assert density.tolist() == pytest.approx([2 / 6, 2 / 6])


def test_masking_reports_edge_density_and_object_part_size():
    features, is_object = clustered_features(4, NUM_PATCHES, object_size=12, noise=0.2)
    result = masking(graph_edges="binary_fixed", graph_threshold=0.5)(features, NUM_MASKED)
    _, expected_density = affinity_graph(gram(unit(features)), "binary_fixed", 0.5, 1e-5)
    assert torch.allclose(result.edge_density, expected_density)
    assert bool(((result.edge_density > 0) & (result.edge_density < 1)).all())
    assert result.object_part_size.tolist() == [12] * 4
    assert torch.equal(result.object_part, is_object)


# ----- the authors' hint variants -----------------------------------------------------------------------------
def test_hint_plan_counts_follow_the_base_the_floor_and_the_decay():
    config = tiny_config()
    assert hint_plan(config, 196, 147) == (9, None)  # round(0.06 x 147)
    config = tiny_config(hint_count_base="patches", hint_ratio=0.05)
    assert hint_plan(config, 196, 147) == (9, None)  # int(0.05 x 196), the authors' count
    assert hint_plan(tiny_config(hint_ratio=0.01), 64, 48) == (2, None)  # round(0.48) = 0, floored at 2
    assert hint_plan(tiny_config(hint_ratio=0.0), 64, 48) == (0, None)  # no hints asked: none
    decaying = tiny_config(hint_ratio=0.2, hint_portion=0.6, hint_decay_power=3.0, hint_ratio_final=0.1)
    assert hint_plan(decaying, 64, 48, decay=1.0) == (round(0.2 * 48), 0.6)
    count, portion = hint_plan(decaying, 64, 48, decay=0.5)
    assert count == round(0.15 * 48) and portion == pytest.approx(0.4)
    assert hint_plan(decaying, 64, 48, decay=0.0) == (round(0.1 * 48), pytest.approx(0.2))


def test_hint_decay_is_the_authors_polynomial_from_the_start_to_the_end():
    assert hint_decay(100, 100, 400, 3.0) == 1.0
    assert hint_decay(250, 100, 400, 3.0) == pytest.approx(1 - 0.5**3)
    assert hint_decay(400, 100, 400, 3.0) == 0.0
    assert hint_decay(250, 100, 400, None) == 1.0  # no power: constant


def test_hints_drawn_from_the_top_portion_of_the_ranking():
    scores = torch.linspace(1, 0, NUM_PATCHES).expand(64, -1).contiguous()  # patch 0 ranks first
    mask = informed_mask(scores, NUM_MASKED)
    hinted = add_hints(mask, scores, 4, "similarity", torch.Generator().manual_seed(0), portion=0.125)
    hints = mask & ~hinted
    assert hints.sum(dim=1).eq(4).all() and hinted.sum(dim=1).eq(NUM_MASKED).all()
    assert not hints[:, 8:].any()  # only among the top 0.125 x 64 = 8 patches
    assert hints[:, :8].float().mean(dim=0).min() > 0.2  # uniformly among them


def test_the_models_hints_follow_the_schedule():
    model = SGMAEForPreTraining(
        tiny_config(hint_ratio=0.25, hint_decay_power=1.0, informed_masking_start_step=2, hint_min_count=0)
    )
    scores = torch.linspace(1, 0, NUM_PATCHES).expand(2, -1).contiguous()
    revealed = []
    for step in (2, 6, 10):
        model.set_training_progress(step, 10)
        mask = model(torch.randn(2, 3, 32, 32), mask_scores=scores).mask.bool()
        revealed.append(int((informed_mask(scores, NUM_MASKED) & ~mask)[0].sum()))
    assert revealed == [12, 6, 0]  # round(0.25 x 48), then half of it, then none at the end
