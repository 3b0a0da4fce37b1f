"""Object detection and instance segmentation: transformers' Conditional DETR (with its mask head) on the SG-MAE
backbone, as a model whose folder carries its code.

A plain `ConditionalDetrForSegmentation` with an SG-MAE `backbone_config` trains in a process that imported this
package, but its saved config cannot be read anywhere else: transformers resolves the backbone's `model_type`
("sgmae") in its built-in table only. These two subclasses change only that (as `segmentation_sgmae.py` does for
UperNet): the configuration reads its backbone as an `SGMAEConfig`, and the model tells `AutoBackbone` which class
that config builds. Heads, Hungarian matching, losses, outputs, the image processor's box post-processing and
`pipeline("object-detection")` are transformers' Conditional DETR.
"""

from torch import nn
from transformers import AutoBackbone, ConditionalDetrConfig, ConditionalDetrForSegmentation

from .configuration_sgmae import SGMAEConfig, dense_backbone_config
from .modeling_sgmae import FreezesUnusedOnLoad, SGMAEBackbone

# One class answers both Auto classes: it predicts boxes (object detection) and a mask per box (instances).
DETECTION_AUTO_MAP = {
    "AutoConfig": "detection_sgmae.SGMAEDetrConfig",
    "AutoModelForObjectDetection": "detection_sgmae.SGMAEForObjectDetection",
    "AutoModelForImageSegmentation": "detection_sgmae.SGMAEForObjectDetection",
}


class SGMAEDetrConfig(ConditionalDetrConfig):
    """`ConditionalDetrConfig` whose `backbone_config` is an `SGMAEConfig` (a dict in config.json is read as one).

    Unset, the backbone is ViT-B/16 at 1024x1024 with a four-level pyramid at strides 4, 8, 16, 32 (blocks 4, 6, 8,
    12 under `add_fpn`, no final LayerNorm on them); the transformer reads the stride-32 level, the mask head the
    three finer ones.
    """

    model_type = "sgmae_detr"

    def __post_init__(self, **kwargs) -> None:
        kwargs.setdefault("auto_map", dict(DETECTION_AUTO_MAP))
        self.backbone_config = dense_backbone_config(self.backbone_config, 1024, "SGMAEDetrConfig")
        self.use_timm_backbone, self.use_pretrained_backbone = False, False  # the SG-MAE encoder, built from config
        super().__post_init__(**kwargs)


class SGMAEForObjectDetection(FreezesUnusedOnLoad, ConditionalDetrForSegmentation):
    """transformers' `ConditionalDetrForSegmentation` on an `SGMAEBackbone` (see `SGMAEDetrConfig`): class logits,
    boxes (`pred_boxes`, normalised center x, center y, width, height) and a mask per query (`pred_masks`, stride 4).

    The backbone takes images of any multiple of the patch size; its sin-cos position table stays frozen, as in
    every SG-MAE model.
    """

    config_class = SGMAEDetrConfig

    def __init__(self, config: SGMAEDetrConfig):
        # The DETR family builds its backbone through AutoBackbone, whose table knows SGMAEConfig only where this
        # package was imported; registering the class of this very module also serves a folder loaded as remote code.
        AutoBackbone.register(SGMAEConfig, SGMAEBackbone, exist_ok=True)
        super().__init__(config)
        self.loss_type = "ConditionalDetrForSegmentation"  # transformers picks the loss by the class's name
        # Conditional DETR's own queries start as N(0, 1) (torch's Embedding); transformers' init draws them with std
        # `init_std` (0.02), which puts every query's reference point at the image centre, and they stay alike.
        nn.init.normal_(self.conditional_detr.model.query_position_embeddings.weight)
        self.freeze_unused_parameters()

    @property
    def sgmae_backbone(self) -> SGMAEBackbone:
        return self.conditional_detr.model.backbone.model

    def freeze_unused_parameters(self) -> None:
        """Keep out of training what never gets a gradient: the backbone's unused parts
        (`SGMAEBackbone.freeze_unused_parameters`) and the first decoder layer's query scaling (Conditional DETR skips
        it there)."""
        self.sgmae_backbone.freeze_unused_parameters()
        if self.config.decoder_layers == 1:
            self.conditional_detr.model.decoder.query_scale.requires_grad_(False)


# Every save copies this file and the SG-MAE files it imports beside the weights (Hub remote code).
SGMAEDetrConfig.register_for_auto_class()
SGMAEForObjectDetection.register_for_auto_class("AutoModelForObjectDetection")
