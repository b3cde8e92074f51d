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

from resnet_backbone import ResNetBackbone, register_dense_parts, register_foldable_norm, register_inference_module
from resnet_backbone.adapter_api import close_match_hint
from resnet_backbone.adapters.torchvision_roi_align import SparseMultiScaleRoIAlign
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

    Args:
        backbone: the backbone; its ``out_features`` are the outputs.
        return_names: the outputs' names, one per ``out_features`` entry (torchvision's segmenters read
            ``"out"`` and ``"aux"``).

    Raises:
        ValueError: ``return_names`` has not one name per ``out_features`` entry.

    Example::

        >>> import torch
        >>> from resnet_backbone import ResNetBackbone
        >>> from resnet_backbone.adapters.torchvision import ResNetBody
        >>> backbone = ResNetBackbone.from_preset("resnet18", depths=[1, 1, 1, 1], out_features=["stage3", "stage4"])
        >>> body = ResNetBody(backbone, return_names=["aux", "out"])
        >>> {name: tuple(f.shape) for name, f in body(torch.randn(1, 3, 64, 64)).items()}
        {'aux': (1, 256, 4, 4), 'out': (1, 512, 2, 2)}
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

    Args:
        backbone: the backbone; each of its ``out_features`` is one pyramid level.
        out_channels: the channels of every level.
        extra_blocks: torchvision's ``LastLevelMaxPool`` (default) or ``LastLevelP6P7``; ``output_shape()``
            knows the levels of these two.
        fpn_norm_layer: a norm for the FPN's convolutions, as torchvision's ``norm_layer`` (default: none).

    Raises:
        ValueError: another kind of ``extra_blocks``.
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
    """torchvision's ``resnet_fpn_backbone`` on this project's backbone, with torchvision's defaults: frozen
    norms and three trainable stages for pretrained weights, where fine-tuning small detection batches would
    spoil the statistics; trainable BatchNorm everywhere for random weights.

    Args:
        backbone_or_preset_or_path: a ``ResNetBackbone`` (used as it is, with its weights), a preset name
            (random weights), or anything ``from_pretrained`` accepts.
        out_features: the stages that become pyramid levels.
        trainable_layers: stages left trainable, counted from the last one as in torchvision (0 to
            ``len(stage_names)``; default: 3 when weights are loaded, else all).
        extra_blocks: as in :class:`ResNetFPN`.
        out_channels: the channels of every level.
        norm_layer: the backbone's norm (default: ``"frozen_batch"`` when weights are loaded, else ``"batch"``).
        overrides: ``ResNetConfig`` fields for a backbone built here.

    Returns:
        The :class:`ResNetFPN`, with ``out_channels`` as torchvision's detectors read it.

    Raises:
        ValueError: an unknown source, field or stage, ``trainable_layers`` out of range, or ``norm_layer`` /
            ``overrides`` with an already built backbone.

    Example::

        >>> from resnet_backbone.adapters.torchvision import resnet_fpn_backbone
        >>> fpn = resnet_fpn_backbone("resnet18", depths=[1, 1, 1, 1], out_channels=32)
        >>> fpn.output_shape()
        {'0': (32, 4), '1': (32, 8), '2': (32, 16), '3': (32, 32), 'pool': (32, 64)}
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
    heads and defaults, so torchvision's COCO weights load into it (:func:`load_torchvision_weights`).
    Anchors and RoI poolers follow the levels, so other ``out_features`` get matching ones.

    Args:
        kind: ``"fasterrcnn"``, ``"maskrcnn"``, ``"keypointrcnn"``, ``"retinanet"`` or ``"fcos"``.
        backbone: as ``resnet_fpn_backbone``'s ``backbone_or_preset_or_path``.
        num_classes: default 91 (COCO with background), or 2 for keypointrcnn.
        trainable_layers: as in :func:`resnet_fpn_backbone`.
        out_features: the backbone's levels instead of torchvision's.
        torchvision_model_kwargs: passed to torchvision's model class (``min_size``, ``box_score_thresh``, ...).

    Returns:
        torchvision's detector (``FasterRCNN``, ``MaskRCNN``, ...), with a :class:`ResNetFPN` as its backbone.

    Raises:
        ValueError: an unknown ``kind`` (with a close match), or a backbone argument ``resnet_fpn_backbone``
            refuses.
    """
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
    with BatchNorm and every stage trainable, as torchvision builds them.

    Args:
        kind: ``"deeplabv3"`` or ``"fcn"``.
        backbone: a preset name or anything ``from_pretrained`` accepts (built at output stride 8), or a
            ``ResNetBackbone`` (used as it is built).
        num_classes: the classes of the head (21: Pascal VOC, as torchvision).
        aux_loss: add torchvision's auxiliary FCN head on ``stage3``.

    Returns:
        torchvision's ``DeepLabV3`` or ``FCN``, with a :class:`ResNetBody` as its backbone.

    Raises:
        ValueError: an unknown ``kind`` (with a close match) or source.

    Example::

        >>> import torch
        >>> from resnet_backbone import ResNetBackbone
        >>> from resnet_backbone.adapters.torchvision import build_segmenter
        >>> backbone = ResNetBackbone.from_preset("resnet18", depths=[1, 1, 1, 1], output_stride=8)
        >>> segmenter = build_segmenter("fcn", backbone, num_classes=3).eval()
        >>> tuple(segmenter(torch.randn(1, 3, 64, 64))["out"].shape)
        (1, 3, 64, 64)
    """
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
    """The training loss of a torchvision detector: the sum of its loss terms.

    Args:
        model: a detector in training mode.
        batch: ``(images, targets)`` as torchvision's detectors take them.

    Returns:
        The scalar loss.
    """
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
# The two-stage detectors' RoI pooling, as one sparse matrix product per level instead of torchvision's
# single-threaded roi_align.
register_inference_module(MultiScaleRoIAlign, SparseMultiScaleRoIAlign.from_module)


# ---------------------------------------------------------------- torchvision's pretrained weights


def load_torchvision_weights(
    model: nn.Module, state_dict_or_model: Mapping[str, Tensor] | nn.Module, *, strict: bool = True
) -> LoadReport:
    """Load a torchvision detector's or segmenter's weights (e.g. COCO-trained ``fasterrcnn_resnet50_fpn``)
    into the matching model from :func:`build_detector` / :func:`build_segmenter`.

    The ResNet keys are converted, everything else (FPN, heads) is torchvision's own; then the weights
    package's strict loading applies, as for a backbone checkpoint: every key must find its place with the
    right shape, else :class:`CheckpointMismatchError` lists the problems and nothing is loaded.

    Args:
        model: a model from :func:`build_detector` or :func:`build_segmenter`, of the same kind, backbone
            architecture and ``num_classes`` as the weights.
        state_dict_or_model: torchvision's model (e.g. ``fasterrcnn_resnet50_fpn(weights="DEFAULT")``) or its
            state dict.
        strict: all or nothing (``False``: load what fits and report the rest).

    Returns:
        The load report, also kept as ``model.load_report``.

    Raises:
        ValueError: ``model`` has no :class:`ResNetBody`.
        CheckpointMismatchError: strict, and some key is missing, unexpected or mis-shaped.
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
