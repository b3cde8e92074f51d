"""Deployment graphs: ``torch.export`` programs and ONNX files with dynamic batch, height and width.

Height and width are dynamic in multiples of the deepest stride the model computes, so every feature
map is an exact fraction of the input and no size needs a guard. onnx and onnxruntime (the ``onnx`` extra) are
imported by the functions that need them, so the ``torch.export`` helpers work without them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim

from .backbone import ResNetBackbone
from .trunk import ResNetTrunk


def dynamic_shapes(model: nn.Module, max_side: int = 4096, max_batch: int = 1024) -> dict[str, dict[int, Any]]:
    """``dynamic_shapes`` for ``torch.export.export(model, (pixel_values,), dynamic_shapes=...)``: any batch,
    and heights and widths that are multiples of ``model.size_divisibility`` (the deepest stride it
    computes) up to ``max_side``.

    The example ``pixel_values`` needs a batch of 2 or more: torch.export specialises sizes 0 and 1.

    Args:
        model: a ``ResNetBackbone``, or a neck on one with ``size_divisibility`` (the torchvision adapter's FPN).
        max_side: the largest height and width the program accepts.
        max_batch: the largest batch.

    Returns:
        ``{"pixel_values": {dimension: Dim}}``.
    """
    divisor = model.size_divisibility
    height = Dim("height_blocks", min=1, max=max_side // divisor)
    width = Dim("width_blocks", min=1, max=max_side // divisor)
    return {"pixel_values": {0: Dim("batch", min=1, max=max_batch), 2: divisor * height, 3: divisor * width}}


def _size_divisibility(model: nn.Module) -> int:
    """``model``'s own ``size_divisibility`` (a backbone or a neck), else that of the trunk inside it."""
    return getattr(model, "size_divisibility", None) or _backbone_of(model).size_divisibility


class FeatureMaps(nn.Module):
    """A model's outputs as a flat tuple, in order: the form ONNX outputs take.

    Args:
        model: a backbone (returning ``BackboneOutput``), a neck or a segmenter returning a dict of tensors, or
            a model returning one tensor (such as a segmenter's logits).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.size_divisibility = _size_divisibility(model)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        output = self.model(pixel_values)
        if isinstance(output, Tensor):
            return (output,)
        return tuple(output.values()) if isinstance(output, dict) else tuple(output.feature_maps)


def output_names(model: nn.Module) -> list[str]:
    """ONNX output names, one per feature map.

    Args:
        model: a ``ResNetBackbone``, or a neck that reports its levels by ``output_shape()``.

    Returns:
        The backbone's ``out_features``, or the neck's level names.
    """
    if isinstance(model, ResNetBackbone):
        return list(model.out_features)
    return list(model.output_shape())


def _whole_model_output_names(model: nn.Module, example: Tensor) -> list[str]:
    """The keys of a model's dict output, or ``["logits"]`` for a model returning one tensor."""
    with torch.no_grad():
        output = model.eval()(example)
    if isinstance(output, Tensor):
        return ["logits"]
    if isinstance(output, dict) and all(isinstance(value, Tensor) for value in output.values()):
        return list(output)
    raise ValueError(
        f"export_model_onnx exports a model returning a tensor or a dict of tensors (a segmenter's logits); "
        f"{type(model).__name__} returned a {type(output).__name__}. Export a backbone or a neck with export_onnx."
    )


# torch's exporter builds opset-18 graphs and onnx's version converter takes them down to 16; below that it has no
# adapter for Identity and the model would silently stay at 18. The highest is the newest the installed onnx knows.
LOWEST_OPSET = 16
# Weights above this size go to an external data file: protobuf cannot hold a message over 2 GB, and the graph
# needs room beside the weights (torch's exporter uses the same threshold).
EXTERNAL_DATA_THRESHOLD = 3 * 2**29  # 1.5 GiB


def supported_opsets() -> range:
    """The ONNX opset versions ``export_onnx`` writes exactly as asked (needs the ``onnx`` extra).

    Returns:
        From ``LOWEST_OPSET`` to the newest the installed onnx knows.
    """
    import onnx

    return range(LOWEST_OPSET, onnx.defs.onnx_opset_version() + 1)


def check_opset(opset: int | None) -> None:
    """Refuse, before any work, an opset ``export_onnx`` cannot write.

    Args:
        opset: the version asked for; ``None`` (the exporter's default) always passes.

    Raises:
        ValueError: ``opset`` is not one of :func:`supported_opsets`, which the message lists.
    """
    supported = supported_opsets()
    if opset is not None and opset not in supported:
        raise ValueError(
            f"ONNX opset {opset} is not supported: the exporter writes opsets {supported[0]} to {supported[-1]} "
            f"(torch's exporter builds opset 18 and onnx converts it down to {LOWEST_OPSET} at the lowest); "
            f"pick one of those or leave the opset unset"
        )


def external_data_path(path: str | os.PathLike) -> Path:
    """Where ``export_onnx`` puts the weights of a model too large to embed.

    Args:
        path: the ``.onnx`` file.

    Returns:
        The data file beside it: ``model.onnx`` -> ``model.onnx.data``.
    """
    path = Path(path)
    return path.with_name(f"{path.name}.data")


def export_onnx(
    model: nn.Module | str | os.PathLike,
    path: str | os.PathLike,
    *,
    out_features: list[str] | None = None,
    opset: int | None = None,
) -> Path:
    """Write ``model`` as one self-contained ONNX file: one input ``pixel_values`` and one named output per feature
    map, with dynamic batch, height and width.

    The weights are embedded, so the file can be copied alone. Only a model whose weights exceed
    ``EXTERNAL_DATA_THRESHOLD`` (protobuf's 2 GB limit) keeps them in ``external_data_path(path)``
    (``model.onnx.data`` beside ``model.onnx``), which must travel with it. The files are written in a temporary
    folder beside ``path``, checked with ``onnx.checker``, and renamed into place only then: they appear complete or
    not at all, and nothing else is left behind, whether the export succeeds or fails.

    Args:
        model: a ``ResNetBackbone``, a neck on one that reports its levels by ``output_shape()`` (such as
            the feature pyramid of the torchvision adapter), or a preset / anything ``from_pretrained`` accepts.
        path: the ``.onnx`` file to write (replaced if it exists).
        out_features: the stages to output, for a backbone.
        opset: the ONNX opset version, one of ``supported_opsets()`` (default: the exporter's).

    Returns:
        ``path``.

    Raises:
        ValueError: an unsupported ``opset``, ``out_features`` for a neck, or a source that is none of those
            ``from_pretrained`` takes.
        OSError: ``path``'s folder cannot be written.
    """
    check_opset(opset)
    if not isinstance(model, nn.Module):
        model = ResNetBackbone.load(model, **({"out_features": out_features} if out_features else {}))
    elif out_features is not None:
        if not isinstance(model, ResNetBackbone):
            raise ValueError("out_features applies to a ResNetBackbone; the FPN's outputs are fixed when it is built.")
        model.out_features = out_features
    return _export_dense(FeatureMaps(model.eval()), path, output_names(model), opset)


def export_model_onnx(model: nn.Module, path: str | os.PathLike, *, opset: int | None = None) -> Path:
    """Write a whole model on this backbone, such as a segmenter, as one ONNX file with input ``pixel_values``
    (dynamic batch, and heights and widths in multiples of its backbone's ``size_divisibility``), as
    :func:`export_onnx` writes a backbone: checked, complete or not at all.

    Args:
        model: a model holding a ``ResNetTrunk`` whose forward takes a batch of images and returns a tensor
            (output ``"logits"``) or a dict of tensors (one output per key: torchvision's ``"out"``, ``"aux"``);
            it is put in eval mode.
        path: the ``.onnx`` file to write (replaced if it exists).
        opset: the ONNX opset version, one of ``supported_opsets()`` (default: the exporter's).

    Returns:
        ``path``.

    Raises:
        ValueError: an unsupported ``opset``, a model without a ``ResNetTrunk``, or another kind of output.
        OSError: ``path``'s folder cannot be written.
    """
    check_opset(opset)
    wrapped = FeatureMaps(model.eval())
    return _export_dense(wrapped, path, _whole_model_output_names(model, _example(wrapped)), opset)


def _example(model: FeatureMaps) -> Tensor:
    """A batch of 2 (torch.export specialises 0 and 1), of unequal height and width (so neither is fixed)."""
    divisor = model.size_divisibility
    return torch.randn(2, _backbone_of(model).config.num_channels, 2 * divisor, 3 * divisor)


def _export_dense(model: FeatureMaps, path: str | os.PathLike, names: list[str], opset: int | None) -> Path:
    """Export with torch's dynamo exporter (dynamic batch, height and width) and save checked."""
    program = torch.onnx.export(
        model.eval(),
        (_example(model),),
        input_names=["pixel_values"],
        output_names=names,
        opset_version=opset,
        dynamo=True,
        dynamic_shapes=dynamic_shapes(model),
        verbose=False,
    )
    initializers = program.model.graph.initializers.values()
    weight_bytes = sum(value.const_value.nbytes for value in initializers if value.const_value is not None)
    external_data = weight_bytes > EXTERNAL_DATA_THRESHOLD
    return save_checked_onnx(lambda staged: program.save(staged, external_data=external_data), path, opset)


def save_checked_onnx(write: Callable[[Path], object], path: str | os.PathLike, opset: int | None) -> Path:
    """Write an ONNX file so that it appears complete and checked, or not at all: ``write`` saves it in a
    temporary folder beside ``path``, ``onnx.checker`` checks it, and only then are its data file (if any) and
    the model renamed into place; the temporary folder goes in every case. For exporters other than
    :func:`export_onnx`'s, such as an adapter's whole-detector export.

    Args:
        write: saves the model to the path it is given (with its weights in ``external_data_path`` of that
            path, if it keeps them apart).
        path: the ``.onnx`` file to write (replaced if it exists).
        opset: the opset asked for; the written file must have it (``None``: any).

    Returns:
        ``path``.

    Raises:
        ValueError: the file has another opset than ``opset`` (nothing is written).
        onnx.checker.ValidationError: the file is not valid ONNX (nothing is written).
    """
    import onnx

    path = Path(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        staged = staging / path.name
        write(staged)
        onnx.checker.check_model(staged)  # by path: it reads external data and models over 2 GB
        opsets = onnx.load(staged, load_external_data=False).opset_import
        written = next(op.version for op in opsets if op.domain in ("", "ai.onnx"))
        if opset is not None and written != opset:
            raise ValueError(f"the ONNX exporter wrote opset {written} instead of {opset}; nothing was written")
        if external_data_path(staged).exists():
            os.replace(external_data_path(staged), external_data_path(path))
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def onnx_max_abs_diff(path: str | os.PathLike, model: nn.Module, sizes: list[tuple[int, int, int]]) -> float:
    """The largest difference between onnxruntime's and PyTorch's outputs (needs the ``onnx`` extra).

    Args:
        path: the ONNX file written from ``model``.
        model: the PyTorch model.
        sizes: ``(batch, height, width)`` of each random input to compare on.

    Returns:
        The largest absolute difference over every output of every input.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    channels = _backbone_of(model).config.num_channels
    worst = 0.0
    for batch, height, width in sizes:
        pixel_values = torch.randn(batch, channels, height, width)
        with torch.no_grad():
            expected = FeatureMaps(model.eval())(pixel_values)
        actual = session.run(None, {"pixel_values": pixel_values.numpy()})
        worst = max([worst, *((torch.from_numpy(a) - e).abs().max().item() for a, e in zip(actual, expected))])
    return worst


def _backbone_of(model: nn.Module) -> ResNetTrunk:
    backbone = next((m for m in model.modules() if isinstance(m, ResNetTrunk)), None)
    if backbone is None:
        raise ValueError(f"{type(model).__name__} holds no ResNetBackbone (nor any ResNetTrunk).")
    return backbone
