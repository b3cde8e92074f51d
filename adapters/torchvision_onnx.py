"""Whole torchvision detectors on this backbone in ONNX: one image in, its detections out, at any image size.

torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``, which the core's ``export_onnx`` uses) cannot
export a whole detector in torch 2.14: ``torch.export`` stops at the data-dependent sizes of the post-processing
(how many boxes survive the score filter decides a branch of torchvision's ``batched_nms``; pytorch/pytorch#118884,
pytorch/vision#9462). torch's TorchScript-based exporter traces them: torchvision takes its ONNX-friendly paths while
tracing (as its own ``test_onnx.py`` exports Faster R-CNN, Mask R-CNN and RetinaNet), and onnxruntime gives the same
detections as eager PyTorch. Segmenters are dense models: the core's ``export_model_onnx`` writes them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from resnet_backbone.adapter_api import LOWEST_OPSET, check_opset, save_checked_onnx

__all__ = ["TORCHSCRIPT_EXPORTER_OPSETS", "export_detector_onnx", "onnx_detection_differences"]

# The opsets the TorchScript-based exporter writes (it stops at 20) that the core's check also accepts.
TORCHSCRIPT_EXPORTER_OPSETS = range(LOWEST_OPSET, 21)
_DETECTORS = (GeneralizedRCNN, RetinaNet, FCOS)
# Every output's first axis counts the detections; Mask R-CNN's masks are also as high and wide as the image.
_OUTPUT_AXES = {"masks": {0: "detections", 2: "height", 3: "width"}}


def export_detector_onnx(model: nn.Module, path: str | os.PathLike, *, opset: int | None = None) -> Path:
    """Write a torchvision detector (Faster, Mask or Keypoint R-CNN, RetinaNet, FCOS from ``build_detector``) as one
    ONNX file: input ``image``, one ``(3, height, width)`` image with values in [0, 1] of any height and width, as the
    detector takes it in eager mode; outputs named as the keys of the detector's result (``boxes``, ``labels``,
    ``scores``, ``masks`` for Mask R-CNN, ``keypoints`` and ``keypoints_scores`` for Keypoint R-CNN), with boxes
    in the input image's pixels. Resizing, normalising,
    non-maximum suppression and, for Mask R-CNN, pasting the masks are inside the file.

    Exported with torch's TorchScript-based exporter (the dynamo exporter cannot: see this module's docstring), then
    staged, checked and renamed into place like the core's ``export_onnx``: complete or not at all.

    Args:
        model: the detector; it is put in eval mode.
        path: the ``.onnx`` file to write (replaced if it exists).
        opset: the ONNX opset version, one of ``TORCHSCRIPT_EXPORTER_OPSETS`` (default: the exporter's).

    Returns:
        ``path``.

    Raises:
        ValueError: ``model`` is not a torchvision detector, or ``opset`` is outside ``TORCHSCRIPT_EXPORTER_OPSETS``.
        OSError: ``path``'s folder cannot be written.
    """
    _check_detector_opset(opset)
    if not isinstance(model, _DETECTORS):
        raise ValueError(
            "export_detector_onnx exports torchvision's Faster R-CNN, Mask R-CNN, Keypoint R-CNN, RetinaNet or FCOS, "
            f"got {type(model).__name__}; export a segmenter with resnet_backbone.export.export_model_onnx."
        )
    model.eval()
    example = _random_image(model, *_example_size(model))
    with torch.no_grad():
        names = list(model([example])[0])

    def write(staged: Path) -> None:
        with warnings.catch_warnings():
            # Tracing warns at every Python number it records, torchvision at the tensors it copies for tracing,
            # torch that this exporter and torch.jit are deprecated (docs/deployment.md says what that means);
            # torchvision's tracing paths keep what depends on the image size as tensors (the parity check at
            # other sizes proves it).
            for category in (torch.jit.TracerWarning, UserWarning, DeprecationWarning, FutureWarning):
                warnings.simplefilter("ignore", category)
            torch.onnx.export(
                model,
                ([example],),
                staged,
                dynamo=False,
                opset_version=opset,
                input_names=["image"],
                output_names=names,
                dynamic_axes={"image": {1: "height", 2: "width"}}
                | {name: _OUTPUT_AXES.get(name, {0: "detections"}) for name in names},
            )

    return save_checked_onnx(write, path, opset)


def _check_detector_opset(opset: int | None) -> None:
    check_opset(opset)
    if opset is not None and opset not in TORCHSCRIPT_EXPORTER_OPSETS:
        first, last = TORCHSCRIPT_EXPORTER_OPSETS[0], TORCHSCRIPT_EXPORTER_OPSETS[-1]
        raise ValueError(
            f"ONNX opset {opset} is not supported for a whole detector: torch's TorchScript-based exporter, the one "
            f"that exports detectors, writes opsets {first} to {last}; pick one of those or leave the opset unset"
        )


def _example_size(model: nn.Module) -> tuple[int, int]:
    """The detector's own input size, taller than wide so that neither side is traced as equal to the other."""
    side = model.transform.min_size[-1]
    return side, side * 3 // 4


def _random_image(model: nn.Module, height: int, width: int) -> Tensor:
    return torch.rand(len(model.transform.image_mean), height, width)


def onnx_detection_differences(
    path: str | os.PathLike, model: nn.Module, image_sizes: list[tuple[int, int]]
) -> list[dict[str, float]]:
    """Compare onnxruntime's detections with eager PyTorch's on one random image per size (needs onnxruntime).

    Both list detections by descending score, so they are compared in order.

    Args:
        path: the file :func:`export_detector_onnx` wrote from ``model``.
        model: the detector.
        image_sizes: ``(height, width)`` of each image.

    Returns:
        Per size: ``detections`` (PyTorch's count), ``count_difference`` (onnxruntime's count minus that),
        ``boxes`` (the largest difference relative to the coordinate, or absolute below one pixel), ``scores``
        (the largest absolute difference), ``labels`` (how many differ) and, for Mask R-CNN, ``masks`` (pixels on
        opposite sides of 0.5) and for Keypoint R-CNN ``keypoints`` (as ``boxes``), over the detections both have.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    differences = []
    for height, width in image_sizes:
        image = _random_image(model, height, width)
        with torch.no_grad():
            expected = model.eval()([image])[0]
        actual = dict(zip(names, map(torch.from_numpy, session.run(None, {"image": image.numpy()}))))
        differences.append(_detection_differences(actual, expected))
    return differences


def _detection_differences(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> dict[str, float]:
    detections, count_difference = len(expected["boxes"]), len(actual["boxes"]) - len(expected["boxes"])
    both = min(len(actual["boxes"]), detections)
    actual, expected = ({name: value[:both] for name, value in outputs.items()} for outputs in (actual, expected))
    differences = {
        "detections": detections,
        "count_difference": count_difference,
        "boxes": _relative_difference(actual["boxes"], expected["boxes"]),
        "scores": (actual["scores"] - expected["scores"]).abs().max().item() if both else 0.0,
        "labels": (actual["labels"] != expected["labels"]).sum().item(),
    }
    if "masks" in expected:
        differences["masks"] = ((actual["masks"] > 0.5) != (expected["masks"] > 0.5)).sum().item()
    if "keypoints" in expected:
        differences["keypoints"] = _relative_difference(actual["keypoints"], expected["keypoints"])
    return differences


def _relative_difference(actual: Tensor, expected: Tensor) -> float:
    """The largest difference of pixel coordinates, relative to the coordinate (absolute below one pixel)."""
    return ((actual - expected).abs() / expected.abs().clamp(min=1)).max().item() if len(expected) else 0.0
