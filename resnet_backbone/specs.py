"""Stage specs: the single source of every feature point's name, channels, stride and dilation.

They are data computed from the config alone, before any module is built: the stages are built from
them, and the trunk, the backbone's metadata and every adapter read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config imports this module
    from .config import ResNetConfig

STEM_CONV = "stem_conv"  # the stem before its max-pool: timm's first feature
STEM_CONV_STRIDE = 2  # the stem's stride-2 convolution
STEM_STRIDE = 4  # then its stride-2 max-pool


@dataclass(frozen=True)
class StageSpec:
    """What a feature point outputs (``channels`` at ``stride``) and, for a stage, how it is built."""

    name: str
    channels: int
    stride: int
    in_channels: int = 0
    depth: int = 0
    first_stride: int = 1
    dilation: int = 1
    first_dilation: int = 1


def stem_conv_spec(config: ResNetConfig) -> StageSpec:
    """The point before the stem's max-pool, which timm's feature extraction exposes as its first feature."""
    return StageSpec(STEM_CONV, channels=config.embedding_size, stride=STEM_CONV_STRIDE)


def stage_specs(config: ResNetConfig) -> list[StageSpec]:
    """Specs of ``config.stage_names``: the stem, then one per stage.

    ``output_stride`` follows timm's rule: once the network's stride reaches it, later stages trade their
    stride for dilation; each stage's first block keeps the previous stage's dilation, unless
    ``dilation_rule`` is ``"mmdet"`` (the first block uses the stage's own dilation).
    """
    specs = [StageSpec("stem", channels=config.embedding_size, stride=STEM_STRIDE)]
    stride, dilation = STEM_STRIDE, 1
    in_channels = config.embedding_size
    for index, (channels, depth) in enumerate(zip(config.hidden_sizes, config.depths)):
        first_stride = 2 if index > 0 or config.downsample_in_first_stage else 1
        previous_dilation = dilation
        if config.output_stride is not None and stride * first_stride > config.output_stride:
            dilation *= first_stride
            first_stride = 1
        stride *= first_stride
        specs.append(
            StageSpec(
                config.stage_names[index + 1],
                channels=channels,
                stride=stride,
                in_channels=in_channels,
                depth=depth,
                first_stride=first_stride,
                dilation=dilation,
                first_dilation=dilation if config.dilation_rule == "mmdet" else previous_dilation,
            )
        )
        in_channels = channels
    return specs
