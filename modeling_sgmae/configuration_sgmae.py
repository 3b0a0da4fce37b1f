"""SG-MAE configuration: ViTMAE's architecture fields plus the self-guided masking choices of docs/method.md."""

from collections.abc import Callable
from dataclasses import fields
from typing import Any

from huggingface_hub.dataclasses import strict, validated_field
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneConfigMixin

AUTO_MAP = {
    "AutoConfig": "configuration_sgmae.SGMAEConfig",
    "AutoModel": "modeling_sgmae.SGMAEModel",
    "AutoModelForPreTraining": "modeling_sgmae.SGMAEForPreTraining",
    "AutoModelForImageClassification": "modeling_sgmae.SGMAEForImageClassification",
    "AutoBackbone": "modeling_sgmae.SGMAEBackbone",
}
CLASSIFIER_POOLINGS = ("mean", "cls")
WIDTHS_AND_HEADS = (("hidden_size", "num_attention_heads"), ("decoder_hidden_size", "decoder_num_attention_heads"))


Rule = tuple[Callable[[Any], bool], str]  # a check of one value (the annotation checks its type), its text
POSITIVE: Rule = (lambda value: value >= 1, "a positive integer")


def checked(name: str, default: Any, rule: Rule) -> Any:
    """A field whose every assignment is checked (@strict), with a ValueError naming SGMAEConfig.<name>."""
    allowed, wanted = rule

    def validator(value: Any) -> None:
        if not allowed(value):  # NaN fails every comparison
            raise ValueError(f"SGMAEConfig.{name} must be {wanted}, got {value!r}")

    return validated_field(validator, default=default)


def interval(low: float, high: float, closed: bool = False) -> Rule:
    return (lambda v: low <= v <= high if closed else low <= v < high), f"in [{low}, {high}{']' if closed else ')'}"


def among(*allowed: str) -> Rule:
    return (lambda value: value in allowed), f"one of {allowed}"


def none_or_at_least(low: int) -> Rule:
    return (lambda value: value is None or value >= low), f"None or an integer >= {low}"


