"""Smallest building blocks: activations, norm layers and the conv-norm-activation unit."""

from __future__ import annotations

import torch
from torch import nn

from .config import GROUP_NORM_GROUPS
from .torch_compat import BatchNormBase


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (all buffers): torchvision's ``FrozenBatchNorm2d``,
    with its state-dict keys (a checkpoint's ``num_batches_tracked`` is ignored on load) and its arithmetic,
    bit for bit: ``x * scale + shift``. Unlike the BatchNorm kernel, that multiply-add keeps no copy of its
    input for the backward pass, which is what fine-tuning a frozen-norm detector spends its memory on.
    Unlike torchvision's, it keeps the input's dtype (bf16/fp16 in, bf16/fp16 out).

    Args:
        num_features: the channels.
        eps: added to the variance, as BatchNorm's.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale.to(x.dtype) + shift.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


NORM_TYPES = (BatchNormBase, nn.GroupNorm, FrozenBatchNorm2d)


def make_norm(norm_layer: str, channels: int) -> nn.Module:
    """A norm layer of the kind named by ``ResNetConfig.norm_layer``."""
    if norm_layer == "batch":
        return nn.BatchNorm2d(channels)
    if norm_layer == "frozen_batch":
        return FrozenBatchNorm2d(channels)
    if norm_layer == "sync_batch":
        return nn.SyncBatchNorm(channels)
    if norm_layer == "group":
        return nn.GroupNorm(GROUP_NORM_GROUPS, channels)
    raise ValueError(f"Unknown norm_layer {norm_layer!r}.")


def make_activation(hidden_act: str) -> nn.Module:
    """The activation named by ``ResNetConfig.hidden_act``, numerically as transformers' ``ACT2FN``."""
    if hidden_act == "relu":
        # In place is safe: every ReLU here follows a norm layer or the residual sum, whose inputs are
        # not needed by autograd.
        return nn.ReLU(inplace=True)
    if hidden_act == "gelu":
        return nn.GELU()
    if hidden_act == "gelu_new":
        return nn.GELU(approximate="tanh")
    if hidden_act in ("silu", "swish"):
        return nn.SiLU()
    if hidden_act == "selu":
        return nn.SELU()
    raise ValueError(f"Unknown hidden_act {hidden_act!r}.")


class ConvLayer(nn.Module):
    """Convolution, norm, optional activation: transformers' ``ResNetConvLayer`` (same parameter names)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        norm_layer: str = "batch",
        activation: str | None = "relu",
    ) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=dilation * (kernel_size - 1) // 2,
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        self.normalization = make_norm(norm_layer, out_channels)
        self.activation = make_activation(activation) if activation is not None else nn.Identity()

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.activation(self.normalization(self.convolution(hidden_state)))
