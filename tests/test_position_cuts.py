"""Cuts that follow content, not position (issue 32): the position share of features, half cuts, the object part's
central share, and the options that act on them (feature source, centring per position, quantile and kNN graphs,
split at zero). Every test has an answer known by construction."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gram, tiny_config
from torch import nn

from modeling_sgmae import SGMAEForPreTraining
from modeling_sgmae.analysis import (
    PositionShare,
    analysis_metrics,
    centre_patches,
    feature_statistics,
    figure_panel,
    half_cuts,
    masking_position_mean,
    object_centre_share,
    one_sided_parts,
    part_overlap,
)
from modeling_sgmae.masking_sgmae import (
    affinity_graph,
    centre_by_position,
    ncut_bipartition,
    object_part,
    off_diagonal_quantile,
)

GRID = (8, 8)


def position_features(batch_size: int, grid: tuple[int, int] = GRID, content: float = 0.0) -> torch.Tensor:
    """Features that encode the patch's column (a smooth code that splits left from right) plus `content` noise."""
    rows, columns = grid
    column = torch.arange(columns).repeat(rows).float()  # row-major
    code = torch.stack([torch.cos(math.pi * column / (columns - 1)), torch.sin(math.pi * column / (columns - 1))], 1)
    features = torch.cat([code, torch.zeros(rows * columns, 6)], dim=1).expand(batch_size, -1, -1)
    return features + content * torch.randn(batch_size, rows * columns, 8)


# ----- metrics ------------------------------------------------------------------------------------------------------
def test_pure_position_features_have_position_share_one_and_give_half_cuts():
    features = position_features(16)
    share = PositionShare()
    share.update([features[:10]])
    share.update([features[10:]])  # accumulated over batches
    result = share.result()
    assert result["position_share"][0] == pytest.approx(1.0, abs=1e-9)
    assert result["same_position_cosine"][0] == pytest.approx(1.0, abs=1e-9)
    unit = nn.functional.normalize(features[0], dim=-1)
    pairs = (unit @ unit.T)[~torch.eye(64, dtype=torch.bool)]
    assert result["within_image_cosine"][0] == pytest.approx(pairs.mean().item(), abs=1e-6)  # the pairwise mean

    config = tiny_config(graph_edges="similarity")
    statistics = feature_statistics(features, config, GRID)
    assert bool(statistics.has_cut.all())
    assert statistics.half_cut.tolist() == [1.0] * 16  # the cut is the left or right half
    assert statistics.summary()["half_cut_share"] == 1.0
    assert statistics.summary()["one_sided_part_share"] == 1.0


def test_content_features_have_position_share_near_zero():
    torch.manual_seed(0)
    features = torch.randn(200, 64, 16)  # independent of position
    share = PositionShare()
    share.update([features, features * 2])  # two "blocks"; the scale does not matter after normalising
    result = share.result()
    for block in range(2):
        assert result["position_share"][block] == pytest.approx(1 / 200, abs=0.004)  # sampling noise only
        assert abs(result["same_position_cosine"][block]) < 0.01
        assert abs(result["within_image_cosine"][block]) < 0.01


def test_position_share_of_a_half_position_half_content_mix():
    # u = (p_n + c_b,n) / sqrt 2 with orthogonal p (position code, zero mean over positions) and c (content):
    # half of the variance is position.
    torch.manual_seed(0)
    positions = torch.linalg.qr(torch.randn(64, 64)).Q[:, :64] * 8  # orthogonal rows of norm 8, like content
    positions = positions - positions.mean(dim=0)
    content = torch.randn(4000, 64, 64)
    content = content - content.mean(dim=0)
    share = PositionShare()
    share.update([torch.cat([positions.expand(4000, -1, -1), content], dim=2)])
    assert share.result()["position_share"][0] == pytest.approx(0.5, abs=0.02)


