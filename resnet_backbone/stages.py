"""The stem and the stages, built from the stage specs.

Module names follow transformers (``embedder.embedder``, ``encoder.stages.N.layers.M``) because its
checkpoints depend on them: ``embedder`` is the stem and ``encoder`` only holds the stages.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import BasicLayer, BottleNeckLayer
from .config import ResNetConfig
from .layers import ConvLayer
from .specs import StageSpec, stage_specs


class Embeddings(nn.Module):
    """The stem: a 7x7 stride-2 conv (or ResNet-C's three 3x3 convs), then a 3x3 stride-2 max-pool."""

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        act, norm = config.hidden_act, config.norm_layer
        if config.stem_type == "deep":
            width = config.deep_stem_width()
            self.embedder = nn.Sequential(
                ConvLayer(config.num_channels, width, stride=2, norm_layer=norm, activation=act),
                ConvLayer(width, width, norm_layer=norm, activation=act),
                ConvLayer(width, config.embedding_size, norm_layer=norm, activation=act),
            )
        else:
            self.embedder = ConvLayer(
                config.num_channels, config.embedding_size, kernel_size=7, stride=2, norm_layer=norm, activation=act
            )
        self.pooler = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pooler(self.embedder(pixel_values))


class Stage(nn.Module):
    """``depth`` residual layers; the first one changes width and stride."""

    def __init__(self, config: ResNetConfig, spec: StageSpec, drop_path_rates: list[float]) -> None:
        super().__init__()
        layer_class = BottleNeckLayer if config.layer_type == "bottleneck" else BasicLayer
        self.layers = nn.Sequential(
            *(
                layer_class(
                    config,
                    spec.in_channels if i == 0 else spec.channels,
                    spec.channels,
                    stride=spec.first_stride if i == 0 else 1,
                    dilation=spec.dilation,
                    first_dilation=spec.first_dilation if i == 0 else spec.dilation,
                    drop_path_rate=drop_path_rates[i],
                )
                for i in range(spec.depth)
            )
        )

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden_state)


class Encoder(nn.Module):
    """Holds the first ``num_stages`` stages (later ones are never built) in ``stages``."""

    def __init__(self, config: ResNetConfig, num_stages: int) -> None:
        super().__init__()
        specs = stage_specs(config)[1:]
        rates = _drop_path_rates(config)
        self.stages = nn.ModuleList(
            Stage(config, spec, rates[sum(config.depths[:i]) : sum(config.depths[: i + 1])])
            for i, spec in enumerate(specs[:num_stages])
        )


def _drop_path_rates(config: ResNetConfig) -> list[float]:
    """timm's stochastic-depth rule: the rate grows linearly over the blocks of the whole network."""
    num_blocks = sum(config.depths)
    return [config.drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
