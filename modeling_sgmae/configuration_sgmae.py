"""SG-MAE configuration: ViTMAE's architecture fields plus the self-guided masking choices of docs/method.md."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin
from transformers.utils.type_validators import activation_fn_key, interval

AUTO_MAP = {
    "AutoConfig": "configuration_sgmae.SGMAEConfig",
    "AutoModel": "modeling_sgmae.SGMAEModel",
    "AutoModelForPreTraining": "modeling_sgmae.SGMAEForPreTraining",
    "AutoModelForImageClassification": "modeling_sgmae.SGMAEForImageClassification",
    "AutoBackbone": "modeling_sgmae.SGMAEBackbone",
}
WIDTHS_AND_HEADS = (("hidden_size", "num_attention_heads"), ("decoder_hidden_size", "decoder_num_attention_heads"))
rate = interval(min=0.0, max=1.0, exclude_max=True)  # dropouts and the mask ratio: 1.0 would drop everything
fraction = interval(min=0.0, max=1.0)
at_least_one = interval(min=1)  # widths, depths, heads, patch size, channels


@strict
class SGMAEConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""Configuration of an SG-MAE model (a ViT-MAE whose masks become self-guided after a warm-up).

    Architecture fields have the names, meaning and defaults of `transformers.ViTMAEConfig` (widths, depths, heads,
    MLP sizes of encoder and decoder; `image_size` an int or `[height, width]`; `layer_norm_eps`: MAE uses 1e-6), so
    a ViTMAE config loads unchanged. The other fields follow docs/method.md, in its order (defaults are the
    project's where the paper is silent):

    MAE (§2)
    mask_ratio: share of patches hidden from the encoder; `int(N * (1 - mask_ratio))` stay visible.
    norm_pix_loss: standardise each target patch by its own mean and variance before the MSE.
    drop_path_rate: stochastic depth of the last encoder block (linear from 0).
    classifier_pooling: `"mean"` of the patch tokens (then a LayerNorm in the classifier) or the `"cls"` token.

    When masks turn informed (§4, §8)
    mask_strategy: `"random"` (MAE) or `"self_guided"` (random until the informed-masking start, then informed).
    informed_masking_start / _start_step / _auto_start: the start as a fraction of the schedule, as a step
        (overrides the fraction), or at the first check where the decoder's attention share on mask tokens
        overtakes the share on visible tokens.
    informed_mask_source: `"cached"`: `forward` masks by the `mask_scores` it is given, whole-image rankings that a
        `MaskRankingCache` stores per image and crops with each view (the authors' design, §8; without them the model
        ranks the batch itself and warns once); `"step"`: ranked from the given views at every step.

    Step 1, the features
    mask_feature_layer: encoder blocks run on the full image to get the features the masking cuts (None: all).
    mask_feature_source: the block output (`"hidden"`), that output after the encoder's final LayerNorm
        (`"layernorm"`), or the attention keys of block `mask_feature_layer` (`"keys"`).
    feature_centring: `"position_mean"` subtracts, at each grid position, the mean feature of that position over
        the images (a given mean, or the batch's) before the graph, removing what position alone contributes.

    Step 2, the graph
    graph_edges: `"similarity"` (max(S, 0) + eps), `"binary_fixed"` (1 where S > graph_threshold, else graph_eps),
        `"binary_mean"` (1 where S exceeds the image's mean similarity), `"binary_quantile"` (1 where S exceeds the
        image's `graph_quantile` quantile of its off-diagonal similarities) or `"knn"` (1 between a patch and its
        `graph_knn` most similar patches, symmetrised).

    Step 3, the cut
    fiedler_solver / fiedler_lanczos_steps / fiedler_lanczos_tolerance / fiedler_power_steps: batched Lanczos
        iteration (at most `steps` Krylov vectors, exact from N - 1; outside a training step it stops early once every
        image's Fiedler vector is within about `tolerance` radians of the true one; None: always `steps`; sparse
        binary graphs such as `"binary_quantile"` need about 64), batched power iteration
        (2**steps; 16 matches `eigh` at 64 and 196 patches) or `torch.linalg.eigh`.
    partition_split: the NCut parts are split at the `"mean"` of the Fiedler vector y or at `"zero"` (y is
        orthogonal to the degrees, so zero is the degree-weighted mean).

    Step 4, the object part
    foreground_rule: the NCut part holding argmax |y| (`"max_abs"`, TokenCut), the `"smaller"` one, or the `"inner"`
        one (the smaller share of its patches on the border of the patch grid).

    Step 7, the hints
    hint_ratio / hint_sampling: `round(hint_ratio * K)` masked patches revealed again, drawn by object similarity
        or uniformly.
    hint_count_base / hint_min_count / hint_portion: the authors' variants: the count as `int(hint_ratio * N)`
        (`"patches"`) instead of `round(hint_ratio * K)` (`"masked"`), at least `hint_min_count` (2, as theirs) when
        the ratio is above 0; hints drawn uniformly from the masked patches in the top `hint_portion` of the ranking
        (None: by `hint_sampling` among all masked ones).
    hint_decay_power / hint_ratio_final / hint_portion_final: with a power p, the ratio (and portion) move from
        their values to the final ones as 1 - ((t - start) / (T - start))**p falls from 1 to 0 between the
        informed-masking start and the end of training (the authors' polynomial schedule); None: constant.

    The backbone
    out_features / out_indices, apply_layernorm, reshape_hidden_states: `SGMAEBackbone`'s stages (`"stem"`,
        `"stage1"`..`"stageL"`; the last when unset), final LayerNorm, and [B, D, H/p, W/p] maps.
    add_fpn: `SGMAEBackbone` turns its four stages into maps at strides p/4, p/2, p, 2p (BEiT / MAE's pyramid for a
        plain ViT under UperNet; the name and layout of transformers' `BeitConfig.add_fpn`).
    """

    model_type = "sgmae"
    # Fields renamed since: their old names still read, write and load (a config.json of an earlier release).
    attribute_map = {"feature_centering": "feature_centring"}

    # Architecture (ViTMAEConfig's)
    hidden_size: int = at_least_one(default=768)
    num_hidden_layers: int = at_least_one(default=12)
    num_attention_heads: int = at_least_one(default=12)
    intermediate_size: int = at_least_one(default=3072)
    hidden_act: str = activation_fn_key(default="gelu")
    hidden_dropout_prob: float | int = rate(default=0.0)
    attention_probs_dropout_prob: float | int = rate(default=0.0)
    initializer_range: float = fraction(default=0.02)
    layer_norm_eps: float = interval(min=0.0, exclude_min=True)(default=1e-12)
    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int = at_least_one(default=16)
    num_channels: int = at_least_one(default=3)
    qkv_bias: bool = True
    decoder_num_attention_heads: int = at_least_one(default=16)
    decoder_hidden_size: int = at_least_one(default=512)
    decoder_num_hidden_layers: int = at_least_one(default=8)
    decoder_intermediate_size: int = at_least_one(default=2048)
    # MAE
    mask_ratio: float = rate(default=0.75)
    norm_pix_loss: bool = False
    drop_path_rate: float | int = rate(default=0.0)
    classifier_pooling: Literal["mean", "cls"] = "mean"
    # When masks turn informed
    mask_strategy: Literal["random", "self_guided"] = "self_guided"
    informed_masking_start: float | int = fraction(default=0.25)
    informed_masking_start_step: int | None = None
    informed_masking_auto_start: bool = False
    informed_mask_source: Literal["cached", "step"] = "cached"
    # Step 1, the features
    mask_feature_layer: int | None = None
    mask_feature_source: Literal["hidden", "layernorm", "keys"] = "hidden"
    feature_centring: Literal["none", "position_mean"] = "position_mean"
    # Step 2, the graph
    graph_edges: Literal["similarity", "binary_fixed", "binary_mean", "binary_quantile", "knn"] = "similarity"
    graph_threshold: float | int = interval(min=-1.0, max=1.0)(default=0.2)
    graph_eps: float = interval(min=1e-12, max=1.0)(default=1e-5)
    graph_quantile: float | int = fraction(default=0.8)
    graph_knn: int = at_least_one(default=10)
    # Step 3, the cut
    fiedler_solver: Literal["lanczos", "power", "eigh"] = "lanczos"
    fiedler_lanczos_steps: int = at_least_one(default=32)
    fiedler_lanczos_tolerance: float | int | None = 1e-3
    fiedler_power_steps: int = at_least_one(default=16)
    partition_split: Literal["mean", "zero"] = "mean"
    # Step 4, the object part
    foreground_rule: Literal["max_abs", "smaller", "inner"] = "inner"
    # Step 7, the hints
    hint_ratio: float | int = interval(min=0.0, max=0.5)(default=0.06)
    hint_sampling: Literal["similarity", "uniform"] = "similarity"
    hint_count_base: Literal["masked", "patches"] = "masked"
    hint_min_count: int = interval(min=0)(default=2)
    hint_portion: float | int | None = None
    hint_decay_power: float | int | None = None
    hint_ratio_final: float | int = interval(min=0.0, max=0.5)(default=0.0)
    hint_portion_final: float | int = fraction(default=0.2)
    # The backbone
    apply_layernorm: bool = True
    reshape_hidden_states: bool = True
    add_fpn: bool = False
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs) -> None:
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        kwargs.pop("stage_names", None)  # derived from num_hidden_layers
        out_features, out_indices = kwargs.pop("out_features", None), kwargs.pop("out_indices", None)
        if out_features is not None or out_indices is not None:
            self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        super().__post_init__(**kwargs)

    def validate_architecture(self) -> None:
        """The rules between fields (run on construction, loading and saving, and by `validate()`)."""
        super().validate_architecture()
        for width_name, heads_name in WIDTHS_AND_HEADS:
            width, heads = getattr(self, width_name), getattr(self, heads_name)
            if width % heads:
                raise ValueError(f"SGMAEConfig.{width_name} ({width}) must be divisible by {heads_name} ({heads})")
            if width % 4:  # the 2-D sin-cos tables split the width in four
                raise ValueError(f"SGMAEConfig.{width_name} must be divisible by 4, got {width}")
        size = self.image_size  # the annotation checks the types: an int or a list of ints
        sides = [size] if isinstance(size, int) else list(size)
        if not isinstance(size, int) and len(sides) != 2:
            raise ValueError(f"SGMAEConfig.image_size must be an int or [height, width], got {size!r}")
        if min(sides) < self.patch_size or any(side % self.patch_size for side in sides):
            raise ValueError(
                f"SGMAEConfig.image_size {size!r} must be a positive multiple of patch_size ({self.patch_size})"
            )
        num_patches = self.grid_size[0] * self.grid_size[1]
        if not 0 < (num_masked := num_masked_patches(num_patches, self.mask_ratio)) < num_patches:
            raise ValueError(
                f"SGMAEConfig.mask_ratio {self.mask_ratio} masks {num_masked} of the {num_patches} patches of a {size}"
                f" image (patch {self.patch_size}); at least one must be masked and one visible"
            )
        if (layer := self.mask_feature_layer) is not None and not 1 <= layer <= self.num_hidden_layers:
            raise ValueError(
                f"SGMAEConfig.mask_feature_layer must be None or in [1, {self.num_hidden_layers}], got {layer}"
            )
        if (portion := self.hint_portion) is not None and not 0 < portion <= 1:
            raise ValueError(f"SGMAEConfig.hint_portion must be None or in (0, 1], got {portion}")
        if (tolerance := self.fiedler_lanczos_tolerance) is not None and not 0 < tolerance < 1:
            raise ValueError(f"SGMAEConfig.fiedler_lanczos_tolerance must be None or in (0, 1), got {tolerance}")
        if (power := self.hint_decay_power) is not None and not power > 0:
            raise ValueError(f"SGMAEConfig.hint_decay_power must be None or positive, got {power}")
        if (start_step := self.informed_masking_start_step) is not None and start_step < 0:
            raise ValueError(f"SGMAEConfig.informed_masking_start_step must be None or >= 0, got {start_step}")
        if self._out_features is not None:  # chosen stages must still exist after a change
            self.verify_out_features_out_indices()
        if self.add_fpn and (len(self.out_features) != 4 or not self.reshape_hidden_states):
            raise ValueError(
                f"SGMAEConfig.add_fpn needs four out_features (one per pyramid level, e.g. out_indices [4, 6, 8, 12] "
                f"for 12 blocks) and reshape_hidden_states=True, got {self.out_features}"
            )

    @property
    def image_height_width(self) -> tuple[int, int]:
        size = self.image_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def grid_size(self) -> tuple[int, int]:
        height, width = self.image_height_width
        return height // self.patch_size, width // self.patch_size

    @property
    def feature_layer(self) -> int:
        """Number of encoder blocks whose output is clustered by the self-guided masking."""
        return self.mask_feature_layer or self.num_hidden_layers

    @property
    def stage_names(self) -> list[str]:
        """The backbone's stages: the embeddings, then one per encoder block."""
        return ["stem"] + [f"stage{index}" for index in range(1, self.num_hidden_layers + 1)]

    # Unset, the backbone's output is the last stage of the current depth (a stored default would go stale).
    @property
    def out_features(self) -> list[str]:
        return self._out_features or [self.stage_names[-1]]

    @out_features.setter
    def out_features(self, out_features: list[str] | None) -> None:
        self.set_output_features_output_indices(out_features=out_features, out_indices=None)

    @property
    def out_indices(self) -> list[int]:
        return self._out_indices or [len(self.stage_names) - 1]

    @out_indices.setter
    def out_indices(self, out_indices: list[int] | tuple[int, ...] | None) -> None:
        self.set_output_features_output_indices(out_features=None, out_indices=out_indices and list(out_indices))


# Every save of a config writes this file beside config.json, so the folder loads with trust_remote_code.
SGMAEConfig.register_for_auto_class()


def num_masked_patches(num_patches: int, mask_ratio: float) -> int:
    """K = N - int(N * (1 - r)): MAE's rounding, shared by every strategy."""
    return num_patches - int(num_patches * (1 - mask_ratio))


def dense_backbone_config(backbone_config, image_size: int, owner: str) -> SGMAEConfig:
    """A dense head's `backbone_config` as an `SGMAEConfig` (a dict from config.json is read as one). Unset, ViT-B/16
    at `image_size` with the pyramid of BEiT / MAE's dense heads: blocks 4, 6, 8, 12, no final LayerNorm on them."""
    if backbone_config is None:
        return SGMAEConfig(
            image_size=image_size, out_indices=[4, 6, 8, 12], add_fpn=True, apply_layernorm=False, layer_norm_eps=1e-6
        )
    if isinstance(backbone_config, dict):
        return SGMAEConfig.from_dict(backbone_config)
    if not isinstance(backbone_config, SGMAEConfig):
        raise ValueError(f"{owner}.backbone_config must be an SGMAEConfig, got {type(backbone_config).__name__}")
    return backbone_config