def test_half_cuts_and_central_share_of_known_parts():
    rows, columns = 14, 14
    grid = torch.zeros(5, rows, columns, dtype=torch.bool)
    grid[0, :, :7] = True  # left half
    grid[1, 8:, :] = True  # the bottom 6 rows: all below the midline, the rest 7 / 8 above it
    grid[2, 3:11, 3:11] = True  # the central 8 x 8: no half, all central
    grid[3, 5:9, :] = True  # a band across the middle: no half, 32 of 56 central
    grid[4, :3, :3] = True  # a small object in a corner: one-sided, but not a half cut
    parts = grid.flatten(1)
    assert half_cuts(parts, (rows, columns)).tolist() == [True, True, False, False, False]
    assert one_sided_parts(parts, (rows, columns)).tolist() == [True, True, False, False, True]
    assert centre_patches((rows, columns)).sum() == 64  # 8 x 8 of 14 x 14
    shares = object_centre_share(parts, (rows, columns))
    assert shares[2] == 1.0 and shares[3] == pytest.approx(32 / 56) and shares[0] == pytest.approx(4 * 8 / 98)
    assert shares[4] == 0.0
    # 85 % on one side: 86 of 100 patches left (and so 84 of 96 right) is a half cut, 84 of 100 is not
    part = torch.zeros(2, 14 * 14, dtype=torch.bool)
    left = (torch.arange(196) % 14) < 7
    part[0, left.nonzero()[:86, 0]] = True
    part[0, (~left).nonzero()[:14, 0]] = True
    part[1, left.nonzero()[:84, 0]] = True
    part[1, (~left).nonzero()[:16, 0]] = True
    assert one_sided_parts(part, (14, 14)).tolist() == [True, False]
    assert half_cuts(part, (14, 14)).tolist() == [True, False]


def test_odd_grids_leave_the_middle_line_out_of_both_sides():
    part = torch.zeros(1, 7, 7, dtype=torch.bool)
    part[0, :, 3] = True  # the middle column only: on no side
    assert one_sided_parts(part.flatten(1), (7, 7)).tolist() == [False]
    part[0, :, 4:] = True  # the middle column and all to its right: 21 of 28 on the right
    assert one_sided_parts(part.flatten(1), (7, 7)).tolist() == [False]
    assert one_sided_parts(part.flatten(1), (7, 7), share=0.75).tolist() == [True]
    assert half_cuts(part.flatten(1), (7, 7), share=0.75).tolist() == [True]  # the rest: all left


def test_object_part_spread_in_the_summary():
    config = tiny_config()
    features = position_features(4, content=0.05)
    summary = feature_statistics(features, config, GRID).summary()
    assert summary["object_part_fraction_q25"] <= summary["object_part_fraction_median"]
    assert summary["object_part_fraction_median"] <= summary["object_part_fraction_q75"]
    assert summary["object_part_fraction_median"] == pytest.approx(0.5, abs=0.07)


# ----- options ------------------------------------------------------------------------------------------------------
def test_centring_by_position_removes_what_every_image_shares_at_a_position():
    torch.manual_seed(0)
    position = torch.randn(64, 8) * 5
    features = position + torch.randn(32, 64, 8)
    centred = centre_by_position(features)
    assert centred.mean(dim=0).abs().max() < 1e-5
    given = centre_by_position(features, position)
    torch.testing.assert_close(given, features - position)
    single = features[:1]
    assert torch.equal(centre_by_position(single), single)  # a batch of one keeps its features


