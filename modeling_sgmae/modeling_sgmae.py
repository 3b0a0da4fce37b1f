"""SG-MAE models: a ViT-MAE encoder/decoder whose masks become self-guided after a warm-up (docs/method.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .configuration_sgmae import AUTO_MAP, SGMAEConfig, num_masked_patches
from .hub_access import hub_advice, hub_unreachable
from .mask_cache import MaskRankingCache
from .masking_sgmae import (
    MaskingResult,
    MaskType,
    SelfGuidedMasking,
    centre_by_position,
    hint_decay,
    object_part_of_scores,
)
from .vit_mae_conversion import LEGACY_SCHEDULE_KEYS, sgmae_config_for

logger = logging.get_logger(__name__)

NORM_PIX_EPS = 1e-6  # added to each target patch's variance with `norm_pix_loss` (MAE's value)


def patch_mean_std(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each patch's pixels, [B, N, 1] each: the `norm_pix_loss` normalisation."""
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + NORM_PIX_EPS) ** 0.5


def probe_noise(batch_size: int, num_patches: int, seed: int = 0) -> torch.Tensor:
    """Fixed random-mask noise [B, N] for a probe batch, drawn on the CPU from its own generator: the same on every
    device and process, and nothing is drawn from the global RNG."""
    return torch.rand(batch_size, num_patches, generator=torch.Generator().manual_seed(seed))


def sincos_position_table(dim: int, grid_height: int, grid_width: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table [1, 1 + H*W, dim]; row 0 ([CLS]) is zero, the first half encodes the column."""
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid_height, dtype=torch.float64), torch.arange(grid_width, dtype=torch.float64), indexing="ij"
    )

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float().unsqueeze(0)


def resize_position_table(table: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic 2-D resize of a [1, 1 + H*W, D] table to a new patch grid; the [CLS] row is kept."""
    if old_grid == new_grid:
        return table
    cls_row, grid = table[:, :1], table[:, 1:]
    grid = grid.reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.to(table.dtype).permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1)
    return torch.cat([cls_row, grid], dim=1)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


