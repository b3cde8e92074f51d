"""Inference fast path: BatchNorm folded into the convolutions, channels_last weights, optional low precision,
and optional inductor compilation with frozen weights.

The optimised model is the same class running the same ``forward``: only its modules change (each
conv-norm pair becomes one convolution with a bias), so outputs, attributes and metadata stay as they were.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .blocks import ShortCut
from .layers import ConvLayer, FrozenBatchNorm2d
from .trunk import ResNetPreTrainedModel

# Norms that are a per-channel affine map in eval mode; GroupNorm depends on each input, so it stays.
FOLDABLE_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Accuracy against the unoptimised model: max abs difference as a fraction of the feature scale.
FLOAT32_TOLERANCE = 1e-4
LOW_PRECISION_TOLERANCE = 5e-2

Model = TypeVar("Model", bound=ResNetPreTrainedModel)


def optimize_for_inference(
    backbone: Model,
    *,
    dtype: torch.dtype | None = None,
    channels_last: bool = True,
    compile: bool = False,
    inplace: bool = False,
) -> Model:
    """A copy of ``backbone`` (``ResNetBackbone``, ``ResNetModel`` or ``ResNetForImageClassification``)
    that computes the same outputs faster, in eval mode and without gradients.

    - BatchNorm (also frozen and sync) is folded into the preceding convolution; GroupNorm is kept.
    - ``channels_last``: weights in channels_last memory format; inputs may be either format.
    - ``dtype`` (``torch.bfloat16`` or ``torch.float16``): parameters are cast, floating-point inputs are
      cast to it inside, and outputs come out in it. Accuracy: float32 outputs differ from the original
      by at most 1e-4 times the feature scale (the largest absolute value of each output); bfloat16 and
      float16 by at most 5e-2 times.
    - ``compile``: ``torch.compile`` with inductor's freezing (weights become constants, so later changes
      to the parameters are not seen), static shapes (each new input shape compiles once) and no autograd.
      On CUDA it also records CUDA graphs: an output is overwritten by the next call, so clone what you
      keep.
    - ``inplace``: modify ``backbone`` itself instead of a copy (saves memory for large models).

    The result keeps the original's class, attributes and output type, but its state dict (convolutions
    with biases, no norms) is not a checkpoint of the original layout: save the original instead.
    """
    if not isinstance(backbone, ResNetPreTrainedModel):
        raise TypeError(
            "optimize_for_inference takes a ResNetBackbone, ResNetModel or ResNetForImageClassification, got "
            f"{type(backbone).__name__}. Pass the model itself, before any torch.compile or wrapper."
        )
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be None or one of {', '.join(map(str, DTYPES))}, got {dtype}.")
    model = backbone if inplace else copy.deepcopy(backbone)
    model.eval().requires_grad_(False)
    _fold_batch_norms(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if dtype is not None and dtype != torch.float32:
        model.to(dtype)
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        # Compiled, this one cast would be a graph of its own, with guards checked per call.
        cast = torch.compiler.disable(partial(_cast_pixel_values, dtype=dtype, memory_format=memory_format))
        model.register_forward_pre_hook(cast, with_kwargs=True)
    if compile:
        compile_for_inference(model)
    return model


def compile_for_inference(model: nn.Module) -> None:
    """Compile ``model`` in place, as ``nn.Module.compile`` does, with static shapes and inductor's freezing
    (the weights become constants, folded and prepacked for the convolution kernels); on CPU also with a
    C++ wrapper (no Python between the kernels: about 8% on ResNet-50), on CUDA with CUDA graphs, which
    remove the launch cost of each kernel.

    Freezing needs two things at trace time (the first call for each shape): gradients disabled, and the
    global inductor config, which Dynamo reads (``torch.compile(options=...)`` only reaches inductor). So
    every call of this model runs without autograd and under these settings; the rest of the process keeps
    its own.
    """
    on_cuda = next(model.parameters()).is_cuda
    settings = torch._inductor.config.patch(
        {"freezing": True, "cpp_wrapper": not on_cuda, "triton.cudagraphs": on_cuda}
    )
    model._compiled_call_impl = settings(torch.no_grad()(torch.compile(model._call_impl, dynamic=False)))


def _fold_batch_norms(model: nn.Module) -> None:
    """Replace each conv-norm pair by one convolution with the norm's scale and shift in its weights."""
    for module in list(model.modules()):
        if isinstance(module, (ConvLayer, ShortCut)) and isinstance(module.normalization, FOLDABLE_NORMS):
            module.convolution = fuse_conv_bn_eval(module.convolution, module.normalization)
            module.normalization = nn.Identity()


def _cast_pixel_values(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    dtype: torch.dtype,
    memory_format: torch.memory_format,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Forward pre-hook: 4-D floating-point ``pixel_values`` in the model's dtype and memory format, in one
    copy (anything else is left for ``forward``'s input check to reject)."""

    def cast(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim == 4:
            return value.to(dtype=dtype, memory_format=memory_format)
        return value

    if args:
        return (cast(args[0]), *args[1:]), kwargs
    return args, {name: cast(value) if name == "pixel_values" else value for name, value in kwargs.items()}
