"""Residual blocks, with transformers' module names so checkpoints move across unchanged.

``layer`` is the main branch (a ``Sequential`` of :class:`ConvLayer`), ``shortcut`` the projection (or
``Identity``), ``activation`` the one after the sum. As in transformers, the activations inside the main
branch are always ReLU and ``hidden_act`` applies after the sum (and in the stem).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ResNetConfig
from .layers import ConvLayer, make_activation, make_norm


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a whole sample's residual branch with probability ``drop_prob`` and
    scale the kept ones by ``1 / (1 - drop_prob)`` (timm's ``DropPath``, same random draws)."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * keep.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class ShortCut(nn.Module):
    """1x1 projection of the residual, optionally after a 2x2 average pool (ResNet-D's ``avg_down``)."""

    def __init__(
        self, config: ResNetConfig, in_channels: int, out_channels: int, *, stride: int, dilation: int
    ) -> None:
        super().__init__()
        self.pool = _shortcut_pool(stride, dilation, config.dilation_rule) if config.avg_down else nn.Identity()
        conv_stride = 1 if config.avg_down else stride
        self.convolution = nn.Conv2d(in_channels, out_channels, 1, stride=conv_stride, bias=False)
        self.normalization = make_norm(config.norm_layer, out_channels)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.normalization(self.convolution(self.pool(hidden_state)))


def _shortcut_pool(stride: int, dilation: int, dilation_rule: str) -> nn.Module:
    if stride > 1:
        return nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
    if dilation > 1 and dilation_rule == "timm":
        # timm's AvgPool2dSame(2, stride=1) in dilated stages: pad right and bottom with zeros, which count.
        return nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.AvgPool2d(2, 1))
    return nn.Identity()


class _ResidualLayer(nn.Module):
    """``activation(drop_path(layer(x)) + shortcut(x))``; subclasses say what the main branch ``layer`` is."""

    def __init__(
        self,
        config: ResNetConfig,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int = 1,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        needs_projection = in_channels != out_channels or stride != 1
        self.shortcut = (
            ShortCut(config, in_channels, out_channels, stride=stride, dilation=dilation)
            if needs_projection
            else nn.Identity()
        )
        self.layer = self.main_branch(config, in_channels, out_channels, stride, dilation, first_dilation)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.activation = make_activation(config.hidden_act)

    @staticmethod
    def main_branch(
        config: ResNetConfig, in_channels: int, out_channels: int, stride: int, dilation: int, first_dilation: int
    ) -> nn.Sequential:
        raise NotImplementedError

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        # The main branch first, as torchvision and transformers: the projection is then not held in memory
        # while the branch runs.
        residual = hidden_state
        hidden_state = self.drop_path(self.layer(hidden_state))
        hidden_state += self.shortcut(residual)
        return self.activation(hidden_state)

    def last_norm(self) -> nn.Module:
        """The norm before the residual sum: ``zero_init_residual`` zeroes its scale."""
        return self.layer[-1].normalization


class BasicLayer(_ResidualLayer):
    """Two 3x3 convolutions (ResNet-18/34). The first carries the stride and the previous dilation; the second
    is dilated too, except under mmdet's and mmseg's ``dilation_rule``."""

    @staticmethod
    def main_branch(
        config: ResNetConfig, in_channels: int, out_channels: int, stride: int, dilation: int, first_dilation: int
    ) -> nn.Sequential:
        norm = config.norm_layer
        return nn.Sequential(
            ConvLayer(in_channels, out_channels, stride=stride, dilation=first_dilation, norm_layer=norm),
            ConvLayer(
                out_channels,
                out_channels,
                dilation=dilation if config.dilation_rule == "timm" else 1,
                norm_layer=norm,
                activation=None,
            ),
        )


class BottleNeckLayer(_ResidualLayer):
    """1x1 reduce, 3x3 (grouped, strided: v1.5), 1x1 expand.

    ``downsample_in_bottleneck`` moves the stride to the first 1x1 convolution (ResNet v1).
    """

    @staticmethod
    def main_branch(
        config: ResNetConfig, in_channels: int, out_channels: int, stride: int, dilation: int, first_dilation: int
    ) -> nn.Sequential:
        norm = config.norm_layer
        width = config.bottleneck_width(out_channels)
        reduce_stride, conv_stride = (stride, 1) if config.downsample_in_bottleneck else (1, stride)
        return nn.Sequential(
            ConvLayer(in_channels, width, kernel_size=1, stride=reduce_stride, norm_layer=norm),
            ConvLayer(width, width, stride=conv_stride, dilation=first_dilation, groups=config.groups, norm_layer=norm),
            ConvLayer(width, out_channels, kernel_size=1, norm_layer=norm, activation=None),
        )