class SGMAEPatchEmbeddings(nn.Module):
    """Conv2d patchifier (kernel = stride = patch size): [B, C, H, W] -> [B, N, D]."""

    def __init__(self, config: SGMAEConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.image_size = config.image_height_width
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be [batch, channels, height, width], got {tuple(pixel_values.shape)}")
        _, channels, height, width = pixel_values.shape
        if channels != self.num_channels:
            raise ValueError(
                f"pixel_values have {channels} channels but the model was configured for {self.num_channels}"
            )
        if interpolate_pos_encoding:
            if height % self.patch_size or width % self.patch_size:
                raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}")
        elif (height, width) != self.image_size:
            raise ValueError(
                f"image size {height}x{width} does not match the model ({self.image_size[0]}x{self.image_size[1]}); "
                "resize the images or pass interpolate_pos_encoding=True"
            )
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class SGMAEEmbeddings(nn.Module):
    """Patch embeddings plus fixed 2-D sin-cos positions, and the learnable [CLS] token."""

    def __init__(self, config: SGMAEConfig):
        super().__init__()
        self.config = config
        self.patch_embeddings = SGMAEPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        num_patches = config.grid_size[0] * config.grid_size[1]
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, num_patches + 1, config.hidden_size), requires_grad=False
        )

    def forward(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Returns patch tokens with positions [B, N, D], the [CLS] token with its position [1, 1, D], the grid."""
        patches = self.patch_embeddings(pixel_values, interpolate_pos_encoding)
        grid = (pixel_values.shape[2] // self.config.patch_size, pixel_values.shape[3] // self.config.patch_size)
        positions = resize_position_table(self.position_embeddings, self.config.grid_size, grid)
        cls_token = self.cls_token + positions[:, :1]
        return patches + positions[:, 1:].to(patches.dtype), cls_token, grid


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax attention over [B, heads, L, head_dim]: output [B, L, heads, head_dim], weights."""
    scores = query @ key.transpose(-2, -1) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    output = nn.functional.dropout(weights, dropout, module.training) @ value
    return output.transpose(1, 2), weights


class SGMAEAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    The kernel is transformers' attention interface for `config._attn_implementation` ("sdpa" by default, or
    "eager"); attention weights, when asked for, come from the eager path.
    """

    def __init__(self, config: SGMAEConfig, hidden_size: int, num_heads: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # SDPA through the interface would otherwise apply a causal mask
        self.attention_dropout = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch_size, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)
        dropout = self.attention_dropout if self.training else 0.0
        context, weights = attention(self, query, key, value, None, dropout=dropout, scaling=self.scaling)
        context = context.reshape(batch_size, length, width)
        return self.dropout(self.o_proj(context)), weights if output_attentions else None


class SGMAEMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.activation = ACT2FN[activation]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.activation(self.fc1(hidden_states))))


class SGMAELayer(GradientCheckpointingLayer):
    """Pre-LN transformer block (ViTMAE's layer, with stochastic depth); checkpointed when the model enables it."""

    def __init__(
        self,
        config: SGMAEConfig,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.attention = SGMAEAttention(config, hidden_size, num_heads)
        self.layernorm_after = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = SGMAEMLP(hidden_size, intermediate_size, config.hidden_act, config.hidden_dropout_prob)
        self.drop_path_rate = drop_path_rate

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attention(self.layernorm_before(hidden_states), output_attentions)
        hidden_states = hidden_states + drop_path(attended, self.drop_path_rate, self.training)
        hidden_states = hidden_states + drop_path(
            self.mlp(self.layernorm_after(hidden_states)), self.drop_path_rate, self.training
        )
        return hidden_states, weights


def run_layers(
    layers: nn.ModuleList,
    hidden_states: torch.Tensor,
    output_attentions: bool = False,
    output_hidden_states: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
    """Run a stack of blocks and collect what was asked for."""
    all_hidden = (hidden_states,) if output_hidden_states else None
    all_attentions = () if output_attentions else None
    for layer in layers:
        hidden_states, weights = layer(hidden_states, output_attentions)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        if output_attentions:
            all_attentions += (weights,)
    return hidden_states, all_hidden, all_attentions


@torch.no_grad()
def exploitation_rates(decoder_attentions: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """Exploitation rates per decoder layer: [L, 2] = (visible share, mask-token share) (docs/method.md §4).

    The attention that queries at masked positions give to visible keys ([CLS] included) and to mask-token keys,
    averaged over the masked queries, heads and images; the signal of the auto start
    (`SGMAEForPreTraining.record_exploitation_rates` also updates the schedule with it).
    decoder_attentions: per layer [B, heads, 1 + N, 1 + N]; mask: [B, N], True (or 1) = masked.
    """
    mask = mask.bool()
    query_is_mask = mask[:, None, :].expand(-1, decoder_attentions[0].shape[1], -1)  # [B, heads, N]
    rates = []
    for weights in decoder_attentions:
        queries = weights[:, :, 1:].float()  # patch queries over all keys: [B, heads, N, 1 + N]
        to_mask = (queries[..., 1:] * mask[:, None, None, :]).sum(dim=-1)
        to_visible = queries.sum(dim=-1) - to_mask
        rates.append(torch.stack([to_visible[query_is_mask].mean(), to_mask[query_is_mask].mean()]))
    return torch.stack(rates)


@dataclass
class BatchMask:
    """The masks `SGMAEForPreTraining.build_mask` chose for a batch, and what the masking saw."""

    ids_shuffle: torch.Tensor  # [B, N] long: visible patches first (for given noise, ViTMAE's ascending-noise order)
    mask_type: torch.Tensor  # [B] long, MaskType values
    object_part_size: torch.Tensor  # [B] long, patches in the object part; -1 where no informed mask was built
    edge_density: torch.Tensor  # [B] float, share of real edges in the affinity graph; -1 where none was built

    @classmethod
    def of(cls, ids_shuffle: torch.Tensor, mask_type: MaskType) -> BatchMask:
        """A random or given mask: no object part, no graph."""
        batch_size, device = ids_shuffle.shape[0], ids_shuffle.device
        types = torch.full((batch_size,), int(mask_type), device=device)
        return cls(ids_shuffle, types, torch.full_like(types, -1), torch.full((batch_size,), -1.0, device=device))


@dataclass
class SGMAEForPreTrainingOutput(ModelOutput):
    """Output of `SGMAEForPreTraining`.

    Args:
        loss: Mean squared error over the masked patches (normalised pixels with `norm_pix_loss`).
        logits: Predicted pixels per patch, [B, N, patch_size**2 * num_channels].
        mask: [B, N] float, 1 for masked patches, 0 for visible ones (ViTMAE's convention).
        ids_restore: [B, N] order that restores the patch order after the encoder's visible-first shuffle.
        mask_type: [B] `MaskType` of each sample's mask (random, informed, fallback to random, given).
        object_part_size: [B] patches in the NCut object part, -1 where no informed mask was built.
        edge_density: [B] share of real edges in the affinity graph, -1 where none was built.
        hidden_states: Encoder hidden states (embeddings, then each block), over the visible tokens.
        attentions: Encoder attention weights per block.
        decoder_attentions: Decoder attention weights per block, over all tokens.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    mask: torch.FloatTensor | None = None
    ids_restore: torch.LongTensor | None = None
    mask_type: torch.LongTensor | None = None
    object_part_size: torch.LongTensor | None = None
    edge_density: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    decoder_attentions: tuple[torch.FloatTensor, ...] | None = None


class SGMAEPreTrainedModel(PreTrainedModel):
    config_class = SGMAEConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # Losses are means over the batch: Trainer must divide them by the accumulation steps (forward's **kwargs would
    # otherwise make it pass `num_items_in_batch` and expect a sum).
    accepts_loss_kwargs = False
    _no_split_modules = ["SGMAELayer"]
    # A pre-training checkpoint loaded as a backbone or classifier: its decoder and schedule state are dropped.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^schedule\.", rf"^({'|'.join(LEGACY_SCHEDULE_KEYS)})$"]

    def __init__(self, config: SGMAEConfig, *inputs, **kwargs):
        config.validate()  # each field was checked when set; the rules between fields run before any weight exists
        super().__init__(config, *inputs, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class: str | type = "AutoModel") -> None:
        """Make `save_pretrained` copy this code next to the weights (Hub remote code), under its own auto class.

        `config.auto_map` already maps every auto class, so registering any SG-MAE model is enough; the class is
        always registered under its own auto class, because transformers writes `auto_map[auto_class] = this class`
        and e.g. the default "AutoModel" on `SGMAEForPreTraining` would send `AutoModel` to the pre-training model.
        """
        requested = auto_class if isinstance(auto_class, str) else auto_class.__name__
        own = {reference.split(".")[-1]: name for name, reference in AUTO_MAP.items()}.get(cls.__name__, requested)
        if requested != own:
            logger.info("registering %s for %s (its own auto class) instead of %s", cls.__name__, own, requested)
        super().register_for_auto_class(own)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """MAE's init: xavier-uniform linears, sin-cos position tables, small-normal [CLS] and mask token."""
        config = self.config
        if isinstance(module, nn.Conv2d):  # the patch projection: xavier-uniform as a [D, C*p*p] linear (MAE)
            fan_in, fan_out = module.weight[0].numel(), module.weight.shape[0]
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            init.uniform_(module.weight, -bound, bound)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if module is getattr(self, "classifier", None):
                init.trunc_normal_(module.weight, std=2e-5)  # MAE fine-tuning head
            else:
                init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.ConvTranspose2d, nn.BatchNorm2d)):  # the backbone's pyramid (add_fpn)
            super()._init_weights(module)  # transformers' (as BEiT's): normal(initializer_range); BN 1, 0, stats
        elif isinstance(module, SGMAEEmbeddings):
            init.normal_(module.cls_token, std=config.initializer_range)
            init.copy_(module.position_embeddings, sincos_position_table(config.hidden_size, *config.grid_size))
        elif isinstance(module, SGMAEDecoder):
            init.normal_(module.mask_token, std=config.initializer_range)
            table = sincos_position_table(config.decoder_hidden_size, *config.grid_size)
            init.copy_(module.decoder_pos_embed, table)
        elif isinstance(module, InformedMaskingSchedule):
            init.zeros_(module.training_step)
            init.zeros_(module.total_training_steps)
            init.constant_(module.started_at, -1)
            init.zeros_(module.last_check)
            module.host.clear()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load an SG-MAE checkpoint, or a transformers ViTMAE one (`facebook/vit-mae-*`), whose config becomes an
        SGMAEConfig and whose weights the loader converts as vit_mae_conversion.py declares."""
        unreachable = hub_unreachable(str(pretrained_model_name_or_path))
        if unreachable:  # read the local cache at once rather than retry the Hub for half a minute
            kwargs["local_files_only"] = True
        try:
            config, kwargs = sgmae_config_for(pretrained_model_name_or_path, kwargs.pop("config", None), kwargs)
            if config is not None:
                kwargs["config"] = config
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except OSError:
            if not unreachable:
                raise
            name = pretrained_model_name_or_path
            raise OSError(
                f"{name!r} is not a local folder and could not be fetched from the Hub ({unreachable}); "
                f"{hub_advice(name, unreachable)}"
            ) from None  # transformers' own error repeats the cause at length
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) with output_loading_info
        model.freeze_position_tables()  # loading recreates parameters as trainable
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Weights in SG-MAE's own layout (fused qkv): the declared ViTMAE conversion is for reading checkpoints,
        not a format to write back (transformers reverts declared conversions on save unless told otherwise)."""
        kwargs.setdefault("save_original_format", False)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def compile_blocks(self, **compile_kwargs) -> None:
        """`torch.compile` every transformer block in place (encoder and decoder). Shapes stay static, because every
        mask hides exactly K patches: a block sees the visible tokens, or all of them in the masking's feature pass."""
        for module in self.modules():
            if isinstance(module, SGMAELayer):
                module.compile(**({"dynamic": False} | compile_kwargs))

    def freeze_position_tables(self) -> None:
        """Keep the fixed sin-cos tables out of training (MAE freezes them)."""
        for name, parameter in self.named_parameters():
            if name.endswith(("position_embeddings", "decoder_pos_embed")):
                parameter.requires_grad_(False)


class SGMAEModel(SGMAEPreTrainedModel):
    """The SG-MAE encoder as a backbone: the full image, patch order kept, never masked or shuffled."""

    def __init__(self, config: SGMAEConfig):
        super().__init__(config)
        self.embeddings = SGMAEEmbeddings(config)
        # On the CPU even when the model is built on the meta device, which holds no values to read.
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers, device="cpu").tolist()
        self.layers = nn.ModuleList(
            SGMAELayer(config, config.hidden_size, config.num_attention_heads, config.intermediate_size, rate)
            for rate in rates
        )
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    def pool(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """`classifier_pooling`: mean of the patch tokens, or the [CLS] token."""
        if self.config.classifier_pooling == "mean":
            return last_hidden_state[:, 1:].mean(dim=1)
        return last_hidden_state[:, 0]

    def encode(
        self,
        patch_tokens: torch.Tensor,
        cls_token: torch.Tensor,
        num_layers: int | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """Prepend [CLS] to embedded patch tokens [B, L, D] and run the first `num_layers` blocks (all if None)."""
        hidden_states = torch.cat([cls_token.expand(patch_tokens.shape[0], -1, -1), patch_tokens], dim=1)
        layers = self.layers if num_layers is None else self.layers[:num_layers]
        return run_layers(layers, hidden_states, output_attentions, output_hidden_states)

    def patch_features(
        self,
        patch_tokens: torch.Tensor,
        cls_token: torch.Tensor,
        num_layers: int | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The full image's patch features [B, N, D] after `num_layers` blocks (all if None), before the final
        LayerNorm: what the self-guided masking clusters; and those blocks' attention maps if asked for."""
        hidden_states, _, attentions = self.encode(
            patch_tokens, cls_token, num_layers, output_attentions=output_attentions
        )
        return hidden_states[:, 1:], attentions

    def masking_features(
        self,
        patch_tokens: torch.Tensor,
        cls_token: torch.Tensor,
        position_mean: torch.Tensor | None = None,
        centre: bool | None = None,
    ) -> torch.Tensor:
        """The features [B, N, D] the self-guided masking cuts (docs/method.md §3, step 1), by the config's
        `mask_feature_layer`, `mask_feature_source` and, unless `centre` says otherwise, `feature_centring`.

        `"hidden"`: block `mask_feature_layer`'s output (`patch_features`); `"layernorm"`: the same after the final
        LayerNorm; `"keys"`: that block's attention keys (its LayerNorm and qkv projection applied to the previous
        block's output; heads concatenated). With `feature_centring="position_mean"`, each grid position's mean
        feature over images is subtracted: `position_mean` [N, D] when given (e.g. over a refresh pass's images),
        else the batch's (`centre_by_position`). `centre=False` returns the uncentred features (to compute a mean).
        """
        config = self.config
        layer = config.feature_layer
        if config.mask_feature_source == "keys":
            hidden_states, _, _ = self.encode(patch_tokens, cls_token, layer - 1)
            block = self.layers[layer - 1]
            qkv = block.attention.qkv(block.layernorm_before(hidden_states))
            features = qkv[:, 1:, config.hidden_size : 2 * config.hidden_size]
        else:
            features = self.patch_features(patch_tokens, cls_token, layer)[0]
            if config.mask_feature_source == "layernorm":
                features = self.layernorm(features)
        if centre is None:
            centre = config.feature_centring == "position_mean"
        return centre_by_position(features, position_mean) if centre else features

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        patch_tokens, cls_token, _ = self.embeddings(pixel_values, interpolate_pos_encoding)
        hidden_states, all_hidden, attentions = self.encode(
            patch_tokens, cls_token, output_attentions=output_attentions, output_hidden_states=output_hidden_states
        )
        last_hidden_state = self.layernorm(hidden_states)
        output = BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=self.pool(last_hidden_state),
            hidden_states=all_hidden,
            attentions=attentions,
        )
        return output if return_dict else output.to_tuple()


class SGMAEDecoder(nn.Module):
    """MAE's light decoder: embed, fill masked slots with the mask token, add positions, blocks, predict pixels."""

    def __init__(self, config: SGMAEConfig):
        super().__init__()
        self.config = config
        num_patches = config.grid_size[0] * config.grid_size[1]
        self.decoder_embed = nn.Linear(config.hidden_size, config.decoder_hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.decoder_hidden_size))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, config.decoder_hidden_size), requires_grad=False
        )
        self.decoder_layers = nn.ModuleList(
            SGMAELayer(
                config,
                config.decoder_hidden_size,
                config.decoder_num_attention_heads,
                config.decoder_intermediate_size,
            )
            for _ in range(config.decoder_num_hidden_layers)
        )
        self.decoder_norm = nn.LayerNorm(config.decoder_hidden_size, eps=config.layer_norm_eps)
        self.decoder_pred = nn.Linear(config.decoder_hidden_size, config.patch_size**2 * config.num_channels)

    def forward(
        self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int], output_attentions: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """latent: [B, 1 + visible, D] (visible first order); returns pixels [B, N, p*p*C] in patch order."""
        tokens = self.decoder_embed(latent)
        batch_size, num_patches = ids_restore.shape
        mask_tokens = self.mask_token.to(tokens.dtype).expand(batch_size, num_patches + 1 - tokens.shape[1], -1)
        patches = torch.cat([tokens[:, 1:], mask_tokens], dim=1)
        patches = patches.gather(1, ids_restore[:, :, None].expand(-1, -1, tokens.shape[2]))  # unshuffle
        positions = resize_position_table(self.decoder_pos_embed, self.config.grid_size, grid)
        hidden_states = torch.cat([tokens[:, :1], patches], dim=1) + positions.to(tokens.dtype)
        hidden_states, _, attentions = run_layers(self.decoder_layers, hidden_states, output_attentions)
        return self.decoder_pred(self.decoder_norm(hidden_states))[:, 1:], attentions


