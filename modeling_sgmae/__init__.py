"""SG-MAE: Self-Guided Masked Autoencoder (Shin et al., NeurIPS 2024) for Hugging Face Transformers."""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    AutoModelForSemanticSegmentation,
)

from .configuration_sgmae import SGMAEConfig
from .mask_cache import MaskRankingCache
from .masking_sgmae import MaskType, SelfGuidedMasking
from .modeling_sgmae import (
    SGMAEBackbone,
    SGMAEForImageClassification,
    SGMAEForPreTraining,
    SGMAEForPreTrainingOutput,
    SGMAEModel,
    SGMAEPreTrainedModel,
)
from .segmentation_sgmae import SGMAEForSemanticSegmentation, SGMAEUperNetConfig
from .trainer_callback import SGMAETrainerCallback

AutoConfig.register("sgmae", SGMAEConfig, exist_ok=True)
AutoModel.register(SGMAEConfig, SGMAEModel, exist_ok=True)
AutoModelForPreTraining.register(SGMAEConfig, SGMAEForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(SGMAEConfig, SGMAEForImageClassification, exist_ok=True)
AutoBackbone.register(SGMAEConfig, SGMAEBackbone, exist_ok=True)
AutoConfig.register("sgmae_upernet", SGMAEUperNetConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(SGMAEUperNetConfig, SGMAEForSemanticSegmentation, exist_ok=True)

__all__ = [
    "MaskRankingCache",
    "MaskType",
    "SGMAEBackbone",
    "SGMAEConfig",
    "SGMAEForImageClassification",
    "SGMAEForPreTraining",
    "SGMAEForPreTrainingOutput",
    "SGMAEForSemanticSegmentation",
    "SGMAEModel",
    "SGMAEPreTrainedModel",
    "SGMAETrainerCallback",
    "SGMAEUperNetConfig",
    "SelfGuidedMasking",
]