def test_centring_turns_a_half_cut_into_the_object_cut():
    # A strong position code plus content: a 3 x 3 object square at a random place with its own direction, and a
    # background with another, both drawn per image. Raw, the cut follows position (a half); centred by position,
    # it follows the object.
    torch.manual_seed(0)
    num_images = 64
    features = position_features(num_images) * 4
    squares = torch.zeros(num_images, 8, 8, dtype=torch.bool)
    for image in range(num_images):
        row, column = torch.randint(0, 6, (2,)).tolist()
        squares[image, row : row + 3, column : column + 3] = True
    squares = squares.flatten(1)
    directions = nn.functional.normalize(torch.randn(num_images, 2, 6), dim=-1)
    content = torch.where(squares[:, :, None], directions[:, :1], directions[:, 1:])  # [B, N, 6]
    features = features + torch.cat([torch.zeros(num_images, 64, 2), content], dim=2)
    features = features + 0.02 * torch.randn(num_images, 64, 8)
    config = tiny_config(foreground_rule="smaller")
    raw = feature_statistics(features, config, GRID).summary()
    assert raw["half_cut_share"] > 0.9
    centred = feature_statistics(features, config, GRID, centre_by_position(features))
    assert centred.summary()["half_cut_share"] < 0.1  # many squares lie on one side, but the rest does not
    found = (centred.object_part == squares).all(dim=1).float().mean()
    assert found > 0.9  # the object square itself


def test_quantile_graph_keeps_the_share_of_pairs_above_the_quantile():
    torch.manual_seed(0)
    features = nn.functional.normalize(torch.randn(3, 20, 8), dim=-1)
    for quantile in (0.5, 0.8):
        weights, density = affinity_graph(gram(features), "binary_quantile", 0.2, 1e-5, quantile=quantile)
        # distinct random similarities: the share above the q quantile of the 380 off-diagonal pairs is 1 - q
        assert density.tolist() == pytest.approx([1 - quantile] * 3, abs=1 / 380 + 1e-6)
        assert set(weights.sub(1e-5).round().unique().tolist()) <= {0.0, 1.0}


def test_part_overlap_tells_a_fixed_part_from_parts_that_move():
    fixed = torch.zeros(32, 64, dtype=torch.bool)
    fixed[:, 20:44] = True  # every image: the same 24 patches
    moving = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(i)) < 24 for i in range(32)])
    chance = 9 / 39  # parts of 24 of 64 patches share 24 * 24 / 64 = 9 at random, of 24 + 24 - 9 in either
    assert part_overlap(fixed) == pytest.approx({"part_overlap": 1.0, "part_overlap_chance": chance})
    overlap = part_overlap(moving)
    assert overlap["part_overlap_chance"] == pytest.approx(chance)
    assert abs(overlap["part_overlap"] - overlap["part_overlap_chance"]) < 0.03
    assert part_overlap(fixed[:1]) == {"part_overlap": None, "part_overlap_chance": None}


@pytest.mark.parametrize("num_patches", [5, 20, 196])
def test_quantile_by_selection_joins_the_pairs_torch_quantile_joins(num_patches):
    torch.manual_seed(num_patches)
    features = nn.functional.normalize(torch.randn(4, num_patches, 16), dim=-1)
    similarity = features @ features.transpose(1, 2)
    similarity = (similarity + similarity.transpose(1, 2)) / 2  # exactly symmetric, as the pairs are counted twice
    off_diagonal = ~torch.eye(num_patches, dtype=torch.bool)
    for quantile in (0.0, 0.3, 0.5, 0.8, 1.0):
        reference = torch.quantile(similarity[:, off_diagonal], quantile, dim=1)[:, None, None]
        selected = off_diagonal_quantile(similarity, quantile)[:, None, None]
        assert torch.equal((similarity > reference) & off_diagonal, (similarity > selected) & off_diagonal)


def test_knn_graph_joins_each_patch_to_its_nearest_and_is_symmetric():
    # points on a line: the nearest neighbours are known
    angles = torch.tensor([0.0, 0.1, 0.2, 1.0, 1.1, 3.0])
    features = torch.stack([angles.cos(), angles.sin()], dim=1)[None]
    weights, density = affinity_graph(gram(features), "knn", 0.2, 0.0, knn=1)
    expected = torch.zeros(6, 6)
    for i, j in [(0, 1), (1, 0), (2, 1), (3, 4), (4, 3), (5, 4)]:  # each point's nearest other point
        expected[i, j] = expected[j, i] = 1.0
    torch.testing.assert_close(weights[0], expected)
    assert density.item() == pytest.approx(expected.sum().item() / 30)