class InformedMaskingSchedule(nn.Module):
    """When masks turn informed (docs/method.md §4): the optimiser step and schedule length, the start (from the
    config, or found by the automatic rule from exploitation-rate checks) and the last check.

    Buffers, so the schedule is saved and restored with the weights; read through host copies, so deciding a batch's
    masks never waits for the device (each buffer is read at most once after a load).
    """

    def __init__(self, config: SGMAEConfig):
        super().__init__()
        self.config = config
        self.register_buffer("training_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("total_training_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("started_at", torch.full((), -1, dtype=torch.long))  # the automatic start; -1: not yet
        # The last check, decoder mean: [visible share, mask-token share, mask share was ever behind].
        self.register_buffer("last_check", torch.zeros(3))
        self.host: dict[str, int] = {}
        self.register_load_state_dict_post_hook(lambda module, keys: module.host.clear())

    def read(self, name: str) -> int:
        if name not in self.host:
            self.host[name] = int(getattr(self, name))
        return self.host[name]

    def set_progress(self, step: int, total_steps: int) -> None:
        if step < 0 or total_steps < 0:
            raise ValueError(f"step and total_steps must be non-negative, got {step} and {total_steps}")
        self.training_step.fill_(step)
        self.total_training_steps.fill_(total_steps)
        self.host.update(training_step=step, total_training_steps=total_steps)

    @property
    def start_step(self) -> int | None:
        """The step from which masks are informed; None while unknown (or not yet found by the automatic rule)."""
        config = self.config
        if config.mask_strategy != "self_guided":
            return None
        if config.informed_masking_auto_start:
            started = self.read("started_at")
            return started if started >= 0 else None
        if config.informed_masking_start_step is not None:
            return config.informed_masking_start_step
        total = self.read("total_training_steps")
        if total == 0:
            return 0 if config.informed_masking_start == 0 else None
        return math.ceil(config.informed_masking_start * total)

    @property
    def active(self) -> bool:
        start = self.start_step
        return start is not None and self.read("training_step") >= start

    def record_check(self, visible: float, masked: float) -> None:
        """An exploitation-rate check; with the automatic start, informed masking starts at the current step the first
        time the mask-token share overtakes the visible share after having been behind it."""
        behind_before = bool(self.last_check[2])
        waiting = self.config.informed_masking_auto_start and self.read("started_at") < 0
        if waiting and behind_before and masked > visible:
            self.started_at.fill_(self.read("training_step"))
            self.host["started_at"] = self.read("training_step")
        self.last_check.copy_(torch.tensor([visible, masked, float(behind_before or masked < visible)]))


def rename_legacy_schedule_keys(state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints written before the schedule had an owner keep its buffers at the top level (a load pre-hook, for
    `load_state_dict` and Accelerate's resume; `from_pretrained` renames them through the declared conversion)."""
    for old, new in LEGACY_SCHEDULE_KEYS.items():
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


class SGMAEForPreTraining(SGMAEPreTrainedModel):
    """MAE pre-training with self-guided informed masking once the schedule reaches its start (docs/method.md §3-4).

    The schedule position is model state (persistent buffers): call `set_training_progress(step, total_steps)`
    each optimiser step and the model decides which masks to use; it is saved and restored with the weights.
    """

    def __init__(self, config: SGMAEConfig):
        super().__init__(config)
        self.vit = SGMAEModel(config)
        self.decoder = SGMAEDecoder(config)
        self.masking = SelfGuidedMasking(config)
        self.schedule = InformedMaskingSchedule(config)
        self._register_load_state_dict_pre_hook(rename_legacy_schedule_keys)
        self.post_init()

    # ----- schedule (owned by self.schedule) --------------------------------------------------------------
    def set_training_progress(self, step: int, total_steps: int) -> None:
        """Tell the model where training stands (optimiser step and schedule length); it decides the masking."""
        self.schedule.set_progress(step, total_steps)

    @property
    def informed_masking_start_step(self) -> int | None:
        return self.schedule.start_step

    @property
    def informed_masking_active(self) -> bool:
        return self.schedule.active

    def schedule_step(
        self, step: int, total_steps: int, probe_pixel_values: torch.Tensor | None = None, check_every: int = 0
    ) -> dict[str, float]:
        """After an optimiser step: the schedule's new position and, every `check_every` steps with a probe batch,
        the exploitation-rate check that the automatic start waits for. Returns what to log: the check's mean shares,
        and `informed_start` (the step) when this check started informed masking. The one call that the training
        script and `SGMAETrainerCallback` make."""
        self.set_training_progress(step, total_steps)
        due = probe_pixel_values is not None and check_every and step % check_every == 0
        if not due or self.config.mask_strategy != "self_guided":
            return {}
        waiting = self.informed_masking_start_step is None
        visible, masked = self.record_exploitation_rates(probe_pixel_values).mean(dim=0).tolist()
        logs = {"exploitation_visible": visible, "exploitation_mask": masked}
        if waiting and self.informed_masking_start_step is not None:
            logs["informed_start"] = self.informed_masking_start_step
        return logs

    @torch.no_grad()
    def record_exploitation_rates(self, pixel_values: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Measure the decoder's exploitation rates on a probe batch (random masks) and record the check.

        Returns [num_decoder_layers, 2]: the share of the attention that queries at masked positions give to
        visible keys ([CLS] included) and to mask-token keys. `noise` ([B, N]) sets the probe's random masks; by
        default every check uses the same seeded masks and draws nothing from the global RNG, so checks never change
        what training samples.
        """
        if noise is None:
            patch = self.config.patch_size
            noise = probe_noise(
                pixel_values.shape[0], (pixel_values.shape[2] // patch) * (pixel_values.shape[3] // patch)
            )
        noise = noise.to(pixel_values.device)
        was_training = self.training
        self.eval()
        output = self(pixel_values, noise=noise, random_masking=True, output_decoder_attentions=True)
        self.train(was_training)
        rates = exploitation_rates(output.decoder_attentions, output.mask)
        self.schedule.record_check(*rates.mean(dim=0).tolist())
        return rates

    def forward_encoder(
        self,
        patch_tokens: torch.Tensor,
        cls_token: torch.Tensor,
        ids_keep: torch.Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """The encoder on the visible patches only: embedded patch tokens [B, N, D] gathered at `ids_keep` [B, V],
        [CLS] first, then the final LayerNorm. Returns the latent [B, 1 + V, D], hidden states and attentions."""
        visible = patch_tokens.gather(1, ids_keep[:, :, None].expand(-1, -1, patch_tokens.shape[2]))
        hidden_states, all_hidden, attentions = self.vit.encode(
            visible, cls_token, output_attentions=output_attentions, output_hidden_states=output_hidden_states
        )
        return self.vit.layernorm(hidden_states), all_hidden, attentions

    # ----- pixels ---------------------------------------------------------------------------------------------
    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, p*p*C], ViTMAE's patch pixel order."""
        patch, channels = self.config.patch_size, self.config.num_channels
        batch_size, _, height, width = pixel_values.shape
        grid_h, grid_w = height // patch, width // patch
        patches = pixel_values.reshape(batch_size, channels, grid_h, patch, grid_w, patch)
        return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch_size, grid_h * grid_w, patch * patch * channels)

    def unpatchify(self, patches: torch.Tensor, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, H, W]; the inverse of `patchify`."""
        patch, channels = self.config.patch_size, self.config.num_channels
        height, width = image_size or self.config.image_height_width
        grid_h, grid_w = height // patch, width // patch
        images = patches.reshape(patches.shape[0], grid_h, grid_w, patch, patch, channels)
        return images.permute(0, 5, 1, 3, 2, 4).reshape(patches.shape[0], channels, height, width)

    def forward_loss(self, pixel_values: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE per patch, averaged over the masked patches (mask: [B, N], 1 = masked)."""
        target = self.patchify(pixel_values)
        if self.config.norm_pix_loss:
            mean, std = patch_mean_std(target)
            target = (target - mean) / std
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    # ----- masking --------------------------------------------------------------------------------------------
    def _check_mask(self, mask: torch.Tensor, batch_size: int, num_patches: int, num_masked: int) -> torch.Tensor:
        if mask.shape != (batch_size, num_patches):
            raise ValueError(f"mask must have shape {(batch_size, num_patches)}, got {tuple(mask.shape)}")
        mask = mask.bool()
        counts = mask.sum(dim=1)
        if not bool((counts == num_masked).all()):
            raise ValueError(
                f"every mask row must hide exactly {num_masked} patches (mask_ratio {self.config.mask_ratio}); "
                f"got counts {sorted(set(counts.tolist()))}"
            )
        return mask

    def build_mask(
        self,
        patch_tokens: torch.Tensor,
        cls_token: torch.Tensor,
        noise: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        random_masking: bool = False,
        generator: torch.Generator | None = None,
        num_masked: int | None = None,
        mask_scores: torch.Tensor | None = None,
    ) -> BatchMask:
        """Choose this batch's masks (`num_masked` per image; from the config by default): given mask > given noise
        > informed (when due: by the given `mask_scores`, else ranked from these images) > random."""
        batch_size, num_patches, _ = patch_tokens.shape
        num_masked = num_masked if num_masked is not None else num_masked_patches(num_patches, self.config.mask_ratio)
        device = patch_tokens.device
        if mask is not None:
            mask = self._check_mask(mask, batch_size, num_patches, num_masked)
            return BatchMask.of(torch.argsort(mask.to(torch.int8), dim=1, stable=True), MaskType.GIVEN)
        if noise is not None:
            if noise.shape != (batch_size, num_patches):
                raise ValueError(f"noise must have shape {(batch_size, num_patches)}, got {tuple(noise.shape)}")
            return BatchMask.of(torch.argsort(noise.to(device), dim=1), MaskType.GIVEN)
        if not random_masking and self.informed_masking_active:
            if mask_scores is None:
                return self.self_ranked_mask(patch_tokens, cls_token, generator, num_masked)
            if mask_scores.shape != (batch_size, num_patches):
                raise ValueError(
                    f"mask_scores must have shape {(batch_size, num_patches)}, got {tuple(mask_scores.shape)}"
                )
            return self.mask_by_scores(mask_scores.to(device), num_masked, generator)
        noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
        return BatchMask.of(torch.argsort(noise, dim=1), MaskType.RANDOM)

    def self_ranked_mask(
        self, patch_tokens: torch.Tensor, cls_token: torch.Tensor, generator: torch.Generator | None, num_masked: int
    ) -> BatchMask:
        """Informed masks ranked from these views themselves: the per-step source (and a plain call)."""
        if self.config.informed_mask_source == "cached":
            logger.warning_once(
                "informed masks are due and no mask_scores were given: ranking each batch's own views at every step "
                "(the per-step source). For cached masks, keep whole-image rankings in a MaskRankingCache "
                "(model.mask_ranking_cache(...), mask_cache.py) and pass each view's cropped ranking as mask_scores"
            )
        result = self.informed_masking(patch_tokens, cls_token, generator, num_masked)
        ids_shuffle = torch.argsort(result.mask.to(torch.int8), dim=1, stable=True)
        return BatchMask(ids_shuffle, result.mask_type, result.object_part_size, result.edge_density)

    def mask_by_scores(self, scores: torch.Tensor, num_masked: int, generator: torch.Generator | None) -> BatchMask:
        """Informed masks from given rankings [B, N] of these views (e.g. cached whole-image rankings, cropped)."""
        masks = self.masking.mask_from_scores(scores, num_masked, generator, self.hint_decay)
        part_size = object_part_of_scores(scores).sum(dim=1)
        part_size = torch.where(masks.mask_type == int(MaskType.INFORMED), part_size, -1)
        ids_shuffle = torch.argsort(masks.mask.to(torch.int8), dim=1, stable=True)
        unknown_density = torch.full((len(scores),), -1.0, device=scores.device)
        return BatchMask(ids_shuffle, masks.mask_type, part_size, unknown_density)

    def masking_features(
        self, patch_tokens: torch.Tensor, cls_token: torch.Tensor, position_mean: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The features the self-guided masking clusters (docs/method.md §3, step 1; `SGMAEModel.masking_features`),
        without gradients. patch_tokens: [B, N, D] with positions."""
        with torch.no_grad():
            return self.vit.masking_features(patch_tokens.detach(), cls_token.detach(), position_mean)

    @torch.no_grad()
    def informed_masking(
        self,
        patch_tokens: torch.Tensor,
        cls_token: torch.Tensor,
        generator: torch.Generator | None = None,
        num_masked: int | None = None,
        position_mean: torch.Tensor | None = None,
    ) -> MaskingResult:
        """The self-guided masks of embedded images ranked from those same images (docs/method.md §3), with what the
        masking saw: the per-step source, the analysis and the Figure-1 panel. `position_mean` [N, D] for
        `feature_centring` (else the batch's). patch_tokens: [B, N, D] with positions."""
        num_masked = (
            num_masked if num_masked is not None else num_masked_patches(patch_tokens.shape[1], self.config.mask_ratio)
        )
        features = self.masking_features(patch_tokens, cls_token, position_mean)
        return self.masking(features, num_masked, generator, self.hint_decay)

    def mask_ranking_cache(
        self, num_images: int, refresh_steps: int, keyed: bool = False, sources: torch.Tensor | None = None
    ) -> MaskRankingCache:
        """An empty cache of whole-image rankings on this model's patch grid, for `num_images` training images (or,
        `keyed`, a stream's sample ids), refreshed every `refresh_steps` optimiser steps (docs/method.md §8); rows
        that repeat an image name its first row in `sources` and share its ranking."""
        return MaskRankingCache(num_images, self.config.grid_size, refresh_steps, keyed, sources)

    @property
    def hint_decay(self) -> float:
        """Where the hint schedule stands (docs/method.md §3 step 7): 1 at the informed start, 0 at the end with
        `hint_decay_power`; always 1 without it."""
        start = self.informed_masking_start_step
        return hint_decay(
            self.schedule.read("training_step"),
            start or 0,
            self.schedule.read("total_training_steps"),
            self.config.hint_decay_power,
        )

    @torch.no_grad()
    def informed_mask_scores(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        position_mean: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Whole images' informed-mask rankings [B, N] on their patch grid (docs/method.md §3, steps 1-5): the NCut
        object part first (similarity + 3), then the other patches by similarity to the object; a NaN row where an
        image has no usable cut (it will get a random mask). `position_mean` [N, D] for `feature_centring` (else
        the batch's). `forward(mask_scores=...)` masks the top K of a ranking, cropped and flipped with the view it
        is given for (docs/method.md §8). Call it in eval mode."""
        patch_tokens, cls_token, _ = self.vit.embeddings(pixel_values, interpolate_pos_encoding)
        return self.masking.ranking_scores(self.masking_features(patch_tokens, cls_token, position_mean))

    def forward(
        self,
        pixel_values: torch.Tensor,
        noise: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        mask_scores: torch.Tensor | None = None,
        random_masking: bool = False,
        generator: torch.Generator | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_decoder_attentions: bool = False,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SGMAEForPreTrainingOutput | tuple:
        r"""
        Args:
            pixel_values: Images [B, C, H, W], normalised with the image processor's mean and std.
            noise: [B, N] noise whose largest `K` entries are masked (ViTMAE's convention); overrides the strategy.
            mask: [B, N] boolean mask (True = masked) with exactly `K` masked per row; overrides everything.
            mask_scores: [B, N] informed-mask rankings of these views (`informed_mask_scores` of the whole images,
                cropped and flipped with each view, `crops.crop_rankings`; `MaskRankingCache` keeps them): masked by
                when informed masks are due. Omitted, the rankings come from `pixel_values` themselves (the per-step
                source; with `informed_mask_source="cached"` a one-time warning says so).
            random_masking: Use a random mask even when informed masking is due (e.g. for a plain-MAE probe).
            generator: RNG for random masks, hints and fallbacks (reproducible masks).
            output_decoder_attentions: Return the decoder's attention weights (exploitation-rate analysis).
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        patch_tokens, cls_token, grid = self.vit.embeddings(pixel_values, interpolate_pos_encoding)
        num_patches = patch_tokens.shape[1]
        num_masked = num_masked_patches(num_patches, self.config.mask_ratio)  # once: every mask hides exactly this
        chosen = self.build_mask(
            patch_tokens, cls_token, noise, mask, random_masking, generator, num_masked, mask_scores
        )
        num_visible = num_patches - num_masked
        ids_restore = torch.argsort(chosen.ids_shuffle, dim=1)
        latent, all_hidden, attentions = self.forward_encoder(
            patch_tokens, cls_token, chosen.ids_shuffle[:, :num_visible], output_attentions, output_hidden_states
        )
        logits, decoder_attentions = self.decoder(latent, ids_restore, grid, output_decoder_attentions)
        mask = (ids_restore >= num_visible).to(logits.dtype)
        loss = self.forward_loss(pixel_values, logits, mask)
        output = SGMAEForPreTrainingOutput(
            loss=loss,
            logits=logits,
            mask=mask,
            ids_restore=ids_restore,
            mask_type=chosen.mask_type,
            object_part_size=chosen.object_part_size,
            edge_density=chosen.edge_density,
            hidden_states=all_hidden,
            attentions=attentions,
            decoder_attentions=decoder_attentions,
        )
        return output if return_dict else output.to_tuple()


class SGMAEForImageClassification(SGMAEPreTrainedModel):
    """SG-MAE encoder with a classification head on the pooled feature (mean of patches + LayerNorm, or [CLS])."""

    def __init__(self, config: SGMAEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = SGMAEModel(config)
        mean_pooling = config.classifier_pooling == "mean"
        self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if mean_pooling else nn.Identity()
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.vit(
            pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
        )
        logits = self.classifier(self.fc_norm(outputs.pooler_output))
        loss = None if labels is None else self.classification_loss(logits, labels)
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict else output.to_tuple()

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """transformers' convention: regression for one label, cross-entropy for integer labels, else BCE."""
        config = self.config
        if config.problem_type is None:
            if self.num_labels == 1:
                config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                config.problem_type = "single_label_classification"
            else:
                config.problem_type = "multi_label_classification"
        if config.problem_type == "regression":
            return nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1))
        if config.problem_type == "single_label_classification":
            return nn.functional.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1))
        return nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())


class SGMAEFeaturePyramid(nn.Module):
    """BEiT / MAE's multi-scale neck for a plain ViT (`add_fpn`): four [B, D, H/p, W/p] maps become maps at strides
    p/4, p/2, p and 2p (4, 8, 16, 32 for patch 16), for heads made for hierarchical backbones (UperNet).

    fpn1: 2x2 deconvolution, BatchNorm, GELU, 2x2 deconvolution (x4); fpn2: one deconvolution (x2); fpn3: the map as
    it is; fpn4: 2x2 max pooling (/2). The layout of BEiT's semantic-segmentation backbone and mmsegmentation's
    `Feature2Pyramid` (its MAE configs), and of transformers' `BeitFPNNeck`.
    """

    def __init__(self, width: int):
        super().__init__()
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
            nn.BatchNorm2d(width),
            nn.GELU(),
            nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
        )
        self.fpn2 = nn.ConvTranspose2d(width, width, kernel_size=2, stride=2)
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, feature_maps: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        early, middle, late, last = feature_maps
        return self.fpn1(early), self.fpn2(middle), late, self.fpn4(last)


class FreezesUnusedOnLoad:
    """For dense heads on an `SGMAEBackbone` whose `freeze_unused_parameters` keeps out of training what gets no
    gradient: loading recreates every parameter as trainable, so the freezing is done again after loading."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) with output_loading_info
        model.freeze_unused_parameters()
        return loaded


class SGMAEBackbone(BackboneMixin, SGMAEPreTrainedModel):
    """The SG-MAE encoder as a transformers backbone for dense heads (UperNet, DPT, ...): the chosen stages'
    hidden states (`config.out_features`; "stem" is the embedded patches, "stageN" block N's output), with the final
    LayerNorm (`apply_layernorm`), as [B, D, H/p, W/p] maps (`reshape_hidden_states`), or, with `add_fpn`, four of
    them as a pyramid at strides p/4, p/2, p, 2p (`SGMAEFeaturePyramid`).

    Any image size that is a multiple of the patch size works: the position table is resized to the image's grid
    (dense heads never pass `interpolate_pos_encoding`, and segmentation crops differ from pre-training's size)."""

    def __init__(self, config: SGMAEConfig):
        super().__init__(config)
        self.vit = SGMAEModel(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.fpn = SGMAEFeaturePyramid(config.hidden_size) if config.add_fpn else None
        self.post_init()

    # The config's own properties, which default to the last stage (BackboneMixin reads the raw stored fields).
    @property
    def out_features(self) -> list[str]:
        return self.config.out_features

    @out_features.setter
    def out_features(self, out_features: list[str]) -> None:
        self.config.out_features = out_features

    @property
    def out_indices(self) -> list[int]:
        return self.config.out_indices

    @out_indices.setter
    def out_indices(self, out_indices: list[int]) -> None:
        self.config.out_indices = out_indices

    def freeze_unused_parameters(self) -> None:
        """Keep out of a dense head's training what never gets a gradient: the sin-cos position tables (frozen in
        every SG-MAE model), the final LayerNorm when the stages skip it, and blocks after the last stage used.
        (Distributed training expects every trainable parameter to get a gradient.)"""
        self.freeze_position_tables()
        if not self.config.apply_layernorm:
            self.vit.layernorm.requires_grad_(False)
        for block in self.vit.layers[max(self.out_indices) :]:
            block.requires_grad_(False)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool = True,
        **kwargs,
    ) -> BackboneOutput | tuple:
        config = self.config
        return_dict = return_dict if return_dict is not None else config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        )
        outputs = self.vit(
            pixel_values,
            output_hidden_states=True,
            output_attentions=output_attentions,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
        )
        height, width = (side // config.patch_size for side in pixel_values.shape[2:])
        feature_maps = ()
        for stage, hidden_state in zip(self.stage_names, outputs.hidden_states, strict=True):
            if stage not in self.out_features:
                continue
            if config.apply_layernorm:
                hidden_state = self.vit.layernorm(hidden_state)
            if config.reshape_hidden_states:
                hidden_state = hidden_state[:, 1:].reshape(len(hidden_state), height, width, -1)
                hidden_state = hidden_state.permute(0, 3, 1, 2).contiguous()
            feature_maps += (hidden_state,)
        if self.fpn is not None:
            feature_maps = self.fpn(feature_maps)
        output = BackboneOutput(
            feature_maps=feature_maps,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


# Every save (save_pretrained, push_to_hub, Trainer, the scripts) copies the model's code beside the weights, so the
# folder loads with trust_remote_code in a process that never imported this package.
for _model_class in (SGMAEModel, SGMAEForPreTraining, SGMAEForImageClassification, SGMAEBackbone):
    _model_class.register_for_auto_class()
