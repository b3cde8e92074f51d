"""ResNet v1.5 multi-scale feature extractor for detection and segmentation."""

from .backbone import ResNetBackbone
from .classification import ResNetForImageClassification, ResNetModel
from .config import ResNetConfig
from .inference import optimize_for_inference
from .out_features import align_out_features
from .outputs import BackboneOutput, BaseModelOutputWithPoolingAndNoAttention, ImageClassifierOutputWithNoAttention
from .presets import PRESETS
from .weights import CheckpointMismatchError, LoadReport

__all__ = [
    "PRESETS",
    "BackboneOutput",
    "BaseModelOutputWithPoolingAndNoAttention",
    "CheckpointMismatchError",
    "ImageClassifierOutputWithNoAttention",
    "LoadReport",
    "ResNetBackbone",
    "ResNetConfig",
    "ResNetForImageClassification",
    "ResNetModel",
    "align_out_features",
    "optimize_for_inference",
]