def test_split_at_zero_or_at_the_mean():
    fiedler = torch.tensor([[-3.0, -0.1, 0.5, 0.5, 0.5, 0.5]])  # mean -0.183: -0.1 is above the mean, below zero
    assert object_part(fiedler, "smaller", "mean").tolist() == [[True, False, False, False, False, False]]
    assert object_part(fiedler, "smaller", "zero").tolist() == [[True, True, False, False, False, False]]
    assert object_part(fiedler, "max_abs", "zero").tolist() == [[True, True, False, False, False, False]]


@pytest.mark.parametrize("graph_edges", ["binary_quantile", "knn"])
def test_new_graphs_cut_two_clusters(graph_edges):
    torch.manual_seed(0)
    members = torch.zeros(2, 64, dtype=torch.bool)
    members[:, :20] = True
    centres = torch.eye(8)[:2] * 3
    features = centres[members.long()] + 0.3 * torch.randn(2, 64, 8)
    unit = nn.functional.normalize(features, dim=-1)
    config = tiny_config(graph_edges=graph_edges, graph_quantile=0.6, graph_knn=8, foreground_rule="smaller")
    cut = ncut_bipartition(unit, config)
    assert bool(cut.has_cut.all())
    assert torch.equal(cut.object_part, members)


# ----- the model's masking features ---------------------------------------------------------------------------------
@pytest.fixture
def model() -> SGMAEForPreTraining:
    torch.manual_seed(0)
    return SGMAEForPreTraining(tiny_config()).eval()


def test_masking_feature_sources(model):
    images = torch.randn(3, 3, 32, 32)
    tokens, cls_token, _ = model.vit.embeddings(images)
    hidden = model.vit.patch_features(tokens, cls_token)[0]
    torch.testing.assert_close(model.vit.masking_features(tokens, cls_token), hidden)
    model.config.mask_feature_source = "layernorm"
    torch.testing.assert_close(model.vit.masking_features(tokens, cls_token), model.vit.layernorm(hidden))
    model.config.mask_feature_source = "keys"
    _, states, _ = model.vit.encode(tokens, cls_token, output_hidden_states=True)
    block = model.vit.layers[-1]
    keys = nn.functional.linear(
        block.layernorm_before(states[-2]),
        block.attention.qkv.weight[32:64],
        block.attention.qkv.bias[32:64],
    )[:, 1:]
    torch.testing.assert_close(model.vit.masking_features(tokens, cls_token), keys)
    model.config.mask_feature_layer = 1
    _, states, _ = model.vit.encode(tokens, cls_token, output_hidden_states=True)
    block = model.vit.layers[0]
    keys = nn.functional.linear(
        block.layernorm_before(states[0]), block.attention.qkv.weight[32:64], block.attention.qkv.bias[32:64]
    )[:, 1:]
    torch.testing.assert_close(model.vit.masking_features(tokens, cls_token), keys)


def test_position_mean_centring_in_the_model(model):
    images = torch.randn(4, 3, 32, 32)
    tokens, cls_token, _ = model.vit.embeddings(images)
    raw = model.vit.masking_features(tokens, cls_token)
    model.config.feature_centring = "position_mean"
    torch.testing.assert_close(model.vit.masking_features(tokens, cls_token), raw - raw.mean(dim=0))
    mean = masking_position_mean(model, images.split(3))
    torch.testing.assert_close(mean, raw.mean(dim=0))
    torch.testing.assert_close(model.vit.masking_features(tokens[:1], cls_token, mean), raw[:1] - mean)
    torch.testing.assert_close(model.vit.masking_features(tokens, cls_token, centre=False), raw)
    result = model.informed_masking(tokens, cls_token, position_mean=mean)
    assert result.mask.sum(dim=1).tolist() == [48] * 4


