"""Fast paths. Inference: BatchNorm folded into the convolutions, channels_last weights, optional low
precision, and optional inductor compilation with frozen weights, for a backbone or for a whole detector or
segmenter. Fine-tuning: channels_last and the dense parts compiled.

The optimised model is the same class running the same ``forward``: only its modules change (each
conv-norm pair becomes one convolution with a bias), so outputs, attributes and metadata stay as they were.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .compiled_speed import check_compiled_speed
from .model_parts import (
    declared_dense_parts,
    dense_parts,
    is_foldable_norm,
    register_dense_parts,
    use_inference_modules,
)
from .prepacked import prepack_convolutions
from .pretrained import ResNetPreTrainedModel
from .quantization import computes_int8_natively, load_programs, quantize_parts
from .torch_compat import compile_without_autograd, cpu_computes_bf16_natively, is_compiled_module, tree_map
from .weights.files import mark_optimized_for_inference

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)
# Accuracy against the unoptimised model: max abs difference as a fraction of the feature scale.
FLOAT32_TOLERANCE = 1e-4
LOW_PRECISION_TOLERANCE = 5e-2
# int8's error is relative to each output's spread rather than its largest value: cosine similarity of each
# output with the float model's (a ResNet-50 with random weights and BatchNorm statistics reaches 0.999).
INT8_COSINE_SIMILARITY = 0.999

# This project's models are one dense part as a whole; adapters declare the parts of their frameworks' models.
register_dense_parts(ResNetPreTrainedModel, [""])

Model = TypeVar("Model", bound=nn.Module)
_MODELS_IT_TAKES = (
    "a ResNetBackbone, ResNetModel, ResNetForImageClassification or a whole model around one (e.g. a detector or "
    "segmenter built by an adapter)"
)


def optimize_for_inference(
    model: Model,
    *,
    dtype: torch.dtype | None = None,
    channels_last: bool = True,
    compile: bool | None = None,
    inplace: bool = False,
    parts: Sequence[str] | None = None,
    calibration: Iterable[Any] | None = None,
) -> Model:
    """A copy of ``model`` that computes the same outputs faster, in eval mode and without gradients.

    - BatchNorm (also frozen and sync, and the norms an adapter declares foldable) is folded into the
      convolution it follows, wherever it sits; GroupNorm is kept. A BatchNorm that follows no convolution is
      left as it is, with a warning naming it.
    - A module whose class has a faster stand-in declared (:func:`register_inference_module`, e.g. an
      adapter's faster RoI pooling) is replaced by it.
    - ``channels_last``: weights in channels_last memory format; inputs may be either format. On a CPU each
      plain convolution also reorders its weight into oneDNN's layout once, at its first call, instead of
      at every call (see :class:`~resnet_backbone.prepacked.PrepackedConv2d`): one more copy of the weights
      in memory, for less time per call, most for small inputs.
    - ``dtype`` (``torch.bfloat16`` or ``torch.float16``): a backbone's parameters are cast, floating-point
      inputs are cast to it inside, and outputs come out in it. In a whole model only the dense parts (see
      :func:`dense_parts`) run in ``dtype``; their outputs come back in float32, so boxes, anchors and
      post-processing stay float32. Accuracy: float32 outputs differ from the original by at most 1e-4
      times the feature scale (the largest absolute value of each output); bfloat16 and float16 by at most
      5e-2 times. bfloat16 on a CPU without native bf16 arithmetic is slower than float32: a warning says so.
    - ``dtype=torch.int8`` (CPU only): static post-training quantization of the dense parts with torchao's
      PT2E flow and ``X86InductorQuantizer`` (int8 activations, per-channel int8 weights), calibrated on
      ``calibration`` and compiled (the int8 kernels are inductor's); everything else stays float32,
      and outputs come out in float32. Each output's cosine similarity with the float model's is about 0.999
      or better. Fast where the CPU has VNNI (AVX512-VNNI, AVX-VNNI or AMX-INT8); elsewhere a warning says
      so. Keep the result with :func:`~resnet_backbone.quantization.save_quantized`.
    - ``compile``: ``torch.compile`` of each dense part (of a backbone: the whole model) with inductor's
      freezing (weights become constants, so later changes to the parameters are not seen), static shapes
      (each new input shape compiles once) and no autograd; on a CPU also with the C++ wrapper (see
      :func:`compile_for_inference`). On CUDA it also records CUDA graphs: an output is overwritten by the
      next call, so clone what you keep. On a CPU, if its first calls of an input shape run clearly slower
      than the uncompiled model, a :class:`CompiledSlowerWarning` says so once, with the fix.

    The dense parts of a whole model come from the adapter that builds or recognises its class (importing
    ``resnet_backbone.adapters.<framework>`` declares them, see :func:`register_dense_parts`), or from
    ``parts``. A model whose class declares none is one dense part as a whole: right for a plain network, not
    for a detector whose post-processing would then run in ``dtype`` and be compiled with static shapes, so
    with ``dtype`` or ``compile`` a warning says so. The library cannot tell the two apart by itself
    without naming other libraries' classes, and a warning that names the fix keeps a plain network working.

    Args:
        model: a ``ResNetBackbone``, ``ResNetModel`` or ``ResNetForImageClassification``; or a whole model
            around one (a detector or segmenter whose adapter is imported, or one given ``parts``), called
            exactly as before.
        dtype: ``None`` (float32), ``torch.bfloat16``, ``torch.float16`` or ``torch.int8``.
        channels_last: weights in channels_last memory format (prepacked for oneDNN on a CPU).
        compile: compile each dense part with inductor and frozen weights. Default: for int8 only, whose
            uncompiled program computes int8 arithmetic in float32 (for checking accuracy, not for speed).
        inplace: modify ``model`` itself instead of a copy (saves memory for large models).
        parts: names of the submodules to run in ``dtype`` and compile, instead of the declared dense parts
            (``[""]``: the whole model).
        calibration: for int8 only, and required there: an iterable of inputs as the model takes them, one
            call each (e.g. a few dozen of your images, in batches for a backbone or as lists of images for a
            torchvision detector), at the sizes you will run. The model is quantized from the first one's
            sizes, with its batch doubled; any other size then compiles once.

    Returns:
        The optimised model. It keeps the original's class, attributes and output type, but its state dict
        (convolutions with biases, no norms) is not a checkpoint of the original layout: ``save_pretrained``
        and the exports refuse it; save the original instead.

    Raises:
        TypeError: ``model`` is not a module, is already wrapped by ``torch.compile``, or has no convolution.
        ValueError: ``dtype`` is not one of the four above, ``parts`` names no submodule of ``model``,
            ``calibration`` is missing for int8 (or given for another dtype), or int8 is asked on a GPU.
        ImportError: int8 without torchao installed.

    Example::

        >>> import torch
        >>> from resnet_backbone import ResNetBackbone, optimize_for_inference
        >>> backbone = ResNetBackbone.from_preset("resnet18", depths=[1, 1, 1, 1]).eval()
        >>> fast = optimize_for_inference(backbone)
        >>> images = torch.randn(1, 3, 64, 64)
        >>> torch.allclose(fast(images).feature_maps[0], backbone(images).feature_maps[0], rtol=1e-3, atol=1e-4)
        True
    """
    if not isinstance(model, nn.Module) or is_compiled_module(model):
        raise TypeError(
            f"optimize_for_inference takes {_MODELS_IT_TAKES}, got {type(model).__name__}. Pass the model itself, "
            "before any torch.compile or wrapper."
        )
    if not any(isinstance(module, nn.Conv2d) for module in model.modules()):
        raise TypeError(
            f"optimize_for_inference found nothing to optimise in {type(model).__name__}: it has no convolution. It "
            f"takes {_MODELS_IT_TAKES}."
        )
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be None or one of {', '.join(map(str, DTYPES))}, got {dtype}.")
    int8 = dtype == torch.int8
    compile = int8 if compile is None else compile
    _check_calibration(int8, calibration)
    low_precision = dtype in (torch.bfloat16, torch.float16)
    part_names = list(dense_parts(model, parts))
    if low_precision or int8 or compile:
        what = " and ".join([f"run in {dtype}"] * (low_precision or int8) + ["compiled"] * compile)
        _warn_if_undeclared(model, parts, "optimize_for_inference", what)
    device = next(model.parameters(), torch.empty(0)).device
    if dtype == torch.bfloat16 and not computes_bf16_natively(device):
        warnings.warn(
            f"This {device.type} has no native bfloat16 arithmetic (no AVX512-BF16 or AMX on a CPU): bfloat16 "
            "runs slower than float32 here. Leave dtype at None for speed.",
            stacklevel=2,
        )
    if int8:
        _check_int8_device(device)
    model = _folded(model, inplace=inplace, channels_last=channels_last)
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    whole_backbone = isinstance(model, ResNetPreTrainedModel)
    if int8:
        quantize_parts(model, part_names, calibration)
    for part in map(model.get_submodule, part_names):
        if low_precision:
            part.to(dtype)
            # Compiled, these casts would be graphs of their own, with guards checked per call.
            cast = partial(_cast_inputs, dtype=dtype, memory_format=memory_format)
            part.register_forward_pre_hook(torch.compiler.disable(cast), with_kwargs=True)
            if not whole_backbone:
                part.register_forward_hook(torch.compiler.disable(_outputs_in_float32))
        if compile:
            # An int8 part's uncompiled twin simulates int8 in float32, slower than anything a user would run.
            compile_for_inference(part, check_speed=not int8)
    # Last: the int8 quantizer recognises nn.Conv2d itself, and compiling traces torch's convolution.
    use_inference_modules(model)
    if channels_last:
        prepack_convolutions(model)
    return model


def _check_calibration(int8: bool, calibration: Iterable[Any] | None) -> None:
    if int8 and calibration is None:
        raise ValueError(
            "dtype=torch.int8 needs calibration=...: an iterable of inputs as the model takes them (e.g. a few "
            "dozen of your images, in batches), from which each layer's int8 range is measured."
        )
    if not int8 and calibration is not None:
        raise ValueError("calibration is for dtype=torch.int8 only; the float dtypes need none. Leave it out.")


def _check_int8_device(device: torch.device) -> None:
    if device.type != "cpu":
        raise ValueError(
            f"dtype=torch.int8 runs on a CPU only, the model is on {device}. On a GPU use dtype=torch.bfloat16 or "
            "torch.float16; or move the model to the CPU first."
        )
    if not computes_int8_natively(device):
        warnings.warn(
            "This CPU has no int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8): int8 runs little "
            "or no faster than float32 here. Leave dtype at None, or use bfloat16 where the CPU has it.",
            stacklevel=3,
        )


def load_quantized(model: Model, directory: str | os.PathLike, *, compile: bool = True, inplace: bool = False) -> Model:
    """The int8 model that :func:`~resnet_backbone.quantization.save_quantized` wrote, rebuilt around the float
    model it was quantized from, with no calibration: its norms folded as ``optimize_for_inference`` folds them,
    and each saved part compiled.

    Args:
        model: the float model, with the weights it had when it was quantized (e.g. loaded from its own
            checkpoint).
        directory: the folder ``save_quantized`` wrote.
        compile: compile each part (as ``optimize_for_inference`` does for int8).
        inplace: modify ``model`` itself instead of a copy.

    Returns:
        The int8 model, called as ``model`` is.

    Raises:
        FileNotFoundError: ``directory`` holds no quantized model.
        ValueError: the folder's parts are not ``model``'s, or the model is on a GPU.
    """
    _check_int8_device(next(model.parameters()).device)
    model = _folded(model, inplace=inplace, channels_last=True)
    for name in load_programs(model, directory):
        if compile:
            compile_for_inference(model.get_submodule(name), check_speed=False)
    use_inference_modules(model)
    prepack_convolutions(model)
    return model


def _folded(model: Model, *, inplace: bool, channels_last: bool) -> Model:
    """``model`` (or a copy) in eval mode, without gradients, its norms folded, flagged as no checkpoint."""
    model = model if inplace else copy.deepcopy(model)
    model.eval().requires_grad_(False)
    mark_optimized_for_inference(model)
    _fold_batch_norms(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def compile_for_training(model: nn.Module, *, parts: Sequence[str] | None = None) -> None:
    """The fine-tuning fast path, in place: weights in channels_last, and each dense part of the model (its
    backbone, FPN and convolutional heads, see :func:`dense_parts`) compiled by inductor with
    static shapes, forward and backward; anchors, matching and the losses stay eager. The parameters stay the
    model's own, so frozen ones stay frozen and checkpoints keep their keys. Each new input shape compiles
    once: train at a fixed image size. bf16 autocast comes from ``precision``, as without compiling.

    Args:
        model: a backbone, or a whole model around one whose class an adapter declares dense parts for (as in
            :func:`optimize_for_inference`, a class without a declaration compiles as a whole, with a warning).
        parts: names of the submodules to compile, instead of the declared dense parts (``[""]``: the whole
            model).

    Raises:
        ValueError: ``parts`` names no submodule of ``model``.
    """
    selected = dense_parts(model, parts)
    _warn_if_undeclared(model, parts, "compile_for_training", "compiled")
    model.to(memory_format=torch.channels_last)
    for part in selected.values():
        part.compile(dynamic=False)


def _warn_if_undeclared(model: nn.Module, parts: Sequence[str] | None, caller: str, what: str) -> None:
    if parts is None and declared_dense_parts(model) is None:
        model_class = type(model)
        warnings.warn(
            f"{caller}: no dense parts are declared for {model_class.__name__} ({model_class.__module__}), so the "
            f"whole model is {what}, post-processing included. Import the resnet_backbone adapter of its framework "
            "(resnet_backbone.adapters.<framework>), which declares them, or pass parts=[...]: the names of its "
            "submodules that run dense convolutions on fixed-shape inputs (parts=[''] for the whole model).",
            stacklevel=3,
        )


def computes_bf16_natively(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` has bfloat16 arithmetic units (CUDA with bf16; a CPU with AVX512-BF16 or AMX).

    Elsewhere bfloat16 is emulated through float32 conversions and runs slower than float32, so the fast
    paths use it only where this is true.

    Args:
        device: a device or its name.

    Returns:
        True where bfloat16 is computed natively.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_computes_bf16_natively()


def compile_for_inference(model: nn.Module, *, check_speed: bool = True) -> None:
    """Compile ``model`` in place, as ``nn.Module.compile`` does, with static shapes and inductor's freezing
    (the weights become constants, folded and prepacked for the convolution kernels); on CPU also with a
    C++ wrapper, on CUDA with CUDA graphs, which remove the launch cost of each kernel.

    The C++ wrapper (no Python between the kernels) makes backbones and segmenters faster, at the cost of more
    compile time: a one-off per input shape, so the fast path takes the speed.

    Freezing needs gradients disabled and inductor's global config at trace time, so every call of this model
    runs without autograd and under these settings; the rest of the process keeps its own.

    ``check_speed``: time the first calls of each shape against the uncompiled model (see
    :func:`~resnet_backbone.compiled_speed.check_compiled_speed`).
    """
    on_cuda = next(model.parameters()).is_cuda
    compile_without_autograd(model, {"freezing": True, "cpp_wrapper": not on_cuda, "triton.cudagraphs": on_cuda})
    if check_speed:
        check_compiled_speed(model)


def _fold_batch_norms(model: nn.Module) -> None:
    """Replace each conv-norm pair by one convolution with the norm's scale and shift in its weights, wherever
    the pair sits: in this project's layers, torchvision's and timm's blocks (``conv1`` then ``bn1``), any
    ``nn.Sequential``. A pair is folded only where tracing its parent's ``forward`` shows that the norm reads
    the convolution's output and nothing else does; a parent that cannot be traced folds nothing itself
    (its children are still visited)."""
    for parent in list(model.modules()):
        for convolution_name, norm_name in _conv_norm_pairs(parent):
            convolution, norm = parent.get_submodule(convolution_name), parent.get_submodule(norm_name)
            _replace(parent, convolution_name, fuse_conv_bn_eval(convolution, norm))
            _replace(parent, norm_name, nn.Identity())
    unfolded = [name for name, module in model.named_modules() if is_foldable_norm(module)]
    if unfolded:
        warnings.warn(
            f"optimize_for_inference left {len(unfolded)} norm(s) of {type(model).__name__} unfolded (no "
            f"convolution directly before them): {', '.join(unfolded[:5])}{', ...' if len(unfolded) > 5 else ''}. "
            "They run as before.",
            stacklevel=3,
        )


class _ChildrenAsLeaves(torch.fx.Tracer):
    """Traces one module's own ``forward``, calling its submodules without looking inside them."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True


def _conv_norm_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """(convolution, norm) submodule names of ``parent`` where its ``forward`` feeds the convolution's output
    to the norm alone, each called once."""
    if not any(is_foldable_norm(child) for child in parent.children()):
        return []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _ChildrenAsLeaves().trace(parent)
    except Exception:  # noqa: BLE001  (data-dependent control flow, or anything else tracing cannot follow)
        return []
    calls = [node for node in graph.nodes if node.op == "call_module"]
    times_called = Counter(node.target for node in calls)
    pairs = []
    for node in calls:
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and times_called[source.target] == times_called[node.target] == 1
            and len(source.users) == 1
            and isinstance(parent.get_submodule(source.target), nn.Conv2d)
            and is_foldable_norm(parent.get_submodule(node.target))
        ):
            pairs.append((source.target, node.target))
    return pairs


def _replace(parent: nn.Module, name: str, module: nn.Module) -> None:
    owner_name, _, attribute = name.rpartition(".")
    setattr(parent.get_submodule(owner_name), attribute, module)


def _cast_inputs(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    dtype: torch.dtype,
    memory_format: torch.memory_format,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Forward pre-hook: floating-point tensors (also in lists and dicts) in the part's dtype, 4-D ones in its
    memory format, in one copy each."""

    def cast(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(dtype=dtype, memory_format=memory_format if value.ndim == 4 else torch.preserve_format)
        return value

    return tree_map(cast, args), tree_map(cast, kwargs)


def _outputs_in_float32(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook of a low-precision part of a whole model: what follows it computes in float32."""
    return tree_map(
        lambda value: value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value, output
    )