@strict
class SGMAEConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""Configuration of an SG-MAE model (a ViT-MAE whose masks become self-guided after a warm-up).

    Architecture fields have the names, meaning and defaults of `transformers.ViTMAEConfig` (widths, depths, heads,
    MLP sizes of encoder and decoder; `image_size` an int or `[height, width]`; `layer_norm_eps`: MAE uses 1e-6), so
    a ViTMAE config loads unchanged. Masking fields (docs/method.md §3-4; defaults are the project's where the paper
    is silent):

    mask_ratio: share of patches hidden from the encoder; `int(N * (1 - mask_ratio))` stay visible.
    norm_pix_loss: standardise each target patch by its own mean and variance before the MSE.
    drop_path_rate: stochastic depth of the last encoder block (linear from 0).
    classifier_pooling: `"mean"` of the patch tokens (then a LayerNorm in the classifier) or the `"cls"` token.
    mask_strategy: `"random"` (MAE) or `"self_guided"` (random until the informed-masking start, then informed).
    informed_masking_start / _start_step / _auto_start: the start as a fraction of the schedule, as a step
        (overrides the fraction), or at the first check where the decoder's attention share on mask tokens
        overtakes the share on visible tokens (docs/method.md §4).
    mask_feature_layer: encoder blocks run on the full image to get the clustered features (None: all).
    graph_edges: `"similarity"` (max(S, 0) + eps), `"binary_fixed"` (1 where S > graph_threshold, else graph_eps)
        or `"binary_mean"` (1 where S exceeds the image's mean similarity).
    foreground_rule: the NCut part holding argmax |y| (`"max_abs"`, TokenCut) or the `"smaller"` one.
    hint_ratio / hint_sampling: `round(hint_ratio * K)` masked patches revealed again, drawn by object similarity
        or uniformly.
    fiedler_solver / fiedler_power_steps: batched power iteration (2**steps; 16 matches `eigh` at 64 and 196
        patches) or `torch.linalg.eigh`.
    out_features / out_indices, apply_layernorm, reshape_hidden_states: `SGMAEBackbone`'s stages (`"stem"`,
        `"stage1"`..`"stageL"`; the last when unset), final LayerNorm, and [B, D, H/p, W/p] maps.
    """

    model_type = "sgmae"

    hidden_size: int = checked("hidden_size", 768, POSITIVE)
    num_hidden_layers: int = checked("num_hidden_layers", 12, POSITIVE)
    num_attention_heads: int = checked("num_attention_heads", 12, POSITIVE)
    intermediate_size: int = checked("intermediate_size", 3072, POSITIVE)
    hidden_act: str = checked("hidden_act", "gelu", ((lambda v: v in ACT2FN), "an ACT2FN name"))
    hidden_dropout_prob: float | int = checked("hidden_dropout_prob", 0.0, interval(0.0, 1.0))
    attention_probs_dropout_prob: float | int = checked("attention_probs_dropout_prob", 0.0, interval(0.0, 1.0))
    initializer_range: float = checked("initializer_range", 0.02, interval(0.0, 1.0, closed=True))
    layer_norm_eps: float = checked("layer_norm_eps", 1e-12, ((lambda v: v > 0), "positive"))
    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int = checked("patch_size", 16, POSITIVE)
    num_channels: int = checked("num_channels", 3, POSITIVE)
    qkv_bias: bool = True
    decoder_num_attention_heads: int = checked("decoder_num_attention_heads", 16, POSITIVE)
    decoder_hidden_size: int = checked("decoder_hidden_size", 512, POSITIVE)
    decoder_num_hidden_layers: int = checked("decoder_num_hidden_layers", 8, POSITIVE)
    decoder_intermediate_size: int = checked("decoder_intermediate_size", 2048, POSITIVE)
    mask_ratio: float = checked("mask_ratio", 0.75, interval(0.0, 1.0))
    norm_pix_loss: bool = False
    drop_path_rate: float | int = checked("drop_path_rate", 0.0, interval(0.0, 1.0))
    classifier_pooling: str = checked("classifier_pooling", "mean", among(*CLASSIFIER_POOLINGS))
    mask_strategy: str = checked("mask_strategy", "self_guided", among("random", "self_guided"))
    informed_masking_start: float | int = checked("informed_masking_start", 0.125, interval(0.0, 1.0, closed=True))
    informed_masking_start_step: int | None = checked("informed_masking_start_step", None, none_or_at_least(0))
    informed_masking_auto_start: bool = False
    mask_feature_layer: int | None = checked("mask_feature_layer", None, none_or_at_least(1))
    graph_edges: str = checked("graph_edges", "similarity", among("similarity", "binary_fixed", "binary_mean"))
    graph_threshold: float | int = checked("graph_threshold", 0.2, interval(-1.0, 1.0, closed=True))
    graph_eps: float = checked("graph_eps", 1e-5, interval(1e-12, 1.0, closed=True))
    foreground_rule: str = checked("foreground_rule", "max_abs", among("max_abs", "smaller"))
    hint_ratio: float | int = checked("hint_ratio", 0.06, interval(0.0, 0.5, closed=True))
    hint_sampling: str = checked("hint_sampling", "similarity", among("similarity", "uniform"))
    fiedler_solver: str = checked("fiedler_solver", "power", among("power", "eigh"))
    fiedler_power_steps: int = checked("fiedler_power_steps", 16, POSITIVE)
    apply_layernorm: bool = True
    reshape_hidden_states: bool = True
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
        size = self.image_size
        sides = [size] if isinstance(size, int) else list(size)
        if len(sides) != (1 if isinstance(size, int) else 2) or not all(type(side) is int for side in sides):
            raise ValueError(f"SGMAEConfig.image_size must be an int or [height, width], got {size!r}")
        if min(sides) < self.patch_size or any(side % self.patch_size for side in sides):
            raise ValueError(
                f"SGMAEConfig.image_size {size!r} must be a positive multiple of patch_size ({self.patch_size})"
            )
        num_patches = self.grid_size[0] * self.grid_size[1]
        if not 0 < num_masked_patches(num_patches, self.mask_ratio) < num_patches:
            raise ValueError(
                f"SGMAEConfig.mask_ratio {self.mask_ratio} masks {num_masked_patches(num_patches, self.mask_ratio)} "
                f"of the {num_patches} patches of a {size} image (patch {self.patch_size}); at least one must be "
                "masked and one visible"
            )
        if (self.mask_feature_layer or 0) > self.num_hidden_layers:
            raise ValueError(
                f"SGMAEConfig.mask_feature_layer must be None or an integer [1, {self.num_hidden_layers}], "
                f"got {self.mask_feature_layer}"
            )
        if self._out_features is not None:  # chosen stages must still exist after a change
            self.verify_out_features_out_indices()

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
_INHERITED = {field.name for field in fields(PreTrainedConfig)}
FIELD_NAMES = frozenset(f.name for f in fields(SGMAEConfig) if f.name not in _INHERITED and not f.name.startswith("_"))


def num_masked_patches(num_patches: int, mask_ratio: float) -> int:
    """K = N - int(N * (1 - r)): MAE's rounding, shared by every strategy."""
    return num_patches - int(num_patches * (1 - mask_ratio))
