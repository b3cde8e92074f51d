"""torchvision adapter: ResNetBackbone inside torchvision's detectors and segmenters.

``ResNetBody`` is what torchvision's ``IntermediateLayerGetter`` is to its ResNet (an ``OrderedDict`` of
feature maps, TorchScript-scriptable); ``ResNetFPN`` is its ``BackboneWithFPN``. The builders use
torchvision's own model classes, heads and defaults, so torchvision's pretrained detectors and
segmenters load into them with :func:`load_torchvision_weights`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, KeypointRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.ssd import SSD
from torchvision.models.segmentation import FCN, LRASPP, DeepLabV3
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)

from resnet_backbone import ResNetBackbone, register_dense_parts, register_foldable_norm
from resnet_backbone.adapter_api import close_match_hint
from resnet_backbone.weights import LoadReport, load_placed, resolve_source, to_canonical

__all__ = [
    "ResNetBody",
    "ResNetFPN",
    "build_detector",
    "build_segmenter",
    "detection_loss",
    "load_torchvision_weights",
    "resnet_fpn_backbone",
]


class ResNetBody(nn.Module):
    """The backbone's ``out_features`` as an ``OrderedDict`` named ``return_names`` (default: the stage names).

    For users who bring their own neck, and the body of :class:`ResNetFPN`. Eagerly it selects from the
    trunk's stage loop and reads the backbone's selection live; TorchScript compiles the trunk's scripted
    loop with the selection as it is when the body is scripted.
    """

    __jit_unused_properties__ = ["return_names", "size_divisibility"]

    def __init__(self, backbone: ResNetBackbone, return_names: Sequence[str] | None = None) -> None:
        super().__init__()
        if return_names is not None and len(return_names) != len(backbone.out_features):
            raise ValueError(
                f"return_names needs one name per out_feature {backbone.out_features}, got {list(return_names)}."
            )
        self.backbone = backbone
        self.custom_names = None if return_names is None else list(return_names)

    @property
    def return_names(self) -> list[str]:
        names = self.backbone.out_features if self.custom_names is None else self.custom_names
        if len(names) != len(self.backbone.out_features):
            raise ValueError(
                f"This body names {len(names)} outputs {names}, but its backbone now selects "
                f"{self.backbone.out_features}; build a new body for the new selection."
            )
        return list(names)

    @property
    def size_divisibility(self) -> int:
        """Inputs divisible by this keep every feature map an exact fraction of the input (detectron2)."""
        return self.backbone.size_divisibility

    def __prepare_scriptable__(self) -> ResNetBody:
        """torch.jit.script calls this first: TorchScript compiles the selection as it is now."""
        self._scripted_indices = torch.jit.Attribute(list(self.backbone.out_indices), list[int])
        self._scripted_names = torch.jit.Attribute(self.return_names, list[str])
        return self

    def forward(self, pixel_values: Tensor) -> dict[str, Tensor]:
        if torch.jit.is_scripting():
            indices, names = self._scripted_indices, self._scripted_names
            hidden_states = self.backbone.scripted_hidden_states(pixel_values, max(indices))
        else:
            indices, names = self.backbone.out_indices, self.return_names
            hidden_states = self.backbone.forward_hidden_states(pixel_values, max(indices, default=0))
        features = OrderedDict()
        for index, name in zip(indices, names):
            features[name] = hidden_states[index]
        return features

    def output_shape(self) -> dict[str, tuple[int, int]]:
        """``{name: (channels, stride)}`` of each output, known before any forward pass (detectron2)."""
        return dict(zip(self.return_names, zip(self.backbone.channels, self.backbone.strides)))


class ResNetFPN(nn.Module):
    """:class:`ResNetBody` plus torchvision's ``FeaturePyramidNetwork``: torchvision's ``BackboneWithFPN``.

    Outputs are named ``"0"``, ``"1"``, ... plus the extra block's levels (``"pool"``, or ``"p6"``, ``"p7"``),
    which is what torchvision's detection heads expect with their defaults.
    """

    def __init__(
        self,
        backbone: ResNetBackbone,
        *,
        out_channels: int = 256,
        extra_blocks: ExtraFPNBlock | None = None,
        fpn_norm_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        extra_blocks = LastLevelMaxPool() if extra_blocks is None else extra_blocks
        if type(extra_blocks) not in _EXTRA_LEVELS:
            raise ValueError(
                f"extra_blocks must be torchvision's LastLevelMaxPool or LastLevelP6P7, got "
                f"{type(extra_blocks).__name__}."
            )
        self.body = ResNetBody(backbone, return_names=[str(i) for i in range(len(backbone.out_features))])
        self.fpn = FeaturePyramidNetwork(
            backbone.channels, out_channels, extra_blocks=extra_blocks, norm_layer=fpn_norm_layer
        )
        self.out_channels = out_channels

    __jit_unused_properties__ = ["size_divisibility"]

    @property
    def size_divisibility(self) -> int:
        return self.body.size_divisibility

    def forward(self, pixel_values: Tensor) -> dict[str, Tensor]:
        return self.fpn(self.body(pixel_values))

    def output_shape(self) -> dict[str, tuple[int, int]]:
        shapes = {name: (self.out_channels, stride) for name, (_, stride) in self.body.output_shape().items()}
        coarsest = max(stride for _, stride in shapes.values())
        for level, name in enumerate(_EXTRA_LEVELS[type(self.fpn.extra_blocks)], start=1):
            shapes[name] = (self.out_channels, coarsest * 2**level)
        return shapes


# The levels that torchvision's extra FPN blocks add after the coarsest one, each at half its resolution.
_EXTRA_LEVELS = {LastLevelMaxPool: ("pool",), LastLevelP6P7: ("p6", "p7")}


def resnet_fpn_backbone(
    backbone_or_preset_or_path: ResNetBackbone | str | os.PathLike = "resnet50",
    *,
    out_features: Sequence[str] = ("stage1", "stage2", "stage3", "stage4"),
    trainable_layers: int | None = None,
    extra_blocks: ExtraFPNBlock | None = None,
    out_channels: int = 256,
    norm_layer: str | None = None,
    **overrides: Any,
) -> ResNetFPN:
    """torchvision's ``resnet_fpn_backbone`` on this project's backbone.

    ``backbone_or_preset_or_path``: a ``ResNetBackbone``, a preset name (random weights), or anything
    ``from_pretrained`` accepts. ``trainable_layers`` counts from the last stage as in torchvision (0 to
    ``len(stage_names)``; default: 3 when weights are loaded, else all). ``norm_layer`` defaults to
    ``"frozen_batch"`` when weights are loaded and ``"batch"`` otherwise, as torchvision does.
    ``overrides`` are config fields for a backbone built here.
    """
    backbone, has_weights = _resolve_backbone(backbone_or_preset_or_path, list(out_features), norm_layer, overrides)
    _set_trainable_layers(backbone, trainable_layers, has_weights)
    return ResNetFPN(backbone, out_channels=out_channels, extra_blocks=extra_blocks)


def _resolve_backbone(
    source: ResNetBackbone | str | os.PathLike,
    out_features: list[str],
    norm_layer: str | None,
    overrides: Mapping[str, Any],
) -> tuple[ResNetBackbone, bool]:
    """The backbone, and whether it came with weights (which decides torchvision's defaults)."""
    if isinstance(source, ResNetBackbone):
        if norm_layer is not None or overrides:
            raise ValueError(
                "norm_layer and config overrides apply when the backbone is built here; this ResNetBackbone is "
                f"already built (norm_layer={source.config.norm_layer!r}). Pass a preset or a checkpoint instead."
            )
        source.out_features = out_features
        return source, source.load_report is not None
    resolved = resolve_source(source)
    weights_expected = resolved.kind != "preset"
    default_norm = "frozen_batch" if weights_expected else "batch"
    backbone = ResNetBackbone.load(
        resolved, out_features=out_features, norm_layer=norm_layer or default_norm, **overrides
    )
    return backbone, weights_expected


def _set_trainable_layers(backbone: ResNetBackbone, trainable_layers: int | None, has_weights: bool) -> None:
    num_stages = len(backbone.stage_names)
    if trainable_layers is None:
        trainable_layers = min(3, num_stages) if has_weights else num_stages
    if (
        isinstance(trainable_layers, bool)
        or not isinstance(trainable_layers, int)
        or not (0 <= trainable_layers <= num_stages)
    ):
        raise ValueError(
            f"trainable_layers counts trainable stages from the last one (torchvision's meaning) and must be "
            f"between 0 and {num_stages} for {backbone.stage_names}, got {trainable_layers!r}."
        )
    backbone.freeze(num_stages - trainable_layers)


# ---------------------------------------------------------------- detectors and segmenters


@dataclass(frozen=True)
class _DetectorDefaults:
    """What torchvision's ``<kind>_resnet50_fpn`` builder uses.

    Anchors are torchvision's, written per FPN level as ``anchor_scales`` times the level's stride, so that
    other ``out_features`` get anchors (and RoI poolers) that match their levels.
    """

    model_class: type[nn.Module]
    out_features: tuple[str, ...]
    extra_blocks: str
    anchor_scales: tuple[float, ...]
    aspect_ratios: tuple[float, ...]
    roi_pools: dict[str, int]  # model argument -> output size
    num_classes: int = 91


_RCNN_LEVELS = ("stage1", "stage2", "stage3", "stage4")
_RCNN_ANCHORS = dict(anchor_scales=(8,), aspect_ratios=(0.5, 1.0, 2.0))
_ONE_STAGE_LEVELS = ("stage2", "stage3", "stage4")
DETECTORS = {
    "fasterrcnn": _DetectorDefaults(
        FasterRCNN, _RCNN_LEVELS, "maxpool", **_RCNN_ANCHORS, roi_pools={"box_roi_pool": 7}
    ),
    "maskrcnn": _DetectorDefaults(
        MaskRCNN, _RCNN_LEVELS, "maxpool", **_RCNN_ANCHORS, roi_pools={"box_roi_pool": 7, "mask_roi_pool": 14}
    ),
    "keypointrcnn": _DetectorDefaults(
        KeypointRCNN,
        _RCNN_LEVELS,
        "maxpool",
        **_RCNN_ANCHORS,
        roi_pools={"box_roi_pool": 7, "keypoint_roi_pool": 14},
        num_classes=2,
    ),  # fmt: skip
    "retinanet": _DetectorDefaults(
        RetinaNet, _ONE_STAGE_LEVELS, "p6p7", (4, 4 * 2 ** (1 / 3), 4 * 2 ** (2 / 3)), (0.5, 1.0, 2.0), {}
    ),
    "fcos": _DetectorDefaults(FCOS, _ONE_STAGE_LEVELS, "p6p7", (1,), (1.0,), {}),
}
SEGMENTERS = {"deeplabv3": (DeepLabV3, DeepLabHead), "fcn": (FCN, FCNHead)}


def build_detector(
    kind: str,
    backbone: ResNetBackbone | str | os.PathLike = "resnet50",
    *,
    num_classes: int | None = None,
    trainable_layers: int | None = None,
    out_features: Sequence[str] | None = None,
    **torchvision_model_kwargs: Any,
) -> nn.Module:
    """torchvision's ``<kind>_resnet50_fpn`` on this backbone: the same feature levels, extra FPN blocks,
    heads and defaults (``num_classes`` 91, or 2 for keypointrcnn). ``kind``: fasterrcnn, maskrcnn,
    keypointrcnn, retinanet or fcos; ``out_features`` replaces torchvision's levels; other keyword
    arguments go to torchvision's model class."""
    defaults = _choice(kind, DETECTORS, "detector")
    extra_blocks = LastLevelMaxPool() if defaults.extra_blocks == "maxpool" else LastLevelP6P7(256, 256)
    levels = defaults.out_features if out_features is None else tuple(out_features)
    fpn = resnet_fpn_backbone(
        backbone, out_features=levels, trainable_layers=trainable_layers, extra_blocks=extra_blocks
    )
    for name, value in _level_components(defaults, fpn).items():
        torchvision_model_kwargs.setdefault(name, value)
    return defaults.model_class(fpn, num_classes=num_classes or defaults.num_classes, **torchvision_model_kwargs)


def _level_components(defaults: _DetectorDefaults, fpn: ResNetFPN) -> dict[str, nn.Module]:
    """Anchors and RoI poolers for the FPN's levels, by torchvision's per-stride rules."""
    strides = [stride for _, stride in fpn.output_shape().values()]
    sizes = tuple(tuple(int(scale * stride) for scale in defaults.anchor_scales) for stride in strides)
    anchors = AnchorGenerator(sizes, (defaults.aspect_ratios,) * len(sizes))
    anchor_argument = "rpn_anchor_generator" if defaults.roi_pools else "anchor_generator"
    pooled_levels = fpn.body.return_names  # torchvision pools from the backbone's levels, not the extra ones
    pools = {
        name: MultiScaleRoIAlign(pooled_levels, size, sampling_ratio=2) for name, size in defaults.roi_pools.items()
    }
    return {anchor_argument: anchors, **pools}


def build_segmenter(
    kind: str,
    backbone: ResNetBackbone | str | os.PathLike = "resnet50",
    *,
    num_classes: int = 21,
    aux_loss: bool = False,
) -> nn.Module:
    """torchvision's ``<kind>_resnet50`` on this backbone at ``output_stride=8`` (dilated last two stages),
    with BatchNorm and every stage trainable, as torchvision builds them. ``kind``: deeplabv3 or fcn."""
    model_class, head_class = _choice(kind, SEGMENTERS, "segmenter")
    out_features = ["stage3", "stage4"] if aux_loss else ["stage4"]
    if isinstance(backbone, ResNetBackbone):
        resolved, _ = _resolve_backbone(backbone, out_features, None, {})
    else:
        resolved, _ = _resolve_backbone(backbone, out_features, "batch", {"output_stride": 8})
    body = ResNetBody(resolved, return_names=["aux", "out"] if aux_loss else ["out"])
    channels = dict(zip(body.return_names, resolved.channels))
    aux_classifier = FCNHead(channels["aux"], num_classes) if aux_loss else None
    return model_class(body, head_class(channels["out"], num_classes), aux_classifier)


def detection_loss(model: nn.Module, batch: tuple[list[Tensor], list[dict[str, Tensor]]]) -> Tensor:
    """The training loss of a torchvision detector on ``(images, targets)``: the sum of its loss terms."""
    images, targets = batch
    return sum(model(images, targets).values())


def _choice(kind: str, choices: Mapping[str, Any], what: str) -> Any:
    if kind not in choices:
        raise ValueError(f"Unknown {what} {kind!r}.{close_match_hint(kind, choices)} Valid: {', '.join(choices)}.")
    return choices[kind]


# ---------------------------------------------------------------- what the fast paths need to know

# The parts of torchvision's models that are dense convolutions on inputs of a fixed shape (for a fixed image
# size), for optimize_for_inference and compile_for_training; a detector's backbone is an FPN backbone, whose
# own declaration splits it into body and neck. Anchors, matching, NMS, RoI pooling and post-processing stay
# outside them, eager and in float32; so do the RoI heads, whose inputs change shape with the number of
# proposals (each shape would compile).
DENSE_PARTS = {
    ResNetBody: ("",),
    ResNetFPN: ("body", "fpn"),
    BackboneWithFPN: ("body", "fpn"),
    GeneralizedRCNN: ("backbone", "rpn.head"),  # Faster, Mask and Keypoint R-CNN
    RetinaNet: ("backbone", "head"),
    FCOS: ("backbone", "head"),
    SSD: ("backbone", "head"),
    FCN: ("backbone", "classifier", "aux_classifier"),
    DeepLabV3: ("backbone", "classifier", "aux_classifier"),
    LRASPP: ("backbone", "classifier"),
}
for _model_class, _part_names in DENSE_PARTS.items():
    register_dense_parts(_model_class, _part_names)
# torchvision's FrozenBatchNorm2d is BatchNorm's eval-mode arithmetic on buffers: its detectors fold as they come.
register_foldable_norm(FrozenBatchNorm2d)


# ---------------------------------------------------------------- torchvision's pretrained weights


def load_torchvision_weights(
    model: nn.Module, state_dict_or_model: Mapping[str, Tensor] | nn.Module, *, strict: bool = True
) -> LoadReport:
    """Load a torchvision detector's or segmenter's weights (e.g. COCO-trained ``fasterrcnn_resnet50_fpn``)
    into the matching model from :func:`build_detector` / :func:`build_segmenter`.

    The ResNet keys are converted, everything else (FPN, heads) is torchvision's own; then the weights
    package's strict loading applies, as for a backbone checkpoint: every key must find its place with the
    right shape, else :class:`CheckpointMismatchError` lists the problems and nothing is loaded. The
    report is returned and kept as ``model.load_report``.
    """
    state_dict = state_dict_or_model.state_dict() if isinstance(state_dict_or_model, nn.Module) else state_dict_or_model
    body_path = next((name for name, module in model.named_modules() if isinstance(module, ResNetBody)), None)
    if body_path is None:
        raise ValueError(f"{type(model).__name__} has no ResNetBody: build it with build_detector or build_segmenter.")
    torchvision_prefix, our_prefix = f"{body_path}.", f"{body_path}.backbone."
    resnet = {k.removeprefix(torchvision_prefix): v for k, v in state_dict.items() if k.startswith(torchvision_prefix)}
    placed = {k: v for k, v in state_dict.items() if not k.startswith(torchvision_prefix)}
    if resnet:
        placed.update({our_prefix + key: value for key, value in to_canonical(resnet)[0].items()})
    model.load_report = load_placed(
        model,
        placed,
        LoadReport(source_layout="torchvision"),
        strict=strict,
        subject=f"this {type(model).__name__}",
        likely_cause=lambda: "weights of another kind of model, backbone or num_classes.",
    )
    return model.load_report
