"""ResNet v1.5 multi-scale feature extractor for detection and segmentation."""

import warnings
from typing import Any

from . import adapter_api
from .backbone import ResNetBackbone
from .classification import ResNetForImageClassification, ResNetModel
from .compiled_speed import CompiledSlowerWarning
from .config import ResNetConfig
from .inference import compile_for_training, computes_bf16_natively, load_quantized, optimize_for_inference
from .layers import FrozenBatchNorm2d
from .model_parts import dense_parts, register_dense_parts, register_foldable_norm, register_inference_module
from .outputs import BackboneOutput, BaseModelOutputWithPoolingAndNoAttention, ImageClassifierOutputWithNoAttention
from .presets import PRESETS
from .quantization import computes_int8_natively, save_quantized
from .weights import CheckpointMismatchError, LoadReport

__all__ = [
    "PRESETS",
    "BackboneOutput",
    "BaseModelOutputWithPoolingAndNoAttention",
    "CheckpointMismatchError",
    "CompiledSlowerWarning",
    "FrozenBatchNorm2d",
    "ImageClassifierOutputWithNoAttention",
    "LoadReport",
    "ResNetBackbone",
    "ResNetConfig",
    "ResNetForImageClassification",
    "ResNetModel",
    "compile_for_training",
    "computes_bf16_natively",
    "computes_int8_natively",
    "dense_parts",
    "load_quantized",
    "optimize_for_inference",
    "register_dense_parts",
    "register_foldable_norm",
    "register_inference_module",
    "save_quantized",
]

# Deprecated here, importable for one release: what adapters build on is resnet_backbone.adapter_api's.
_MOVED_TO_ADAPTER_API = ("NORM_TYPES", "ResNetTrunk", "align_out_features", "check_pixel_values", "close_match_hint")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_ADAPTER_API:
        warnings.warn(
            f"resnet_backbone.{name} is deprecated and will be removed in the next release: import it from "
            f"resnet_backbone.adapter_api (from resnet_backbone.adapter_api import {name}).",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(adapter_api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
