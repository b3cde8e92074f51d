"""Convolutions whose CPU calls run on weights reordered once into oneDNN's blocked layout.

A plain ``nn.Conv2d`` on a CPU hands oneDNN its weight in PyTorch's layout, and oneDNN reorders it into its own
on every call: a large share of a ResNet-50's time for one small image, where the convolutions themselves are
short. Inductor's frozen code reorders each weight once; :class:`PrepackedConv2d` does the same
without compiling, so the uncompiled fast path gets it too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .torch_compat import onednn_convolution_ops

_PACKED_DTYPES = (torch.float32, torch.bfloat16)


class PrepackedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters, same state dict) that, for inference on a CPU, runs on its weight
    reordered for oneDNN at its first call and again only when the weight changes (in place, or by ``.to()``).

    Elsewhere it is the plain convolution: on another device or dtype, with gradients, under autocast, and while
    ``torch.compile``, ``torch.export`` or TorchScript traces it, since those packs weights themselves or need
    the standard operator. Its output is channels_last, as a convolution with channels_last weights gives.
    """

    _packed: torch.Tensor | None = None
    _packed_for: tuple[Any, ...] | None = None  # what it was packed from: see _weight_state

    @classmethod
    def from_conv(cls, convolution: nn.Conv2d) -> PrepackedConv2d:
        """A ``PrepackedConv2d`` sharing ``convolution``'s parameters (and mode)."""
        prepacked = cls(
            convolution.in_channels,
            convolution.out_channels,
            convolution.kernel_size,
            stride=convolution.stride,
            padding=convolution.padding,
            dilation=convolution.dilation,
            groups=convolution.groups,
            bias=convolution.bias is not None,
            padding_mode=convolution.padding_mode,
            device="meta",
        )
        prepacked.weight, prepacked.bias = convolution.weight, convolution.bias
        return prepacked.train(convolution.training)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._runs_packed(input):
            return super().forward(input)
        reorder, convolve = onednn_convolution_ops()
        geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        weight_state = self._weight_state()
        if weight_state != self._packed_for:
            self._packed = reorder(self.weight, *geometry, list(input.shape))
            self._packed_for = weight_state
        return convolve(input, self._packed, self.bias, *geometry, "none", [], "")

    def _weight_state(self) -> tuple[Any, ...]:
        """Where the weight lives, its dtype and how often it was changed in place (a tensor created in
        inference mode keeps no such count)."""
        weight = self.weight
        return weight.data_ptr(), weight.dtype, None if weight.is_inference() else weight._version

    def _runs_packed(self, input: torch.Tensor) -> bool:
        weight = self.weight
        return (
            not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and type(input) is torch.Tensor  # not a fake, traced or subclassed tensor
            and input.ndim == 4
            and input.device.type == weight.device.type == "cpu"
            and input.dtype == weight.dtype in _PACKED_DTYPES
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and not (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad))
            and not torch.is_autocast_enabled("cpu")
        )

    def __getstate__(self) -> dict[str, Any]:
        # A packed weight is opaque to copy and pickle: copies pack their own at their first call.
        state = super().__getstate__()
        state.pop("_packed", None)
        state.pop("_packed_for", None)
        return state


def prepack_convolutions(model: nn.Module) -> None:
    """Make each plain ``nn.Conv2d`` of ``model`` a :class:`PrepackedConv2d`, in place (subclasses, whose
    ``forward`` may differ, are kept); nothing where this torch has no oneDNN."""
    if onednn_convolution_ops() is None:
        return
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d:
                setattr(parent, name, PrepackedConv2d.from_conv(child))
