"""A fine-tuned detector or segmenter in int8, behind ``resnet-backbone quantize``: calibrated on the first
images of a folder, kept as a model folder that :func:`~resnet_backbone.training.task_model.load_task_model`
rebuilds as the int8 model with no calibration, and compared with the float model on held-out data.

The folder holds the float model's own files (``task.json``, ``task_model.pt``, the backbone's checkpoint) and,
in ``int8/``, the programs :func:`~resnet_backbone.quantization.save_quantized` writes, which
:func:`~resnet_backbone.inference.load_quantized` puts back into the float model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..inference import optimize_for_inference
from ..quantization import save_quantized
from .evaluation import evaluate, model_input
from .task_model import INT8_DIR, TaskSpec, save_task_model

# What the comparison of the float and int8 models shows, by task.
COMPARED_METRICS = {"detection": ("mAP", "mAP@0.5"), "segmentation": ("mIoU",)}


def check_calibration_count(dataset: Dataset, count: int, folder: Path | str) -> None:
    """Refuse more calibration images than ``folder`` (read as ``dataset``) holds.

    Raises:
        ValueError: ``count`` is below 1 or above the folder's images.
    """
    if not 1 <= count <= len(dataset):
        raise ValueError(
            f"{count} calibration images asked for, but {folder} holds {len(dataset)}; pass a number from 1 to "
            f"{len(dataset)}."
        )


def quantize_task_model(
    model: nn.Module, spec: TaskSpec, dataset: Dataset, count: int, *, compile: bool = True
) -> nn.Module:
    """``model`` in int8, calibrated on the first ``count`` images of ``dataset``, each fed as evaluation
    feeds it (a detector resizes it itself, a segmenter gets it at the training size).

    Args:
        model: a float detector or segmenter, on the CPU.
        spec: what it is.
        dataset: images with their targets, as :func:`~resnet_backbone.training.evaluation.evaluation_data`
            reads a folder.
        count: how many of its images calibrate, from the first.
        compile: compile the int8 parts (uncompiled, int8 arithmetic is simulated in float32: slow, and only
            for checking accuracy).

    Returns:
        A new int8 model; ``model`` is left as it was.

    Raises:
        ValueError: ``count`` does not fit ``dataset``, or ``model`` is not on the CPU.
    """
    check_calibration_count(dataset, count, "the calibration data")
    calibration = (model_input(spec, dataset[index][0]) for index in range(count))
    return optimize_for_inference(model, dtype=torch.int8, calibration=calibration, compile=compile)


def save_int8_task_model(
    float_model: nn.Module, int8_model: nn.Module, spec: TaskSpec, directory: Path, *, overwrite: bool = False
) -> Path:
    """Write ``directory`` so that ``load_task_model(directory)`` gives ``int8_model``: the float model's files
    and its quantized programs in ``int8/``. Staged in a hidden folder beside it and renamed into place, so a
    failed write leaves nothing, and an earlier folder is replaced whole or not at all.

    Args:
        float_model: the model ``int8_model`` was quantized from, as it was then.
        int8_model: from :func:`quantize_task_model`.
        spec: what they are.
        directory: the folder to write.
        overwrite: replace ``directory`` if it exists.

    Returns:
        The folder written.

    Raises:
        FileExistsError: ``directory`` exists and ``overwrite`` is false.
    """
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; pass overwrite=True to replace it.")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        save_task_model(float_model, staging, spec)
        save_quantized(int8_model, staging / INT8_DIR)
        _replace_folder(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _replace_folder(new: Path, directory: Path) -> None:
    """Rename ``new`` to ``directory``; an earlier ``directory`` is moved aside first and removed after."""
    if not directory.exists():
        os.rename(new, directory)
        return
    earlier = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
    os.rename(directory, earlier / directory.name)
    try:
        os.rename(new, directory)
    except BaseException:
        os.rename(earlier / directory.name, directory)
        raise
    finally:
        shutil.rmtree(earlier, ignore_errors=True)


def compare_float_and_int8(
    float_model: nn.Module, int8_model: nn.Module, spec: TaskSpec, dataset: Dataset
) -> dict[str, dict[str, float]]:
    """The task's headline metrics of both models on ``dataset``, on the CPU (where int8 runs).

    Args:
        float_model: the fine-tuned model.
        int8_model: it in int8.
        spec: what they are.
        dataset: held-out images with their targets.

    Returns:
        ``{"float32": {metric: value}, "int8": {metric: value}}`` with :data:`COMPARED_METRICS`' metrics.
    """
    cpu = torch.device("cpu")
    names = COMPARED_METRICS[spec.task]
    compared = {}
    for label, model in (("float32", float_model), ("int8", int8_model)):
        metrics = evaluate(model, dataset, spec, cpu)
        compared[label] = {name: metrics[name] for name in names}
    return compared


def format_comparison(compared: dict[str, dict[str, Any]]) -> str:
    """A table of :func:`compare_float_and_int8`'s metrics, float32 and int8 side by side with their difference."""
    rows = [("metric", "float32", "int8", "int8 - float32")]
    for name, float_value in compared["float32"].items():
        int8_value = compared["int8"][name]
        rows.append((name, f"{float_value:.4f}", f"{int8_value:.4f}", f"{int8_value - float_value:+.4f}"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
