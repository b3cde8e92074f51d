"""ResNet v1.5 multi-scale feature extractor for detection and segmentation."""

from .backbone import ResNetBackbone
from .classification import ResNetForImageClassification, ResNetModel
from .config import ResNetConfig
from .hints import close_match_hint
from .inference import compile_for_training, computes_bf16_natively, optimize_for_inference
from .layers import NORM_TYPES, FrozenBatchNorm2d
from .model_parts import dense_parts, register_dense_parts, register_foldable_norm
from .out_features import align_out_features
from .outputs import BackboneOutput, BaseModelOutputWithPoolingAndNoAttention, ImageClassifierOutputWithNoAttention
from .presets import PRESETS
from .trunk import ResNetTrunk, check_pixel_values
from .weights import CheckpointMismatchError, LoadReport

__all__ = [
    "NORM_TYPES",
    "PRESETS",
    "BackboneOutput",
    "BaseModelOutputWithPoolingAndNoAttention",
    "CheckpointMismatchError",
    "FrozenBatchNorm2d",
    "ImageClassifierOutputWithNoAttention",
    "LoadReport",
    "ResNetBackbone",
    "ResNetConfig",
    "ResNetForImageClassification",
    "ResNetModel",
    "ResNetTrunk",
    "align_out_features",
    "check_pixel_values",
    "close_match_hint",
    "compile_for_training",
    "computes_bf16_natively",
    "dense_parts",
    "optimize_for_inference",
    "register_dense_parts",
    "register_foldable_norm",
]
