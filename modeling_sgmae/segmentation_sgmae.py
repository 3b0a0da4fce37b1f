"""Semantic segmentation: transformers' UperNet on the SG-MAE backbone, as a model whose folder carries its code.

A plain `UperNetForSemanticSegmentation` with an SG-MAE `backbone_config` trains in a process that imported this
package, but its saved config cannot be read anywhere else: transformers resolves the backbone's `model_type`
("sgmae") in its built-in table only. These two subclasses change only that: the configuration reads its backbone
as an `SGMAEConfig`, and the model tells `AutoBackbone` which class that config builds. Everything else (heads,
losses, outputs, `pipeline("image-segmentation")`) is transformers' UperNet.
"""

from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation
from transformers.models.auto import modeling_auto

from .configuration_sgmae import SGMAEConfig, dense_backbone_config
from .modeling_sgmae import FreezesUnusedOnLoad, SGMAEBackbone

SEGMENTATION_AUTO_MAP = {
    "AutoConfig": "segmentation_sgmae.SGMAEUperNetConfig",
    "AutoModelForSemanticSegmentation": "segmentation_sgmae.SGMAEForSemanticSegmentation",
}


class SGMAEUperNetConfig(UperNetConfig):
    """`UperNetConfig` whose `backbone_config` is an `SGMAEConfig` (a dict in config.json is read as one).

    Unset, the backbone is ViT-B/16 at 512x512 with the pyramid of BEiT / MAE's UperNet (blocks 4, 6, 8, 12,
    i.e. 0-based 3, 5, 7, 11; no final LayerNorm on them).
    """

    model_type = "sgmae_upernet"

    def __post_init__(self, **kwargs) -> None:
        kwargs.setdefault("auto_map", dict(SEGMENTATION_AUTO_MAP))
        self.backbone_config = dense_backbone_config(self.backbone_config, 512, "SGMAEUperNetConfig")
        super().__post_init__(**kwargs)


class SGMAEForSemanticSegmentation(FreezesUnusedOnLoad, UperNetForSemanticSegmentation):
    """transformers' `UperNetForSemanticSegmentation` on an `SGMAEBackbone` (see `SGMAEUperNetConfig`).

    The backbone takes crops of any multiple of the patch size; its sin-cos position table stays frozen, as in every
    SG-MAE model.
    """

    config_class = SGMAEUperNetConfig

    def __init__(self, config: SGMAEUperNetConfig):
        # UperNet builds its backbone through AutoBackbone, whose table knows SGMAEConfig only where this package was
        # imported; registering the class of this very module also serves a folder loaded as remote code.
        AutoBackbone.register(SGMAEConfig, SGMAEBackbone, exist_ok=True)
        super().__init__(config)
        self.freeze_unused_parameters()

    def freeze_unused_parameters(self) -> None:
        """Keep out of training what never gets a gradient (`SGMAEBackbone.freeze_unused_parameters`)."""
        self.backbone.freeze_unused_parameters()


# Every save copies this file and the SG-MAE files it imports beside the weights (Hub remote code).
SGMAEUperNetConfig.register_for_auto_class()
SGMAEForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
# transformers' image-segmentation pipeline checks a model against merged copies of its task tables, which drop the
# classes AutoModelForSemanticSegmentation.register added, and logs "not supported" before it works: name this one.
modeling_auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.setdefault(
    SGMAEUperNetConfig.model_type, SGMAEForSemanticSegmentation.__name__
)
