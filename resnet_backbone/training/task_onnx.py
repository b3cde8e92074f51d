"""A fine-tuned detector or segmenter (a folder of :mod:`.task_model`) as one ONNX file, checked with onnxruntime.

Detectors go through the torchvision adapter's ``export_detector_onnx`` (one image in [0, 1] in, detections out);
smp segmenters through the core's ``export_model_onnx`` (normalised ``pixel_values`` in, ``logits`` out).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..adapters.torchvision_onnx import export_detector_onnx, onnx_detection_differences
from ..export import export_model_onnx, onnx_max_abs_diff
from .task_model import TASK_NAME, TaskSpec, backbone_of


def is_task_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a fine-tuned model folder (it holds a ``task.json``) rather than a backbone source.

    Args:
        path: what the user named.

    Returns:
        ``True`` for a folder with ``task.json``.
    """
    return (Path(path) / TASK_NAME).is_file()


def export_task_model_onnx(model: nn.Module, spec: TaskSpec, path: str | os.PathLike, *, opset: int | None) -> Path:
    """Write the whole fine-tuned model as one checked ONNX file, complete or not at all.

    Args:
        model: the model :func:`.task_model.load_task_model` rebuilt.
        spec: its spec.
        path: the ``.onnx`` file to write (replaced if it exists).
        opset: the ONNX opset version (default: the exporter's).

    Returns:
        ``path``.

    Raises:
        ValueError: an opset the exporter cannot write.
    """
    if spec.task == "detection":
        return export_detector_onnx(model, path, opset=opset)
    return export_model_onnx(model, path, opset=opset)


def onnx_parity_report(path: str | os.PathLike, model: nn.Module, spec: TaskSpec) -> list[str]:
    """onnxruntime's outputs against eager PyTorch's at two image sizes near the training size, as lines to print.

    Args:
        path: the file :func:`export_task_model_onnx` wrote from ``model``.
        model: the model.
        spec: its spec.

    Returns:
        What the file takes and gives, then the differences.
    """
    side = spec.image_size
    if spec.task == "detection":
        sizes = [(side, side), (side * 3 // 4, side)]
        differences = onnx_detection_differences(path, model, sizes)
        outputs = ", ".join(["boxes", "labels", "scores"] + (["masks"] if "masks" in differences[0] else []))
        lines = [f"input image: one (3, height, width) image in [0, 1] of any size; outputs {outputs} per detection"]
        for (height, width), found in zip(sizes, differences):
            measures = ", ".join(f"{name} {value:.3g}" for name, value in found.items())
            lines.append(f"onnxruntime vs PyTorch at {height}x{width}: {measures}")
        return lines
    divisor = backbone_of(model).size_divisibility
    side = max(divisor, round(side / divisor) * divisor)
    sizes = [(1, side, side), (2, side + divisor, max(divisor, side - divisor))]
    difference = onnx_max_abs_diff(path, model, sizes)
    return [
        f"input pixel_values (normalised as in training), output logits: dynamic batch, height and width in "
        f"multiples of {divisor}",
        f"onnxruntime vs PyTorch at {sizes} (batch, height, width): max abs difference {difference:.3g}",
    ]
