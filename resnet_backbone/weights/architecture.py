"""Read the architecture off a checkpoint's keys and shapes, and name it for error messages."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ..config import ResNetConfig, check_field_names
from ..presets import PRESETS
from .layouts import NAMINGS, PeerLayout, to_canonical

# The fields that decide which tensors a checkpoint holds, and their shapes.
ARCHITECTURE_FIELDS = (
    "num_channels", "embedding_size", "hidden_sizes", "depths", "layer_type", "groups", "width_per_group",
    "stem_type",
)  # fmt: skip
_BLOCK_KEY = re.compile(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.")


def infer_config(state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> ResNetConfig:
    """The config whose model has exactly this checkpoint's tensors (any supported layout).

    Read from the tensors: depths, hidden sizes, block type, groups and width, stem type and width,
    input channels, norm type (batch or group) and the classifier size; avg_down too for timm keys
    (transformers' layout cannot show it: an average pool has no weights).

    Args:
        state_dict: the checkpoint's tensors, in any layout :func:`to_canonical` reads.
        overrides: ``ResNetConfig`` fields that the tensors cannot show (``out_features``, ``output_stride``,
            ``norm_layer="frozen_batch"``, ...).

    Returns:
        The config.

    Raises:
        ValueError: the keys are in no known layout, or they do not describe a ResNet.
    """
    check_field_names(overrides)
    canonical, layout = to_canonical(state_dict)
    fields: dict[str, Any] = dict(avg_down=bool(layout and layout.avg_down))
    fields.update(_stem_fields(canonical))
    depths: dict[int, int] = {}
    for key in canonical:
        match = _BLOCK_KEY.match(key)
        if match:
            stage, block = int(match[1]), int(match[2])
            depths[stage] = max(depths.get(stage, 0), block + 1)
    if not depths or sorted(depths) != list(range(len(depths))):
        raise ValueError(f"The checkpoint's stages are not numbered 0..n-1: found stages {sorted(depths)}.")
    fields["depths"] = [depths[stage] for stage in range(len(depths))]
    bottleneck = "encoder.stages.0.layers.0.layer.2.convolution.weight" in canonical
    fields["layer_type"] = "bottleneck" if bottleneck else "basic"
    last_conv = 2 if bottleneck else 1
    fields["hidden_sizes"] = [
        _tensor(canonical, f"encoder.stages.{stage}.layers.0.layer.{last_conv}.convolution.weight").shape[0]
        for stage in range(len(depths))
    ]
    if bottleneck:
        fields.update(_grouping_fields(canonical, fields["hidden_sizes"]))
    if "classifier.1.weight" in canonical:
        fields["num_labels"] = canonical["classifier.1.weight"].shape[0]
    return ResNetConfig(**{**fields, **overrides})


def _tensor(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"The checkpoint has no {key!r}, which every ResNet of its kind has; is it truncated?")
    return state_dict[key]


def _stem_fields(canonical: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    if "embedder.embedder.0.convolution.weight" in canonical:
        first = _tensor(canonical, "embedder.embedder.0.convolution.weight")
        last = _tensor(canonical, "embedder.embedder.2.convolution.weight")
        fields = dict(stem_type="deep", num_channels=first.shape[1], embedding_size=last.shape[0])
        if first.shape[0] != last.shape[0] // 2:
            raise ValueError(
                f"The checkpoint's deep stem is {first.shape[0]} channels wide; only embedding_size/2 "
                f"({last.shape[0] // 2}) is supported."
            )
        norm_key = "embedder.embedder.2.normalization"
    else:
        conv = _tensor(canonical, "embedder.embedder.convolution.weight")
        fields = dict(stem_type="default", num_channels=conv.shape[1], embedding_size=conv.shape[0])
        norm_key = "embedder.embedder.normalization"
    fields["norm_layer"] = "batch" if f"{norm_key}.running_mean" in canonical else "group"
    return fields


def _grouping_fields(canonical: Mapping[str, torch.Tensor], hidden_sizes: list[int]) -> dict[str, int]:
    conv = _tensor(canonical, "encoder.stages.0.layers.0.layer.1.convolution.weight")
    width, groups = conv.shape[0], conv.shape[0] // conv.shape[1]
    width_per_group = round(width / groups * 64 / (hidden_sizes[0] // 4))
    probe = ResNetConfig(hidden_sizes=hidden_sizes, depths=[1] * len(hidden_sizes), groups=groups,
                         width_per_group=width_per_group)  # fmt: skip
    for stage, hidden_size in enumerate(hidden_sizes):
        actual = _tensor(canonical, f"encoder.stages.{stage}.layers.0.layer.1.convolution.weight").shape[0]
        if probe.bottleneck_width(hidden_size) != actual:
            raise ValueError(
                f"Stage {stage + 1}'s bottleneck is {actual} channels wide, which no groups x width_per_group "
                f"gives consistently with the other stages (tried {groups}x{width_per_group})."
            )
    return dict(groups=groups, width_per_group=width_per_group)


def describe(config: ResNetConfig) -> str:
    """A short name of ``config``'s architecture, for messages.

    Args:
        config: the config.

    Returns:
        A preset name when the architecture is one (with its input channels when not 3), else its
        architecture fields as ``name=value`` pairs.

    Example::

        >>> from resnet_backbone import ResNetConfig
        >>> from resnet_backbone.weights import describe
        >>> describe(ResNetConfig(num_channels=1))
        'resnet50 with 1 input channels'
    """
    for name in PRESETS:
        preset = ResNetConfig.from_preset(name)
        if all(getattr(preset, f) == getattr(config, f) for f in ARCHITECTURE_FIELDS if f != "num_channels"):
            return name if config.num_channels == 3 else f"{name} with {config.num_channels} input channels"
    return ", ".join(f"{name}={getattr(config, name)}" for name in ARCHITECTURE_FIELDS)


def same_architecture(first: ResNetConfig, second: ResNetConfig) -> bool:
    """Whether two configs build networks with the same tensors (selection, labels and training options aside).

    Args:
        first, second: the configs.

    Returns:
        True when every architecture field is equal.
    """
    return all(getattr(first, name) == getattr(second, name) for name in ARCHITECTURE_FIELDS)


def peer_layout_of(config: ResNetConfig, naming: str = "torchvision") -> PeerLayout:
    """The key layout in which a library of ``naming`` stores a model of ``config``.

    Args:
        config: the architecture (its stem, shortcuts and norm decide the keys).
        naming: ``"torchvision"`` (also timm) or ``"mmdet"`` (also mmseg).

    Returns:
        The :class:`PeerLayout`, for :func:`from_canonical`.

    Raises:
        ValueError: an unknown ``naming``.
    """
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}.")
    norm_name = "gn" if naming == "mmdet" and config.norm_layer == "group" else "bn"
    return PeerLayout(stem_type=config.stem_type, avg_down=config.avg_down, naming=naming, norm_name=norm_name)
