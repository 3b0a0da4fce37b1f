"""FLOPs of an SG-MAE training step from token counts: the numerator of MFU and the floor of the self-guided cost.

FLOPs per token of one transformer block of width w, MLP width m, sequence length n:

    t(w, m, n) = 8·w² (qkv + output projections) + 4·w·m (MLP) + 4·n·w (attention scores and weighted sum)

With N patches, N_v = int(N·(1 - mask_ratio)) visible ones, L encoder blocks (D, M), L_d decoder blocks
(D_d, M_d), P = patch_size²·channels pixels per patch ([CLS] counted as a token everywhere):

    encoder  E = L · (N_v + 1) · t(D, M, N_v + 1)                      masked encoder, forward
    decoder  R = L_d · (N + 1) · t(D_d, M_d, N + 1) + 2·(N_v + 1)·D·D_d + 2·(N + 1)·D_d·P
    feature  F(k) = k · (N + 1) · t(D, M, N + 1)                       no-grad pass over all patches, k blocks
    floor(k) = 1 + F(k) / (3 · (E + R))                                 forward + backward ≈ 3 x forward

The patch embedding (< 1 %) and the optimiser step (fixed per step) are left out.
"""

from __future__ import annotations

from modeling_sgmae import SGMAEConfig


def block_flops_per_token(width: int, mlp: int, length: int) -> float:
    """t(w, m, n): forward FLOPs per token of one pre-LN block (projections, MLP, attention products)."""
    return 8 * width * width + 4 * width * mlp + 4 * length * width


def floor_ratio(config: SGMAEConfig, feature_layers: int) -> dict[str, float]:
    """The step's FLOPs per image and the self-guided / random step-time floor from token counts (see above)."""
    grid_h, grid_w = config.grid_size
    num_patches = grid_h * grid_w
    num_visible = int(num_patches * (1 - config.mask_ratio))
    pixels = config.patch_size**2 * config.num_channels
    encoder = (
        config.num_hidden_layers
        * (num_visible + 1)
        * block_flops_per_token(config.hidden_size, config.intermediate_size, num_visible + 1)
    )
    decoder = (
        config.decoder_num_hidden_layers
        * (num_patches + 1)
        * block_flops_per_token(config.decoder_hidden_size, config.decoder_intermediate_size, num_patches + 1)
        + 2 * (num_visible + 1) * config.hidden_size * config.decoder_hidden_size
        + 2 * (num_patches + 1) * config.decoder_hidden_size * pixels
    )
    features = (
        feature_layers
        * (num_patches + 1)
        * block_flops_per_token(config.hidden_size, config.intermediate_size, num_patches + 1)
    )
    return {
        "random_step_gflop_per_image": 3 * (encoder + decoder) / 1e9,
        "encoder_fwd_gflop_per_image": encoder / 1e9,
        "decoder_fwd_gflop_per_image": decoder / 1e9,
        "decoder_share_of_encoder": decoder / encoder,
        "feature_pass_gflop_per_image": features / 1e9,
        "floor_ratio": 1 + features / (3 * (encoder + decoder)),
    }
