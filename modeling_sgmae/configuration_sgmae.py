"""SG-MAE configuration: ViTMAE's architecture fields plus the self-guided masking choices of docs/method.md."""

from __future__ import annotations

import inspect

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

try:  # its home since transformers 5.x; earlier releases kept it under utils
    from transformers.backbone_utils import BackboneConfigMixin
except ImportError:  # pragma: no cover - older transformers
    from transformers.utils.backbone_utils import BackboneConfigMixin

MASK_STRATEGIES = ("random", "self_guided")
GRAPH_EDGES = ("similarity", "binary_fixed", "binary_mean")
FOREGROUND_RULES = ("max_abs", "smaller")
HINT_SAMPLINGS = ("similarity", "uniform")
FIEDLER_SOLVERS = ("power", "eigh")
CLASSIFIER_POOLINGS = ("mean", "cls")

AUTO_MAP = {
    "AutoConfig": "configuration_sgmae.SGMAEConfig",
    "AutoModel": "modeling_sgmae.SGMAEModel",
    "AutoModelForPreTraining": "modeling_sgmae.SGMAEForPreTraining",
    "AutoModelForImageClassification": "modeling_sgmae.SGMAEForImageClassification",
    "AutoBackbone": "modeling_sgmae.SGMAEBackbone",
}


class SGMAEConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""Configuration of an SG-MAE model (a ViT-MAE whose masks become self-guided after a warm-up).

    Architecture fields have the names, meaning and defaults of `transformers.ViTMAEConfig`, so a ViTMAE config
    loads as an SGMAEConfig unchanged. The masking fields implement docs/method.md §3-4; their defaults are the
    project's decisions where the paper is silent.

    Args:
        hidden_size: Width of the encoder.
        num_hidden_layers: Number of encoder blocks.
        num_attention_heads: Attention heads per encoder block.
        intermediate_size: Hidden width of the encoder MLPs.
        hidden_act: MLP activation (`"gelu"` as in MAE).
        hidden_dropout_prob: Dropout after attention projections and MLPs.
        attention_probs_dropout_prob: Dropout on attention weights.
        initializer_range: Std of the normal init of [CLS], mask token and classifier head.
        layer_norm_eps: Epsilon of every LayerNorm (MAE uses 1e-6; ViTMAE's default is 1e-12).
        image_size: Input height and width in pixels (an int, or `[height, width]`).
        patch_size: Patch side in pixels.
        num_channels: Input channels.
        qkv_bias: Whether the query/key/value projections have a bias.
        decoder_num_attention_heads: Attention heads per decoder block.
        decoder_hidden_size: Width of the decoder.
        decoder_num_hidden_layers: Number of decoder blocks.
        decoder_intermediate_size: Hidden width of the decoder MLPs.
        mask_ratio: Share of patches hidden from the encoder; `int(N * (1 - mask_ratio))` patches stay visible.
        norm_pix_loss: Standardise each target patch by its own mean and variance before the MSE.
        drop_path_rate: Stochastic-depth rate of the last encoder block (linearly increasing from 0).
        classifier_pooling: Feature fed to the classifier and returned as `pooler_output`: `"mean"` of the patch
            tokens (MAE fine-tuning, followed by a LayerNorm in the classifier) or the `"cls"` token.
        mask_strategy: `"random"` (plain MAE) or `"self_guided"` (random until the informed-masking start, then
            informed masks built from the model's own features).
        informed_masking_start: Fraction of the training schedule after which informed masking starts.
        informed_masking_start_step: Absolute optimiser step at which informed masking starts; overrides the
            fraction when set.
        informed_masking_auto_start: Start informed masking at the first exploitation-rate check at which the
            decoder's attention share on mask tokens overtakes the share on visible tokens (docs/method.md §4),
            instead of at a fixed point of the schedule.
        mask_feature_layer: Number of encoder blocks run on the full image to get the features that are
            clustered; `None` means all of them (the last block).
        graph_edges: Affinity graph: `"similarity"` (W = max(S, 0) + eps), `"binary_fixed"` (1 where
            S > graph_threshold, else eps) or `"binary_mean"` (1 where S exceeds the image's mean similarity).
        graph_threshold: Threshold tau of the `"binary_fixed"` graph.
        graph_eps: Weight given to absent edges, which keeps the graph connected.
        foreground_rule: Which NCut part is the object: the one holding argmax |y| (`"max_abs"`, TokenCut's rule)
            or the `"smaller"` one.
        hint_ratio: Share of the masked patches revealed again as hints (`round(hint_ratio * K)` of them).
        hint_sampling: Hints drawn with probability increasing with object similarity (`"similarity"`) or
            `"uniform"`ly among the masked patches.
        fiedler_solver: `"power"` (batched power iteration by repeated squaring, fast on CPU and GPU) or
            `"eigh"` (`torch.linalg.eigh`, the reference).
        fiedler_power_steps: Squarings of the power solver (the operator is raised to the power 2**steps); 16
            matches `eigh`'s bi-partitions on near-complete feature graphs with N = 64 and 196 patches.
        out_features / out_indices: `SGMAEBackbone`'s outputs (transformers' Backbone API): stages `"stem"` (the
            embedded patches) and `"stage1"`..`"stageL"` (the output of each encoder block); the last by default.
        apply_layernorm: `SGMAEBackbone` applies the encoder's final LayerNorm to every feature map it returns.
        reshape_hidden_states: `SGMAEBackbone` returns [B, D, H/p, W/p] maps ([CLS] dropped) instead of [B, 1+N, D].
    """

    model_type = "sgmae"

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        image_size: int | list[int] = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        qkv_bias: bool = True,
        decoder_num_attention_heads: int = 16,
        decoder_hidden_size: int = 512,
        decoder_num_hidden_layers: int = 8,
        decoder_intermediate_size: int = 2048,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        drop_path_rate: float = 0.0,
        classifier_pooling: str = "mean",
        mask_strategy: str = "self_guided",
        informed_masking_start: float = 0.125,
        informed_masking_start_step: int | None = None,
        informed_masking_auto_start: bool = False,
        mask_feature_layer: int | None = None,
        graph_edges: str = "similarity",
        graph_threshold: float = 0.2,
        graph_eps: float = 1e-5,
        foreground_rule: str = "max_abs",
        hint_ratio: float = 0.06,
        hint_sampling: str = "similarity",
        fiedler_solver: str = "power",
        fiedler_power_steps: int = 16,
        apply_layernorm: bool = True,
        reshape_hidden_states: bool = True,
        **kwargs,
    ):
        fields = {name: value for name, value in locals().items() if name in FIELD_NAMES}
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        kwargs.pop("stage_names", None)  # derived from num_hidden_layers
        out_features, out_indices = kwargs.pop("out_features", None), kwargs.pop("out_indices", None)
        super().__init__(**kwargs)
        for name, value in fields.items():  # the last of them completes the config and validates it
            setattr(self, name, value)
        self._out_features = self._out_indices = None
        if out_features is not None or out_indices is not None:
            self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)

    @property
    def stage_names(self) -> list[str]:
        """The backbone's stages: the embeddings, then one per encoder block."""
        return ["stem"] + [f"stage{index}" for index in range(1, self.num_hidden_layers + 1)]

    # Unset, the backbone's output is the last stage of the current depth (a stored default would go stale when
    # num_hidden_layers changes).
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
        out_indices = list(out_indices) if out_indices is not None else None
        self.set_output_features_output_indices(out_features=None, out_indices=out_indices)

    def __setattr__(self, name: str, value) -> None:
        """Every change of an SG-MAE field, once all are set, re-validates the whole config (fields depend on each
        other: widths and heads, image and patch sizes, mask ratio and patch count); an invalid change is undone."""
        if name not in FIELD_NAMES or not all(field in self.__dict__ for field in FIELD_NAMES - {name}):
            super().__setattr__(name, value)
            return
        missing = object()
        previous = self.__dict__.get(name, missing)
        super().__setattr__(name, value)
        try:
            self.validate_fields()
        except ValueError:
            if previous is missing:
                del self.__dict__[name]
            else:
                super().__setattr__(name, previous)
            raise

    def update(self, config_dict: dict) -> None:
        """Change several fields at once: validated together, and all undone if the result is invalid."""
        previous = dict(self.__dict__)
        for name, value in config_dict.items():
            PreTrainedConfig.__setattr__(self, name, value)
        try:
            self.validate_fields()
        except ValueError:
            self.__dict__.clear()
            self.__dict__.update(previous)
            raise

    @property
    def image_height_width(self) -> tuple[int, int]:
        size = self.image_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def grid_size(self) -> tuple[int, int]:
        height, width = self.image_height_width
        return height // self.patch_size, width // self.patch_size

    def validate_fields(self) -> None:
        """Raise a ValueError naming the first field whose value is out of its allowed range."""

        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SGMAEConfig.{name} must be a positive integer, got {value!r}")

        def in_range(name: str, low: float, high: float, high_inclusive: bool = False) -> None:
            value = getattr(self, name)
            ok = (
                isinstance(value, (int, float))
                and low <= value
                and (value <= high if high_inclusive else value < high)
            )
            if not ok:
                bracket = "]" if high_inclusive else ")"
                raise ValueError(f"SGMAEConfig.{name} must be in [{low}, {high}{bracket}, got {value!r}")

        def one_of(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"SGMAEConfig.{name} must be one of {allowed}, got {value!r}")

        def boolean(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"SGMAEConfig.{name} must be True or False, got {value!r}")

        def optional_int(name: str, low: int, high: int | None = None) -> None:
            value = getattr(self, name)
            is_int = isinstance(value, int) and not isinstance(value, bool)
            ok = value is None or (is_int and low <= value and (high is None or value <= high))
            if not ok:
                bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
                raise ValueError(f"SGMAEConfig.{name} must be None or an integer {bounds}, got {value!r}")

        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "patch_size",
            "num_channels",
            "decoder_hidden_size",
            "decoder_num_hidden_layers",
            "decoder_num_attention_heads",
            "decoder_intermediate_size",
            "fiedler_power_steps",
        ):
            positive_int(name)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"SGMAEConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.decoder_hidden_size % self.decoder_num_attention_heads:
            raise ValueError(
                f"SGMAEConfig.decoder_hidden_size ({self.decoder_hidden_size}) must be divisible by "
                f"decoder_num_attention_heads ({self.decoder_num_attention_heads})"
            )
        for name in ("hidden_size", "decoder_hidden_size"):  # the 2-D sin-cos tables split the width in four
            if getattr(self, name) % 4:
                raise ValueError(f"SGMAEConfig.{name} must be divisible by 4, got {getattr(self, name)}")
        size = self.image_size
        sizes = [size] if isinstance(size, int) else list(size) if isinstance(size, (list, tuple)) else [None]
        if not all(isinstance(value, int) and not isinstance(value, bool) for value in sizes):
            raise ValueError(f"SGMAEConfig.image_size must be an int or [height, width], got {size!r}")
        if isinstance(size, (list, tuple)) and len(size) != 2:
            raise ValueError(f"SGMAEConfig.image_size must be an int or [height, width], got {size!r}")
        height, width = self.image_height_width
        if min(height, width) < self.patch_size or height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"SGMAEConfig.image_size {size!r} must be a positive multiple of patch_size ({self.patch_size})"
            )
        in_range("mask_ratio", 0.0, 1.0)
        num_patches = (height // self.patch_size) * (width // self.patch_size)
        num_masked = num_masked_patches(num_patches, self.mask_ratio)
        if not 0 < num_masked < num_patches:
            raise ValueError(
                f"SGMAEConfig.mask_ratio {self.mask_ratio} masks {num_masked} of the {num_patches} patches of a "
                f"{height}x{width} image (patch {self.patch_size}); at least one must be masked and one visible"
            )
        in_range("hidden_dropout_prob", 0.0, 1.0)
        in_range("attention_probs_dropout_prob", 0.0, 1.0)
        in_range("drop_path_rate", 0.0, 1.0)
        in_range("informed_masking_start", 0.0, 1.0, high_inclusive=True)
        in_range("hint_ratio", 0.0, 0.5, high_inclusive=True)
        in_range("graph_threshold", -1.0, 1.0, high_inclusive=True)
        in_range("graph_eps", 1e-12, 1.0, high_inclusive=True)
        in_range("initializer_range", 0.0, 1.0, high_inclusive=True)
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            raise ValueError(f"SGMAEConfig.layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            raise ValueError(f"SGMAEConfig.hidden_act must name a transformers activation, got {self.hidden_act!r}")
        for name in (
            "qkv_bias",
            "norm_pix_loss",
            "informed_masking_auto_start",
            "apply_layernorm",
            "reshape_hidden_states",
        ):
            boolean(name)
        one_of("mask_strategy", MASK_STRATEGIES)
        one_of("graph_edges", GRAPH_EDGES)
        one_of("foreground_rule", FOREGROUND_RULES)
        one_of("hint_sampling", HINT_SAMPLINGS)
        one_of("fiedler_solver", FIEDLER_SOLVERS)
        one_of("classifier_pooling", CLASSIFIER_POOLINGS)
        optional_int("informed_masking_start_step", 0)
        optional_int("mask_feature_layer", 1, self.num_hidden_layers)
        if self.__dict__.get("_out_features") is not None:  # chosen stages must still exist after a change
            self.verify_out_features_out_indices()

    @property
    def feature_layer(self) -> int:
        """Number of encoder blocks whose output is clustered by the self-guided masking."""
        return self.mask_feature_layer or self.num_hidden_layers


# Every save of a config writes this file beside config.json, so the folder loads with trust_remote_code.
SGMAEConfig.register_for_auto_class()


def num_masked_patches(num_patches: int, mask_ratio: float) -> int:
    """K = N - int(N * (1 - r)): MAE's rounding, shared by every strategy."""
    return num_patches - int(num_patches * (1 - mask_ratio))


FIELD_NAMES = frozenset(inspect.signature(SGMAEConfig.__init__).parameters) - {"self", "kwargs"}