def test_analysis_and_panel_report_the_new_metrics(model):
    model.config.feature_centring = "position_mean"
    images = torch.randn(6, 3, 32, 32)
    metrics = analysis_metrics(model, images, batch_size=4)
    assert metrics["feature_centering"] == "position_mean"  # the key earlier records use
    assert len(metrics["position_share"]) == model.config.num_hidden_layers
    assert all(0 <= share <= 1 for share in metrics["position_share"])
    assert 0 <= metrics["half_cut_share"] <= 1 and 0 <= metrics["object_centre_share"] <= 1
    # the chunking does not change the numbers: the centring mean is over the whole probe batch
    whole = analysis_metrics(model, images, batch_size=64)
    for key in ("half_cut_share", "object_centre_share", "informed_mask_centre_share", "object_part_fraction"):
        assert whole[key] == pytest.approx(metrics[key], rel=1e-5)
    assert whole["position_share"] == pytest.approx(metrics["position_share"], rel=1e-6)
    panel = figure_panel(model, images[:2], position_mean=masking_position_mean(model, [images]))
    assert panel.half_cut.dtype == bool and panel.half_cut.shape == (2,)
    assert panel.object_centre_share.shape == (2,)


# ----- the benchmark's option grid ----------------------------------------------------------------------------------
def _graph_options():
    from benchmarks import graph_options

    return graph_options


def test_mask_quality_options_vary_one_factor_at_a_time_and_every_one_is_a_valid_config():
    graph_options = _graph_options()
    options = graph_options.option_set("mask_quality", 4, ["mine=feature_centering=position_mean,graph_knn=5"], 0.2)
    today = graph_options.TODAY
    assert options["today"]["graph_edges"] == "similarity" and options["today"]["foreground_rule"] == "max_abs"
    assert options["centred"] == today | {"feature_centering": "position_mean"}
    assert options["today + keys"] == today | {"mask_feature_source": "keys"}
    assert options["centred + smaller"] == today | {"feature_centering": "position_mean", "foreground_rule": "smaller"}
    assert options["centred per batch"][graph_options.BATCH_CENTRED] is True
    assert options["mine"] == {"feature_centering": "position_mean", "graph_knn": 5}
    for overrides in options.values():
        fields = {key: value for key, value in overrides.items() if key != graph_options.BATCH_CENTRED}
        tiny_config(num_hidden_layers=4, **fields).validate()
    config = tiny_config()
    with graph_options.overridden(config, {"graph_edges": "knn"}):
        assert config.graph_edges == "knn"
    assert config.graph_edges == "similarity"


def test_inner_rule_picks_the_part_away_from_the_border():
    # 4 x 4 grid: the central 2 x 2 (patches 5, 6, 9, 10) against the frame; y is larger on the frame
    fiedler = torch.ones(1, 16)
    fiedler[0, [5, 6, 9, 10]] = -0.5
    inner = object_part(fiedler, "inner", "mean", (4, 4))
    assert inner.nonzero()[:, 1].tolist() == [5, 6, 9, 10]
    assert object_part(-fiedler, "inner", "mean", (4, 4)).equal(inner)  # the sign of y does not matter
    # a left / right split touches the border equally: the max_abs part
    halves = torch.tensor([[-1.0, -1.0, 1.0, 2.0] * 4])
    assert object_part(halves, "inner", "mean", (4, 4)).equal(object_part(halves, "max_abs", "mean"))
    with pytest.raises(ValueError, match="grid"):
        object_part(fiedler, "inner")


def test_inner_rule_without_a_known_grid_falls_back_to_max_abs():
    torch.manual_seed(0)
    unit = nn.functional.normalize(torch.randn(2, 12, 8), dim=-1)  # 12 patches: not the config's 8 x 8, not square
    inner = ncut_bipartition(unit, tiny_config(foreground_rule="inner"))
    max_abs = ncut_bipartition(unit, tiny_config(foreground_rule="max_abs"))
    assert torch.equal(inner.object_part, max_abs.object_part)
