"""SG-MAE models: outputs, loss, schedule, init, ViTMAE parity, backbone behaviour, classifier, input errors."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import INVALID_CONFIG, tiny_config
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from modeling_sgmae import (
    MaskType,
    SGMAEConfig,
    SGMAEForImageClassification,
    SGMAEForPreTraining,
    SGMAEForPreTrainingOutput,
    SGMAEModel,
)
from modeling_sgmae.masking_sgmae import mask_from_noise
from modeling_sgmae.modeling_sgmae import resize_position_table, sincos_position_table


@pytest.fixture
def config():
    """The per-step source: these tests train through forward alone (the cached source's tests pass mask_scores)."""
    return tiny_config(informed_mask_source="step")


NUM_PATCHES, NUM_MASKED, NUM_VISIBLE = 64, 48, 16


def images(batch_size: int = 2, height: int = 32, width: int = 32) -> torch.Tensor:
    return torch.randn(batch_size, 3, height, width)


def random_mask(batch_size: int = 2, num_patches: int = NUM_PATCHES, num_masked: int = NUM_MASKED) -> torch.Tensor:
    return mask_from_noise(torch.rand(batch_size, num_patches), num_masked)


def mae_sincos_table(dim: int, grid_height: int, grid_width: int) -> np.ndarray:
    """facebookresearch/mae `get_2d_sincos_pos_embed(..., cls_token=True)`, generalised to a non-square grid."""

    def one_axis(half: int, positions: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(half // 2, dtype=np.float64) / (half / 2.0))
        out = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_width, dtype=np.float64), np.arange(grid_height, dtype=np.float64))
    table = np.concatenate([one_axis(dim // 2, grid[0]), one_axis(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), table], axis=0)


# ----- pre-training outputs and loss ----------------------------------------------------------------------------
def test_pretraining_output_shapes(config):
    model = SGMAEForPreTraining(config)
    output = model(images(), output_attentions=True, output_hidden_states=True, output_decoder_attentions=True)
    assert isinstance(output, SGMAEForPreTrainingOutput)
    assert output.loss.shape == () and torch.isfinite(output.loss)
    assert output.logits.shape == (2, NUM_PATCHES, 4 * 4 * 3)
    assert output.mask.shape == (2, NUM_PATCHES) and output.mask.dtype == output.logits.dtype
    assert output.mask.sum(dim=1).tolist() == [NUM_MASKED, NUM_MASKED]
    assert torch.equal(output.ids_restore.sort(dim=1).values, torch.arange(NUM_PATCHES).expand(2, -1))
    assert torch.equal(output.mask, (output.ids_restore >= NUM_VISIBLE).float())
    assert output.mask_type.tolist() == [int(MaskType.RANDOM)] * 2
    assert output.object_part_size.tolist() == [-1, -1]
    assert output.edge_density.tolist() == [-1.0, -1.0]  # no graph was built; no NaN in model outputs
    # The encoder ran on [CLS] + the visible patches only.
    assert len(output.hidden_states) == config.num_hidden_layers + 1
    assert all(state.shape == (2, 1 + NUM_VISIBLE, config.hidden_size) for state in output.hidden_states)
    assert len(output.attentions) == config.num_hidden_layers
    assert output.attentions[0].shape == (2, config.num_attention_heads, 1 + NUM_VISIBLE, 1 + NUM_VISIBLE)
    assert len(output.decoder_attentions) == config.decoder_num_hidden_layers
    assert output.decoder_attentions[0].shape == (2, 2, 1 + NUM_PATCHES, 1 + NUM_PATCHES)
    as_tuple = model(images(), return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == () and as_tuple[1].shape == output.logits.shape


def test_patchify_and_unpatchify_are_inverse_and_match_vit_mae():
    config = tiny_config(image_size=[32, 48])
    model = SGMAEForPreTraining(config)
    pixel_values = images(2, 32, 48)
    patches = model.patchify(pixel_values)
    assert patches.shape == (2, 8 * 12, 48)
    assert torch.equal(model.unpatchify(patches), pixel_values)
    # Patch (row 1, column 2) holds pixels [4:8, 8:12], in ViTMAE's (row, column, channel) order.
    expected = pixel_values[0, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[0, 1 * 12 + 2], expected)
    vit_mae = ViTMAEForPreTraining(ViTMAEConfig(**vit_mae_fields(), norm_pix_loss=False))
    square = images()
    assert torch.equal(SGMAEForPreTraining(tiny_config()).patchify(square), vit_mae.patchify(square))


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_is_mean_squared_error_over_masked_patches_only(norm_pix_loss):
    model = SGMAEForPreTraining(tiny_config(norm_pix_loss=norm_pix_loss))
    pixel_values, mask = images(), random_mask()
    output = model(pixel_values, mask=mask)
    target = model.patchify(pixel_values)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((output.logits - target) ** 2).mean(-1)
    assert output.loss.item() == pytest.approx(per_patch[mask].mean().item(), rel=1e-5)

    # Changing the target's visible patches leaves the loss alone.
    changed = model.patchify(pixel_values).clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 5
    loss_visible_changed = model.forward_loss(model.unpatchify(changed), output.logits, mask.float())
    assert loss_visible_changed.item() == pytest.approx(output.loss.item(), rel=1e-6)
    # Changing a masked one does: setting the masked targets to the prediction drives the loss to zero.
    if not norm_pix_loss:
        changed[mask] = output.logits.detach()[mask]
        assert model.forward_loss(model.unpatchify(changed), output.logits, mask.float()).item() == 0.0


def test_encoder_never_sees_masked_pixels(config):
    """Editing the pixels of masked patches changes the target, not the prediction."""
    model = SGMAEForPreTraining(config)
    pixel_values, mask = images(), random_mask()
    edited = model.patchify(pixel_values).clone()
    edited[mask] = torch.randn_like(edited[mask])
    first, second = model(pixel_values, mask=mask), model(model.unpatchify(edited), mask=mask)
    assert torch.allclose(first.logits, second.logits, atol=1e-6)
    assert not torch.allclose(first.loss, second.loss)


def test_noise_follows_vit_mae_convention(config):
    model = SGMAEForPreTraining(config)
    noise = torch.rand(2, NUM_PATCHES)
    output = model(images(), noise=noise)
    assert torch.equal(output.mask.bool(), mask_from_noise(noise, NUM_MASKED))  # largest noise is masked
    assert output.mask_type.tolist() == [int(MaskType.GIVEN)] * 2


# ----- informed masking inside the model --------------------------------------------------------------------------
def test_feature_pass_builds_no_autograd_graph(config):
    """The full-image feature pass runs without gradients; only the visible-token pass is differentiated."""
    model = SGMAEForPreTraining(config).train()
    model.set_training_progress(1, 1)
    seen = []

    def record(module, inputs, output):
        seen.append((output[0].shape[1], torch.is_grad_enabled(), output[0].requires_grad))

    handles = [layer.register_forward_hook(record) for layer in model.vit.layers]
    output = model(images())
    for handle in handles:
        handle.remove()
    assert output.mask_type.tolist() == [int(MaskType.INFORMED)] * 2
    feature_pass = [entry for entry in seen if entry[0] == 1 + NUM_PATCHES]
    visible_pass = [entry for entry in seen if entry[0] == 1 + NUM_VISIBLE]
    assert len(feature_pass) == len(visible_pass) == config.num_hidden_layers
    assert all(not grad_enabled and not requires_grad for _, grad_enabled, requires_grad in feature_pass)
    assert all(grad_enabled and requires_grad for _, grad_enabled, requires_grad in visible_pass)


@pytest.mark.parametrize("feature_layer", [None, 1])
def test_masking_clusters_full_image_features_of_the_configured_block(feature_layer):
    """docs/method.md §3 step 1: patch tokens (no [CLS]) of the unmasked image after `mask_feature_layer` blocks."""
    config = tiny_config(mask_feature_layer=feature_layer, informed_mask_source="step")
    model = SGMAEForPreTraining(config)
    model.set_training_progress(1, 1)
    captured = []
    handle = model.masking.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    pixel_values = images()
    model(pixel_values)
    handle.remove()
    with torch.no_grad():
        hidden_states = model.vit(pixel_values, output_hidden_states=True).hidden_states
    expected = hidden_states[feature_layer or config.num_hidden_layers][:, 1:]
    assert captured[0].shape == (2, NUM_PATCHES, config.hidden_size)
    assert torch.allclose(captured[0], expected, atol=1e-6)


def test_informed_mask_trains_like_the_same_mask_given_explicitly(config):
    """No gradient reaches the masking: loss and gradients equal those of an ordinary MAE step with that mask."""
    model = SGMAEForPreTraining(config).train()
    model.set_training_progress(1, 1)
    pixel_values = images()
    informed = model(pixel_values)
    informed.loss.backward()
    informed_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    given = model(pixel_values, mask=informed.mask.bool())
    given.loss.backward()
    assert torch.equal(informed.loss, given.loss)
    assert informed_grads.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.equal(informed_grads[name], parameter.grad), name


def test_self_guided_strategy_switches_from_random_to_informed_at_the_start():
    model = SGMAEForPreTraining(tiny_config(informed_masking_start=0.25, informed_mask_source="step"))
    pixel_values = images()
    assert not model.informed_masking_active  # schedule unknown: random
    assert model(pixel_values).mask_type.tolist() == [int(MaskType.RANDOM)] * 2
    for step, expected in [(0, MaskType.RANDOM), (1, MaskType.RANDOM), (2, MaskType.INFORMED), (8, MaskType.INFORMED)]:
        model.set_training_progress(step, 8)  # start = ceil(0.25 * 8) = 2
        assert model.informed_masking_start_step == 2
        output = model(pixel_values)
        assert output.mask_type.tolist() == [int(expected)] * 2, step
    assert output.object_part_size.gt(0).all() and output.object_part_size.lt(NUM_PATCHES).all()
    assert torch.isfinite(output.edge_density).all()
    # A random mask on request (e.g. for a plain-MAE probe) even when informed masking is due.
    assert model(pixel_values, random_masking=True).mask_type.tolist() == [int(MaskType.RANDOM)] * 2


def test_default_start_is_a_quarter_of_the_schedule():
    model = SGMAEForPreTraining(tiny_config())
    model.set_training_progress(0, 10)
    assert model.informed_masking_start_step == 3  # ceil(0.25 * 10)
    model.set_training_progress(0, 400)
    assert model.informed_masking_start_step == 100  # the authors' code: epoch 100 of 400


def test_informed_masking_start_step_overrides_the_fraction():
    model = SGMAEForPreTraining(
        tiny_config(informed_masking_start=0.0, informed_masking_start_step=5, informed_mask_source="step")
    )
    model.set_training_progress(4, 100)
    assert not model.informed_masking_active
    assert model(images()).mask_type.tolist() == [int(MaskType.RANDOM)] * 2
    model.set_training_progress(5, 100)
    assert model.informed_masking_active
    assert model(images()).mask_type.tolist() == [int(MaskType.INFORMED)] * 2


def test_random_strategy_never_informs():
    model = SGMAEForPreTraining(tiny_config(mask_strategy="random", informed_masking_start=0.0))
    model.set_training_progress(100, 100)
    assert model.informed_masking_start_step is None and not model.informed_masking_active
    assert model(images()).mask_type.tolist() == [int(MaskType.RANDOM)] * 2


def test_set_training_progress_rejects_negative_values(config):
    model = SGMAEForPreTraining(config)
    with pytest.raises(ValueError, match="non-negative"):
        model.set_training_progress(-1, 10)


def uniform_decoder_attention(model: SGMAEForPreTraining) -> None:
    """Zero the decoder's query and key projections: every query attends uniformly to all N + 1 keys."""
    with torch.no_grad():
        for layer in model.decoder.decoder_layers:
            width = layer.attention.qkv.out_features // 3
            layer.attention.qkv.weight[: 2 * width].zero_()
            layer.attention.qkv.bias[: 2 * width].zero_()


def test_exploitation_rates_measure_attention_shares():
    model = SGMAEForPreTraining(tiny_config(decoder_num_hidden_layers=2, informed_masking_auto_start=True))
    uniform_decoder_attention(model)
    model.set_training_progress(3, 100)
    rates = model.record_exploitation_rates(images())
    assert rates.shape == (2, 2)
    mask_share = NUM_MASKED / (NUM_PATCHES + 1)  # uniform attention over [CLS] + N keys, K of them mask tokens
    assert torch.allclose(rates, torch.tensor([[1 - mask_share, mask_share]] * 2), atol=1e-5)
    assert torch.allclose(model.schedule.last_check, torch.tensor([1 - mask_share, mask_share, 0.0]), atol=1e-5)
    # The mask share is ahead but was never behind: nothing has overtaken yet.
    assert int(model.schedule.started_at) == -1 and not model.informed_masking_active
    assert model.training  # the probe does not leave the model in eval mode
    # Once the buffer says the mask share was behind, the next check where it leads starts informed masking.
    model.schedule.last_check[2] = 1.0
    model.record_exploitation_rates(images())
    assert int(model.schedule.started_at) == 3
    assert model.informed_masking_active


def scripted_attention(model: SGMAEForPreTraining, monkeypatch: pytest.MonkeyPatch, shares: list[str]) -> None:
    """Replace the probe forward by one whose decoder attends only to visible keys or only to mask tokens."""
    mask = random_mask()
    key_is_mask = torch.cat([torch.zeros(2, 1, dtype=torch.bool), mask], dim=1)
    calls = iter(shares)

    def forward(pixel_values, **kwargs):
        keys = key_is_mask if next(calls) == "mask" else ~key_is_mask
        weights = keys.float() / keys.sum(dim=1, keepdim=True)
        weights = weights[:, None, None, :].expand(-1, 2, NUM_PATCHES + 1, -1)
        return SGMAEForPreTrainingOutput(mask=mask.float(), decoder_attentions=(weights,))

    monkeypatch.setattr(model, "forward", forward)


def test_auto_start_begins_when_the_mask_share_overtakes_the_visible_share(monkeypatch):
    model = SGMAEForPreTraining(tiny_config(informed_masking_auto_start=True, informed_masking_start=0.0))
    scripted_attention(model, monkeypatch, ["mask", "visible", "visible", "mask", "visible", "mask"])
    started = []
    for step in (10, 20, 30, 40, 50, 60):
        model.set_training_progress(step, 100)
        rates = model.record_exploitation_rates(images())
        started.append(int(model.schedule.started_at))
        if step == 30:
            assert rates.tolist() == [[1.0, 0.0]]
            assert not model.informed_masking_active  # the fraction (0.0) does not apply in auto mode
    assert started == [-1, -1, -1, 40, 40, 40]  # ahead at first (no crossing), behind, then overtaking at 40
    model.set_training_progress(40, 100)
    assert model.informed_masking_active


def test_schedule_state_is_saved_and_restored(tmp_path):
    model = SGMAEForPreTraining(tiny_config(informed_masking_auto_start=True, informed_mask_source="step"))
    model.set_training_progress(37, 1000)
    model.schedule.started_at.fill_(30)
    model.schedule.last_check.copy_(torch.tensor([0.4, 0.6, 1.0]))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    for name in ("training_step", "total_training_steps", "started_at", "last_check"):
        assert f"schedule.{name}" in saved
    loaded = SGMAEForPreTraining.from_pretrained(tmp_path)
    assert_schedule(loaded, 37, 1000, 30, [0.4, 0.6, 1.0])
    assert loaded(images()).mask_type.tolist() == [int(MaskType.INFORMED)] * 2
    # A fresh model starts from the beginning of the schedule.
    fresh = SGMAEForPreTraining(tiny_config(informed_masking_auto_start=True))
    assert int(fresh.schedule.training_step) == 0 and int(fresh.schedule.started_at) == -1


def assert_schedule(model: SGMAEForPreTraining, step: int, total: int, started: int, check: list[float]) -> None:
    schedule = model.schedule
    assert (int(schedule.training_step), int(schedule.total_training_steps), int(schedule.started_at)) == (
        step, total, started,
    )  # fmt: skip
    assert torch.equal(schedule.last_check, torch.tensor(check))
    assert model.informed_masking_active == (started >= 0 and step >= started)


def test_checkpoints_written_before_the_schedule_had_an_owner_still_load(tmp_path):
    """Top-level schedule buffers (today's older checkpoints): through from_pretrained (the declared conversion) and
    through load_state_dict (Accelerate's resume)."""
    model = SGMAEForPreTraining(tiny_config(informed_masking_auto_start=True))
    state = {name: tensor.clone() for name, tensor in model.state_dict().items() if not name.startswith("schedule.")}
    state |= {"training_step": torch.tensor(37), "total_training_steps": torch.tensor(1000)}
    state |= {"informed_masking_started_at": torch.tensor(30), "exploitation_rates": torch.tensor([0.4, 0.6, 1.0])}
    tiny_config(informed_masking_auto_start=True).save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors")
    assert_schedule(SGMAEForPreTraining.from_pretrained(tmp_path), 37, 1000, 30, [0.4, 0.6, 1.0])
    resumed = SGMAEForPreTraining(tiny_config(informed_masking_auto_start=True))
    resumed.load_state_dict(dict(state), strict=True)
    assert_schedule(resumed, 37, 1000, 30, [0.4, 0.6, 1.0])
    for name, tensor in SGMAEForPreTraining.from_pretrained(tmp_path).state_dict().items():
        torch.testing.assert_close(tensor, resumed.state_dict()[name], rtol=0, atol=0, msg=name)


def test_fraction_schedule_resumes_in_the_same_phase(tmp_path):
    model = SGMAEForPreTraining(tiny_config())
    model.set_training_progress(50, 100)
    model.save_pretrained(tmp_path)
    loaded = SGMAEForPreTraining.from_pretrained(tmp_path)
    assert loaded.informed_masking_start_step == 25 and loaded.informed_masking_active


# ----- initialisation ---------------------------------------------------------------------------------------------
def check_fresh_init(model: SGMAEForPreTraining, config) -> None:
    encoder_table = model.vit.embeddings.position_embeddings
    decoder_table = model.decoder.decoder_pos_embed
    expected_encoder = torch.from_numpy(mae_sincos_table(config.hidden_size, 8, 8)).float()[None]
    expected_decoder = torch.from_numpy(mae_sincos_table(config.decoder_hidden_size, 8, 8)).float()[None]
    assert torch.allclose(encoder_table, expected_encoder, atol=1e-6)
    assert torch.allclose(decoder_table, expected_decoder, atol=1e-6)
    assert encoder_table[0, 1:].abs().sum(dim=1).gt(0).all() and decoder_table[0, 1:].abs().sum(dim=1).gt(0).all()
    assert not encoder_table.requires_grad and not decoder_table.requires_grad
    for token in (model.vit.embeddings.cls_token, model.decoder.mask_token):
        assert token.requires_grad
        assert token.abs().min() > 0
        assert 0.005 < token.std() < 0.05  # normal(std=initializer_range)
    assert_mae_init(model)


def assert_xavier_uniform(weight: torch.Tensor, fan_in: int, fan_out: int, name: str) -> None:
    """U(-b, b) with b = sqrt(6 / (fan_in + fan_out)): inside the bound, reaching it, with a uniform's std b/sqrt(3).

    PyTorch's default init of Linear and Conv2d has bound 1/sqrt(fan_in), which fails the bound or the std check.
    """
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    assert weight.abs().max() <= bound + 1e-7, name
    assert weight.abs().max() > 0.9 * bound, name
    assert abs(weight.float().std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3), name
    assert abs(weight.float().mean().item()) < 0.1 * bound, name


def assert_mae_init(model: nn.Module) -> None:
    """Every parameter family as facebookresearch/mae's `initialize_weights` (and its fine-tuning head) leaves it."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):  # the patch projection: xavier over the flattened [D, C*p*p] kernel
            assert_xavier_uniform(module.weight, module.weight[0].numel(), module.weight.shape[0], name)
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
        elif isinstance(module, nn.Linear):
            if name == "classifier":  # MAE fine-tuning head: trunc_normal(std=2e-5)
                assert module.weight.std() < 1e-4, name
            else:
                assert_xavier_uniform(module.weight, module.in_features, module.out_features, name)
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
        elif isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name


def test_every_parameter_family_has_mae_init_at_vit_scale():
    """Large enough that PyTorch's default init and MAE's are told apart (the 8-wide tiny config cannot)."""
    config = tiny_config(
        hidden_size=192, intermediate_size=768, image_size=64, patch_size=16, num_attention_heads=3,
        decoder_hidden_size=128, decoder_intermediate_size=512, num_labels=10,
    )  # fmt: skip
    assert_mae_init(SGMAEForPreTraining(config))
    assert_mae_init(SGMAEForImageClassification(config))


def test_weights_missing_from_a_checkpoint_get_mae_init(tmp_path):
    """transformers initialises what a checkpoint lacks through `_init_weights`, module by module."""
    config = tiny_config(hidden_size=192, intermediate_size=768, image_size=64, patch_size=16, num_attention_heads=3)
    SGMAEForPreTraining(config).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = {key for key in weights if ".projection." in key or key.startswith("decoder.decoder_embed")}
    save_file({key: value for key, value in weights.items() if key not in dropped}, tmp_path / "model.safetensors")
    model, info = SGMAEForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == dropped and not info["unexpected_keys"]
    assert_mae_init(model)
    assert not model.vit.embeddings.position_embeddings.requires_grad  # frozen, also with output_loading_info


def test_model_builds_on_the_meta_device_and_materialises_with_its_init(config):
    with torch.device("meta"):
        model = SGMAEForPreTraining(config)
    assert model.vit.embeddings.cls_token.is_meta
    model.to_empty(device="cpu")
    model.initialize_weights()
    reference = SGMAEForPreTraining(config)
    for name, tensor in reference.state_dict().items():
        if name.endswith(("pos_embed", "position_embeddings")) or "layernorm" in name or tensor.dtype == torch.long:
            assert torch.equal(model.state_dict()[name], tensor), name
    assert int(model.schedule.started_at) == -1
    check_fresh_init(model, config)


def test_layer_norm_eps_accepts_any_positive_value():
    assert tiny_config(layer_norm_eps=1.0).layer_norm_eps == 1.0  # transformers' common tests set it
    for bad in (0.0, -1e-6):
        with pytest.raises(INVALID_CONFIG, match="layer_norm_eps"):
            tiny_config(layer_norm_eps=bad)


def test_from_scratch_init_has_sincos_tables_and_nonzero_tokens(config):
    check_fresh_init(SGMAEForPreTraining(config), config)
    assert torch.equal(
        SGMAEModel(config).embeddings.position_embeddings, sincos_position_table(config.hidden_size, 8, 8)
    )


def test_init_survives_a_save_load_round_trip(tmp_path, config):
    model = SGMAEForPreTraining(config)
    model.save_pretrained(tmp_path)
    loaded = SGMAEForPreTraining.from_pretrained(tmp_path)
    check_fresh_init(loaded, config)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert {name for name, p in loaded.named_parameters() if not p.requires_grad} == {
        "vit.embeddings.position_embeddings",
        "decoder.decoder_pos_embed",
    }
    backbone = SGMAEModel.from_pretrained(tmp_path)
    assert not backbone.embeddings.position_embeddings.requires_grad
    assert torch.equal(backbone.embeddings.position_embeddings, model.vit.embeddings.position_embeddings)


def test_sincos_table_for_a_non_square_grid_matches_mae_formula():
    table = sincos_position_table(16, 3, 5)
    assert table.shape == (1, 16, 16)
    assert torch.allclose(table[0], torch.from_numpy(mae_sincos_table(16, 3, 5)).float(), atol=1e-6)
    with pytest.raises(INVALID_CONFIG, match="divisible by 4"):
        sincos_position_table(18, 2, 2)


# ----- ViTMAE parity ----------------------------------------------------------------------------------------------
def vit_mae_fields() -> dict:
    return dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=4,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
        layer_norm_eps=1e-6,
    )


@pytest.fixture(scope="module", params=[False, True], ids=["pixels", "norm_pix_loss"])
def vit_mae_checkpoints(request, tmp_path_factory):
    """A randomised ViTMAEForPreTraining and the same weights in three key layouts."""
    torch.manual_seed(1)
    reference = ViTMAEForPreTraining(ViTMAEConfig(**vit_mae_fields(), norm_pix_loss=request.param)).eval()
    with torch.no_grad():  # its own init leaves the position tables, [CLS] and mask token at zero
        for parameter in reference.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    root = tmp_path_factory.mktemp("vit_mae")
    saved = root / "transformers"
    reference.save_pretrained(saved)
    keys = list(load_file(saved / "model.safetensors"))
    assert any(".attention.attention.query." in key for key in keys)
    assert any(key.startswith("decoder.decoder_encoder.layer.") for key in keys)

    hub = root / "hub"
    hub.mkdir()
    shutil.copy(saved / "config.json", hub / "config.json")
    renamed = {
        key.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): value
        for key, value in load_file(saved / "model.safetensors").items()
    }
    save_file(renamed, hub / "model.safetensors")

    in_memory = root / "in_memory"
    in_memory.mkdir()
    shutil.copy(saved / "config.json", in_memory / "config.json")
    state_dict = {key: value.contiguous() for key, value in reference.state_dict().items()}
    assert any(".attention.q_proj." in key for key in state_dict)
    save_file(state_dict, in_memory / "model.safetensors")
    return reference, {"transformers": saved, "hub": hub, "in_memory": in_memory}


@pytest.mark.parametrize("layout", ["transformers", "hub", "in_memory"])
def test_vit_mae_checkpoint_gives_vit_mae_outputs(vit_mae_checkpoints, layout):
    reference, paths = vit_mae_checkpoints
    model = SGMAEForPreTraining.from_pretrained(paths[layout])
    assert model.config.norm_pix_loss == reference.config.norm_pix_loss
    assert model.config.layer_norm_eps == 1e-6
    pixel_values, noise = images(3), torch.rand(3, NUM_PATCHES)
    with torch.no_grad():
        expected = reference(pixel_values, noise=noise)
        output = model(pixel_values, noise=noise)
    assert torch.equal(output.mask, expected.mask)
    assert torch.equal(output.ids_restore, expected.ids_restore)
    assert torch.allclose(output.logits, expected.logits, atol=1e-5)
    assert abs(output.loss.item() - expected.loss.item()) < 1e-5
    assert output.logits.abs().max() > 0.1  # not a trivially zero comparison


@pytest.mark.parametrize("layout", ["transformers", "hub", "in_memory"])
def test_vit_mae_checkpoint_as_backbone_matches_vit_mae_encoder(vit_mae_checkpoints, layout):
    reference, paths = vit_mae_checkpoints
    backbone = SGMAEModel.from_pretrained(paths[layout])
    pixel_values = images(2)
    reference.vit.config.mask_ratio = 0.0  # ViTMAE keeps every patch, in order for increasing noise
    try:
        with torch.no_grad():
            expected = reference.vit(pixel_values, noise=torch.arange(NUM_PATCHES).float().expand(2, -1))
    finally:
        reference.vit.config.mask_ratio = 0.75
    output = backbone(pixel_values)
    assert output.last_hidden_state.shape == (2, 1 + NUM_PATCHES, 32)
    assert torch.allclose(output.last_hidden_state, expected.last_hidden_state, atol=1e-5)

    classifier = SGMAEForImageClassification.from_pretrained(paths[layout], num_labels=4)
    assert not hasattr(classifier, "decoder")
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(classifier.vit.state_dict()[name], tensor), name
    assert classifier(pixel_values).logits.shape == (2, 4)


def assert_same_as_reference(model: SGMAEForPreTraining, reference: ViTMAEForPreTraining) -> None:
    pixel_values, noise = images(2), torch.rand(2, NUM_PATCHES)
    with torch.no_grad():
        expected, output = reference(pixel_values, noise=noise), model(pixel_values, noise=noise)
    assert torch.allclose(output.logits, expected.logits, atol=1e-5)
    assert abs(output.loss.item() - expected.loss.item()) < 1e-5


def test_vit_mae_checkpoint_with_an_explicit_config_is_still_converted(vit_mae_checkpoints):
    reference, paths = vit_mae_checkpoints
    config = SGMAEConfig(**vit_mae_fields(), norm_pix_loss=reference.config.norm_pix_loss, mask_strategy="random")
    model = SGMAEForPreTraining.from_pretrained(paths["transformers"], config=config)
    assert model.config.mask_strategy == "random"
    assert_same_as_reference(model, reference)
    edited = ViTMAEConfig.from_pretrained(paths["hub"])
    model = SGMAEForPreTraining.from_pretrained(paths["hub"], config=edited)
    assert isinstance(model.config, SGMAEConfig)
    assert_same_as_reference(model, reference)


def test_sharded_vit_mae_checkpoint_is_converted(vit_mae_checkpoints, tmp_path):
    reference, _ = vit_mae_checkpoints
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    assert_same_as_reference(SGMAEForPreTraining.from_pretrained(tmp_path), reference)


def test_vit_mae_checkpoint_with_a_new_image_size(vit_mae_checkpoints):
    """Fine-tuning at another resolution: the fixed tables are rebuilt for the new grid, everything else loads."""
    reference, paths = vit_mae_checkpoints
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers' loader refuses it
        SGMAEForImageClassification.from_pretrained(paths["hub"], image_size=48)
    model, info = SGMAEForImageClassification.from_pretrained(
        paths["hub"], image_size=48, num_labels=3, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert [key for key, _, _ in info["mismatched_keys"]] == ["vit.embeddings.position_embeddings"]
    table = model.vit.embeddings.position_embeddings
    assert torch.equal(table, sincos_position_table(32, 12, 12)) and not table.requires_grad
    assert torch.equal(model.vit.embeddings.cls_token, reference.vit.embeddings.cls_token)
    assert torch.equal(model.vit.layers[1].mlp.fc2.weight, reference.vit.layers[1].mlp.fc2.weight)
    assert model(images(2, 48, 48)).logits.shape == (2, 3)


def test_vit_mae_checkpoint_ignores_loader_only_options(vit_mae_checkpoints):
    reference, paths = vit_mae_checkpoints
    model = SGMAEForPreTraining.from_pretrained(
        paths["transformers"], attn_implementation="sdpa", low_cpu_mem_usage=True, device_map="cpu", dtype="auto"
    )
    assert_same_as_reference(model, reference)
    half = SGMAEModel.from_pretrained(paths["transformers"], dtype=torch.bfloat16)
    assert half.embeddings.cls_token.dtype == torch.bfloat16


def test_vit_mae_checkpoint_accepts_classifier_overrides(vit_mae_checkpoints):
    _, paths = vit_mae_checkpoints
    labels = {0: "cat", 1: "dog", 2: "frog"}
    classifier = SGMAEForImageClassification.from_pretrained(paths["transformers"], num_labels=3, id2label=labels)
    assert classifier.config.id2label == labels and classifier.config.num_labels == 3
    assert classifier.classifier.weight.shape == (3, 32)
    with pytest.raises(TypeError, match="unexpected"):
        SGMAEModel.from_pretrained(paths["transformers"], not_a_config_field=1)


# ----- the backbone: no masking, no shuffling ----------------------------------------------------------------------
def test_backbone_keeps_every_patch_in_order(config):
    model = SGMAEModel(tiny_config(mask_ratio=0.9)).train()  # neither the ratio nor train mode may mask
    pixel_values = images()
    output = model(pixel_values)
    assert output.last_hidden_state.shape == (2, 1 + NUM_PATCHES, config.hidden_size)
    assert torch.equal(model(pixel_values).last_hidden_state, output.last_hidden_state)  # no random shuffle
    assert torch.allclose(output.pooler_output, output.last_hidden_state[:, 1:].mean(dim=1))

    # Without position tables the encoder is permutation-equivariant: permuting the patches of the image must
    # permute the output tokens the same way (an internal shuffle that is not undone would break this).
    with torch.no_grad():
        model.embeddings.position_embeddings.zero_()
    pretraining = SGMAEForPreTraining(config)
    permutation = torch.randperm(NUM_PATCHES)
    permuted_image = pretraining.unpatchify(pretraining.patchify(pixel_values)[:, permutation])
    plain, permuted = model(pixel_values).last_hidden_state, model(permuted_image).last_hidden_state
    assert torch.allclose(permuted[:, 1:], plain[:, 1:][:, permutation], atol=1e-5)
    assert torch.allclose(permuted[:, 0], plain[:, 0], atol=1e-5)


def test_backbone_returns_hidden_states_and_attentions(config):
    model = SGMAEModel(config)
    output = model(images(), output_hidden_states=True, output_attentions=True)
    assert len(output.hidden_states) == config.num_hidden_layers + 1
    assert all(state.shape == (2, 1 + NUM_PATCHES, config.hidden_size) for state in output.hidden_states)
    assert len(output.attentions) == config.num_hidden_layers
    for weights in output.attentions:
        assert weights.shape == (2, config.num_attention_heads, 1 + NUM_PATCHES, 1 + NUM_PATCHES)
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)
    as_tuple = model(images(), return_dict=False)
    assert as_tuple[0].shape == (2, 1 + NUM_PATCHES, config.hidden_size)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attn_implementation_picks_the_kernel(config, implementation, monkeypatch):
    """Chosen as in other transformers models (at construction or later); SDPA is used only when chosen."""
    sdpa_calls = []
    sdpa = nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        nn.functional, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.append(1) or sdpa(*a, **k)
    )
    model = SGMAEForPreTraining._from_config(config, attn_implementation=implementation)
    assert model.config._attn_implementation == implementation
    model(images())
    assert bool(sdpa_calls) == (implementation == "sdpa")
    model.set_attn_implementation("eager" if implementation == "sdpa" else "sdpa")
    sdpa_calls.clear()
    model(images())
    assert bool(sdpa_calls) == (implementation == "eager")


def test_sdpa_path_equals_explicit_attention_path(config):
    model = SGMAEModel(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)  # avoid a near-uniform attention
    pixel_values = images()
    fast = model(pixel_values).last_hidden_state
    explicit = model(pixel_values, output_attentions=True)
    assert torch.allclose(fast, explicit.last_hidden_state, atol=1e-5)
    assert explicit.attentions[0].amax() > 2.0 / (1 + NUM_PATCHES)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooler_output_follows_classifier_pooling(pooling):
    model = SGMAEModel(tiny_config(classifier_pooling=pooling))
    output = model(images())
    expected = output.last_hidden_state[:, 1:].mean(dim=1) if pooling == "mean" else output.last_hidden_state[:, 0]
    assert torch.equal(output.pooler_output, expected)


# ----- position-table interpolation ------------------------------------------------------------------------------
@pytest.mark.parametrize(("height", "width"), [(48, 48), (32, 48)])
def test_backbone_interpolates_position_table(height, width):
    config = tiny_config()
    model = SGMAEModel(config)
    grid = (height // 4, width // 4)
    output = model(images(2, height, width), interpolate_pos_encoding=True, output_hidden_states=True)
    assert output.last_hidden_state.shape == (2, 1 + grid[0] * grid[1], config.hidden_size)
    assert torch.isfinite(output.last_hidden_state).all()
    # With the patch projection zeroed, the embeddings are exactly the (resized) position table.
    with torch.no_grad():
        model.embeddings.patch_embeddings.projection.weight.zero_()
        model.embeddings.patch_embeddings.projection.bias.zero_()
    embedded = model(images(1, height, width), interpolate_pos_encoding=True, output_hidden_states=True)
    expected = resize_position_table(model.embeddings.position_embeddings, (8, 8), grid)
    assert torch.allclose(embedded.hidden_states[0][:, 1:], expected[:, 1:], atol=1e-6)
    # At the native size, interpolation is the identity.
    native = images()
    assert torch.equal(model(native, interpolate_pos_encoding=True).last_hidden_state, model(native).last_hidden_state)


def test_position_table_resize_is_a_2d_grid_resize():
    """8x8 -> 8x12: the row half of every embedding must stay the row's, for each of the 12 columns."""
    dim = 32
    table = sincos_position_table(dim, 8, 8)
    resized = resize_position_table(table, (8, 8), (8, 12))
    assert resized.shape == (1, 1 + 96, dim)
    assert torch.equal(resized[:, 0], table[:, 0])
    rows_resized = resized[0, 1:].view(8, 12, dim)[..., dim // 2 :]
    rows_original = table[0, 1:].view(8, 8, dim)[:, :1, dim // 2 :].expand(-1, 12, -1)
    assert torch.allclose(rows_resized, rows_original, atol=1e-5)
    corners = resize_position_table(table, (8, 8), (16, 16))[0, 1:].view(16, 16, dim)
    assert torch.allclose(corners[0, 0], table[0, 1], atol=0.15)  # the top-left stays top-left


@pytest.mark.parametrize(("height", "width"), [(48, 48), (32, 48)])
def test_pretraining_interpolates_encoder_and_decoder_tables(height, width):
    config = tiny_config()
    model = SGMAEForPreTraining(config)
    grid = (height // 4, width // 4)
    num_patches = grid[0] * grid[1]
    num_masked = num_patches - int(num_patches * 0.25)
    with torch.no_grad():
        model.decoder.mask_token.zero_()  # masked slots then hold exactly their decoder position
    captured = []
    handle = model.decoder.decoder_layers[0].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    pixel_values = images(2, height, width)
    output = model(pixel_values, interpolate_pos_encoding=True)
    handle.remove()
    assert output.logits.shape == (2, num_patches, 48)
    assert output.mask.sum(dim=1).tolist() == [num_masked] * 2
    assert torch.isfinite(output.loss)
    assert model.unpatchify(output.logits, (height, width)).shape == pixel_values.shape
    decoder_positions = resize_position_table(model.decoder.decoder_pos_embed, (8, 8), grid)[0, 1:]
    masked = output.mask[0].bool()
    assert torch.allclose(captured[0][0, 1:][masked], decoder_positions[masked], atol=1e-6)
    # Informed masks at the new size too, from the whole images' rankings on the new grid.
    model.set_training_progress(1, 1)
    scores = model.informed_mask_scores(pixel_values, interpolate_pos_encoding=True)
    assert scores.shape == (2, num_patches)
    informed = model(pixel_values, mask_scores=scores, interpolate_pos_encoding=True)
    assert informed.mask_type.tolist() == [int(MaskType.INFORMED)] * 2
    assert informed.mask.sum(dim=1).tolist() == [num_masked] * 2


# ----- training-time features -------------------------------------------------------------------------------------
def enable_checkpointing(model: nn.Module) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(config):
    model = SGMAEForPreTraining(config).train()
    pixel_values, noise = images(), torch.rand(2, NUM_PATCHES)
    reference_loss = model(pixel_values, noise=noise).loss
    reference_loss.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    enable_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in (*model.vit.layers, *model.decoder.decoder_layers))
    calls = []
    handle = model.vit.layers[0].mlp.register_forward_pre_hook(lambda *args: calls.append(torch.is_grad_enabled()))
    loss = model(pixel_values, noise=noise).loss
    assert len(calls) == 1
    loss.backward()
    handle.remove()
    assert len(calls) == 2  # the block ran again during backward: its activations were not kept
    assert torch.equal(loss, reference_loss)
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.allclose(parameter.grad, reference[name], atol=1e-6), name
    assert reference.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    model.set_training_progress(1, 1)
    informed = model(pixel_values)
    informed.loss.backward()
    assert informed.mask_type.tolist() == [int(MaskType.INFORMED)] * 2


def test_activation_checkpointing_options_reach_the_blocks(config):
    """transformers' options (here every_n_layers) apply per block, as in the library's own models."""
    model = SGMAEForPreTraining(config).train()
    if not hasattr(model, "activation_checkpointing_enable"):
        pytest.skip(
            "transformers < 5.23 has no activation_checkpointing_enable (gradient checkpointing is tested above)"
        )
    model.activation_checkpointing_enable(every_n_layers=2, activation_checkpointing_kwargs={"use_reentrant": True})
    blocks = (*model.vit.layers, *model.decoder.decoder_layers)
    assert [block.gradient_checkpointing for block in blocks] == [True, False, True]
    assert blocks[0]._gradient_checkpointing_func.keywords == {"use_reentrant": True}
    calls = {index: 0 for index in range(len(blocks))}
    for index, block in enumerate(blocks):
        block.mlp.register_forward_pre_hook(lambda *args, index=index: calls.__setitem__(index, calls[index] + 1))
    model(images(), noise=torch.rand(2, NUM_PATCHES)).loss.backward()
    assert calls == {0: 2, 1: 1, 2: 2}  # checkpointed blocks ran again in backward, the other did not


@pytest.mark.parametrize("informed", [False, "step", "cached"])
def test_bf16_autocast_forward_and_backward(informed):
    model = SGMAEForPreTraining(tiny_config(informed_mask_source=informed or "cached")).train()
    scores = None
    if informed:
        model.set_training_progress(1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if informed == "cached":
            scores = model.informed_mask_scores(images(4))
        output = model(images(4), mask_scores=scores)
    output.loss.backward()
    assert output.loss.dtype == torch.float32 and torch.isfinite(output.loss)
    expected_type = MaskType.INFORMED if informed else MaskType.RANDOM
    assert output.mask_type.tolist() == [int(expected_type)] * 4
    assert output.mask.sum(dim=1).tolist() == [NUM_MASKED] * 4
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads)


# ----- image classification -----------------------------------------------------------------------------------
def test_single_label_classification_loss():
    model = SGMAEForImageClassification(tiny_config(num_labels=5))
    labels = torch.tensor([0, 4, 2])
    output = model(images(3), labels=labels)
    assert output.logits.shape == (3, 5)
    assert model.config.problem_type == "single_label_classification"
    assert torch.allclose(output.loss, nn.functional.cross_entropy(output.logits, labels))


def test_multi_label_classification_loss():
    model = SGMAEForImageClassification(tiny_config(num_labels=3))
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    output = model(images(), labels=labels)
    assert model.config.problem_type == "multi_label_classification"
    assert torch.allclose(output.loss, nn.functional.binary_cross_entropy_with_logits(output.logits, labels))


def test_regression_loss():
    model = SGMAEForImageClassification(tiny_config(num_labels=1))
    labels = torch.tensor([0.5, -1.0])
    output = model(images(), labels=labels)
    assert output.logits.shape == (2, 1)
    assert model.config.problem_type == "regression"
    assert torch.allclose(output.loss, nn.functional.mse_loss(output.logits.squeeze(-1), labels))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_classifier_from_pretraining_checkpoint(tmp_path, pooling):
    config = tiny_config(classifier_pooling=pooling)
    pretrained = SGMAEForPreTraining(config)
    with torch.no_grad():
        pretrained.vit.layernorm.weight.normal_()  # not the init value, so loading it is visible
    pretrained.set_training_progress(9, 10)
    pretrained.save_pretrained(tmp_path)
    labels = {0: "airplane", 1: "bird", 2: "cat", 3: "dog", 4: "ship"}
    model = SGMAEForImageClassification.from_pretrained(tmp_path, num_labels=5, id2label=labels)
    assert model.config.id2label == labels and model.config.num_labels == 5
    for name, tensor in pretrained.vit.state_dict().items():
        assert torch.equal(model.vit.state_dict()[name], tensor), name
    assert not any(name.startswith("decoder") for name in model.state_dict())
    assert not any(name.startswith("schedule.") for name in model.state_dict())
    weight = model.classifier.weight
    assert weight.shape == (5, 32)
    assert 0 < weight.std() < 1e-3 and torch.equal(model.classifier.bias, torch.zeros(5))  # MAE's small head
    if pooling == "mean":
        assert torch.equal(model.fc_norm.weight, torch.ones(32)) and torch.equal(model.fc_norm.bias, torch.zeros(32))
    else:
        assert isinstance(model.fc_norm, nn.Identity)
    output = model(images(), output_hidden_states=True)
    assert output.logits.abs().max() < 0.05
    assert len(output.hidden_states) == config.num_hidden_layers + 1
    # The encoder features the head reads are the pre-trained backbone's.
    backbone_output = SGMAEModel.from_pretrained(tmp_path)(images())
    assert backbone_output.pooler_output.shape == (2, 32)


# ----- bad inputs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_class", [SGMAEModel, SGMAEForPreTraining, SGMAEForImageClassification])
def test_bad_pixel_values_raise_clear_errors(config, model_class):
    model = model_class(config)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model(torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(2, 3, 34, 32), interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match=r"\[batch, channels, height, width\]"):
        model(torch.randn(3, 32, 32))


def test_bad_masks_and_noise_raise_clear_errors(config):
    model = SGMAEForPreTraining(config)
    pixel_values = images()
    with pytest.raises(ValueError, match="exactly 48"):
        model(pixel_values, mask=random_mask(num_masked=40))
    uneven = random_mask()
    uneven[0, uneven[0].nonzero()[0]] = False
    with pytest.raises(ValueError, match="exactly 48"):
        model(pixel_values, mask=uneven)
    with pytest.raises(ValueError, match="mask must have shape"):
        model(pixel_values, mask=random_mask(num_patches=49, num_masked=36))
    with pytest.raises(ValueError, match="mask must have shape"):
        model(pixel_values, mask=random_mask(batch_size=3))
    with pytest.raises(ValueError, match="noise must have shape"):
        model(pixel_values, noise=torch.rand(2, 63))
    with pytest.raises(ValueError, match="noise must have shape"):
        model(pixel_values, noise=torch.rand(NUM_PATCHES))


def test_saved_config_names_the_pretraining_architecture(tmp_path, config):
    SGMAEForPreTraining(config).save_pretrained(tmp_path)
    saved = json.loads(Path(tmp_path, "config.json").read_text())
    assert saved["architectures"] == ["SGMAEForPreTraining"]
    assert saved["model_type"] == "sgmae"


@pytest.mark.parametrize("informed", [False, True])
def test_choosing_the_masks_reads_nothing_back_from_the_device(config, informed, monkeypatch):
    """The schedule lives on the host once set (or read once), so a training step does not wait for the device."""
    model = SGMAEForPreTraining(config).train()
    model.set_training_progress(1 if informed else 0, 8 if informed else 100)
    reads = []
    for name in ("__int__", "__bool__", "item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _o=original, _n=name: reads.append(_n) or _o(self, *a)
        )
    for step in range(3):
        model.set_training_progress(step + (1 if informed else 0), 8 if informed else 100)
        output = model(images())
    monkeypatch.undo()
    assert reads == []
    assert output.mask_type.tolist() == [int(MaskType.INFORMED if informed else MaskType.RANDOM)] * 2


def test_compiled_blocks_give_the_eager_loss_and_gradients(config):
    """torch.compile on the blocks (what --torch_compile does); tolerance 1e-5, as fused kernels may reorder sums."""
    eager = SGMAEForPreTraining(config).train()
    compiled = SGMAEForPreTraining(config).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    pixel_values, noise = images(), torch.rand(2, NUM_PATCHES)
    try:
        loss = compiled(pixel_values, noise=noise).loss
    except Exception as error:  # no C++ compiler, or an unsupported platform
        pytest.skip(f"torch.compile does not work on this machine: {type(error).__name__}: {error}")
    reference = eager(pixel_values, noise=noise).loss
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    loss.backward()
    reference.backward()
    for (name, parameter), (_, expected) in zip(compiled.named_parameters(), eager.named_parameters(), strict=True):
        if expected.grad is not None:
            torch.testing.assert_close(parameter.grad, expected.grad, rtol=1e-4, atol=1e-5, msg=name)
    compiled.set_training_progress(1, 1)  # informed masks: the feature pass runs the compiled blocks on all tokens
    assert compiled(pixel_values).mask_type.tolist() == [int(MaskType.INFORMED)] * 2


# ----- informed masks from given rankings (the cached source) -----------------------------------------------------
def test_a_plain_call_ranks_its_own_views_when_due_and_warns_once_naming_the_cache(caplog):
    """As every transformers model, `model(pixel_values)` works for every config: with the cached source and no
    rankings given, the model ranks the batch itself (the per-step source's masks, draw for draw) and says so once."""
    cached = SGMAEForPreTraining(tiny_config(hint_ratio=0.1)).train()
    step = SGMAEForPreTraining(tiny_config(informed_mask_source="step", hint_ratio=0.1)).train()
    step.load_state_dict(cached.state_dict())
    assert cached(images()).mask_type.tolist() == [int(MaskType.RANDOM)] * 2  # not due yet: no rankings needed
    for model in (cached, step):
        model.set_training_progress(1, 1)
    modeling_logger = logging.getLogger("modeling_sgmae.modeling_sgmae")
    modeling_logger.warning_once.cache_clear()  # once per process: earlier tests may have seen it
    pixel_values = images()
    with caplog.at_level("WARNING"):
        outputs = [cached(pixel_values, generator=torch.Generator().manual_seed(1)) for _ in range(3)]
    expected = step(pixel_values, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(output.mask, expected.mask) for output in outputs)
    assert outputs[0].mask_type.tolist() == [int(MaskType.INFORMED)] * 2
    warnings = [record.getMessage() for record in caplog.records if "no mask_scores were given" in record.getMessage()]
    assert len(warnings) == 1 and "MaskRankingCache" in warnings[0]


def test_given_whole_image_rankings_mask_as_the_per_step_source_does():
    """Uncropped rankings of the same images give the per-step source's masks, draw for draw (same generator)."""
    step = SGMAEForPreTraining(tiny_config(informed_mask_source="step", hint_ratio=0.1)).train()
    cached = SGMAEForPreTraining(tiny_config(hint_ratio=0.1)).train()
    cached.load_state_dict(step.state_dict())
    for model in (step, cached):
        model.set_training_progress(1, 1)
    pixel_values = images(4)
    cached.eval()
    scores = cached.informed_mask_scores(pixel_values)
    cached.train()
    expected = step(pixel_values, generator=torch.Generator().manual_seed(3))
    given = cached(pixel_values, mask_scores=scores, generator=torch.Generator().manual_seed(3))
    assert torch.equal(given.mask, expected.mask)
    assert torch.equal(given.loss, expected.loss)
    assert given.object_part_size.tolist() == expected.object_part_size.tolist()
    assert given.edge_density.tolist() == [-1.0] * 4  # the graph stays with the pass that built the ranking


def test_given_rankings_mask_their_top_k_and_fall_back_on_nan_rows():
    model = SGMAEForPreTraining(tiny_config(hint_ratio=0.0)).train()
    model.set_training_progress(1, 1)
    scores = torch.rand(3, NUM_PATCHES)
    scores[0, :NUM_MASKED] += 3.0  # the first K patches form the object part of image 0
    scores[2] = float("nan")  # no usable cut
    output = model(images(3), mask_scores=scores)
    assert output.mask_type.tolist() == [int(MaskType.INFORMED)] * 2 + [int(MaskType.FALLBACK)]
    assert output.mask.sum(dim=1).tolist() == [NUM_MASKED] * 3
    assert output.mask[0, :NUM_MASKED].all()
    top = scores[1].topk(NUM_MASKED).indices
    assert output.mask[1, top].all()
    assert output.object_part_size.tolist() == [NUM_MASKED, 0, -1]
    with pytest.raises(ValueError, match="mask_scores must have shape"):
        model(images(3), mask_scores=scores[:, :-1])


def test_informed_mask_scores_rank_the_object_part_first_and_leave_training_mode_alone():
    model = SGMAEForPreTraining(tiny_config()).train()
    pixel_values = images(4)
    scores = model.informed_mask_scores(pixel_values)
    assert model.training
    assert scores.shape == (4, NUM_PATCHES)
    result = model.informed_masking(*model.vit.embeddings(pixel_values)[:2])
    usable = result.mask_type == int(MaskType.INFORMED)
    object_rank = torch.where(result.object_part, scores, float("inf")).amin(dim=1)
    background_rank = torch.where(result.object_part, float("-inf"), scores).amax(dim=1)
    assert (object_rank[usable] > background_rank[usable]).all()
    assert torch.isnan(scores[~usable]).all()


# ----- checkpoints of earlier releases ----------------------------------------------------------------------------
def test_a_checkpoint_saved_before_the_config_renames_loads_and_trains_as_it_did():
    """tests/data/sgmae-checkpoint-2026-12: a tiny model saved, with its losses on fixed inputs, by the code of
    2026-12-07 (its config.json still says `feature_centering`). It loads with that setting under its new name and
    gives the same masks and losses (random, cached and per-step informed masks)."""
    folder = Path(__file__).parent / "data" / "sgmae-checkpoint-2026-12"
    assert "feature_centering" in json.loads((folder / "config.json").read_text())
    expected = json.loads((folder / "expected.json").read_text())
    model = SGMAEForPreTraining.from_pretrained(folder)
    assert model.config.feature_centring == "position_mean" and model.informed_masking_active
    assert "feature_centering" not in model.config.to_dict()
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scores = model.eval().informed_mask_scores(pixel_values)
    model.train()
    random = model(pixel_values, random_masking=True, generator=torch.Generator().manual_seed(1))
    cached = model(pixel_values, mask_scores=scores, generator=torch.Generator().manual_seed(1))
    step = SGMAEForPreTraining.from_pretrained(folder, informed_mask_source="step").train()
    per_step = step(pixel_values, generator=torch.Generator().manual_seed(1))
    assert cached.mask.int().tolist() == expected["informed_mask"]
    for output, name in ((random, "random_loss"), (cached, "cached_loss"), (per_step, "step_loss")):
        assert output.loss.item() == pytest.approx(expected[name], rel=1e-5), name
