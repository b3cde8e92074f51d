"""Deployment graphs: ``torch.export`` programs and ONNX files with dynamic batch, height and width.

Height and width are dynamic in multiples of the deepest stride the model computes, so every feature
map is an exact fraction of the input and no size needs a guard.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim

from ..backbone import ResNetBackbone


def dynamic_shapes(model: nn.Module, max_side: int = 4096, max_batch: int = 1024) -> dict[str, dict[int, Any]]:
    """``dynamic_shapes`` for ``torch.export.export(model, (pixel_values,), dynamic_shapes=...)``: any batch,
    and heights and widths that are multiples of ``model.size_divisibility`` (the deepest stride it
    computes) up to ``max_side``.

    The example ``pixel_values`` needs a batch of 2 or more: torch.export specialises sizes 0 and 1.
    """
    divisor = model.size_divisibility
    height = Dim("height_blocks", min=1, max=max_side // divisor)
    width = Dim("width_blocks", min=1, max=max_side // divisor)
    return {"pixel_values": {0: Dim("batch", min=1, max=max_batch), 2: divisor * height, 3: divisor * width}}


class FeatureMaps(nn.Module):
    """A model's feature maps as a flat tuple, in order: the form ONNX outputs take."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        output = self.model(pixel_values)
        return tuple(output.values()) if isinstance(output, dict) else tuple(output.feature_maps)


def output_names(model: nn.Module) -> list[str]:
    """ONNX output names: the backbone's ``out_features``, or the FPN's level names."""
    if isinstance(model, ResNetBackbone):
        return list(model.out_features)
    return list(model.output_shape())


def export_onnx(
    model: nn.Module | str | os.PathLike,
    path: str | os.PathLike,
    *,
    out_features: list[str] | None = None,
    opset: int | None = None,
) -> Path:
    """Write ``model`` as ONNX: one input ``pixel_values`` and one named output per feature map, with
    dynamic batch, height and width. ``model``: a ``ResNetBackbone``, the torchvision adapter's
    ``ResNetFPN``, or a preset / anything ``from_pretrained`` accepts. The file appears complete or not at all.
    """
    if not isinstance(model, nn.Module):
        model = ResNetBackbone.load(model, **({"out_features": out_features} if out_features else {}))
    elif out_features is not None:
        if not isinstance(model, ResNetBackbone):
            raise ValueError("out_features applies to a ResNetBackbone; the FPN's outputs are fixed when it is built.")
        model.out_features = out_features
    model = model.eval()
    divisor = model.size_divisibility
    example = torch.randn(2, _backbone_of(model).config.num_channels, 2 * divisor, 3 * divisor)
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        torch.onnx.export(
            FeatureMaps(model).eval(),
            (example,),
            temporary,
            input_names=["pixel_values"],
            output_names=output_names(model),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic_shapes(model),
            verbose=False,
        )
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def onnx_max_abs_diff(path: str | os.PathLike, model: nn.Module, sizes: list[tuple[int, int, int]]) -> float:
    """The largest difference between onnxruntime's and PyTorch's outputs over inputs of ``sizes``
    (batch, height, width)."""
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


def _backbone_of(model: nn.Module) -> ResNetBackbone:
    backbone = next((m for m in model.modules() if isinstance(m, ResNetBackbone)), None)
    if backbone is None:
        raise ValueError(f"{type(model).__name__} holds no ResNetBackbone.")
    return backbone
