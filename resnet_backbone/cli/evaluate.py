"""``resnet-backbone evaluate MODEL_DIR --data DIR``: the metrics of a fine-tuned model on a folder
(``resnet_backbone.training.evaluation`` computes them)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..training.evaluation import evaluate, evaluation_data, evaluation_device, format_metrics
from ..training.task_model import load_task_model

HELP = "mAP or mIoU of a fine-tuned model (train's OUTPUT_DIR/best) on a folder"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", type=Path, metavar="MODEL_DIR", help="train's OUTPUT_DIR/model or OUTPUT_DIR/best")
    parser.add_argument("--data", type=Path, required=True, metavar="DIR", help="a COCO folder or a mask folder")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Print the metrics of the model in ``args.model`` on ``args.data`` as one line, and return them.

    Args:
        args: ``model`` (a model folder that ``train`` wrote) and ``data`` (a COCO or mask folder).

    Returns:
        The metrics by name (mAP for a detector, mIoU for a segmenter).

    Raises:
        ValueError, OSError: a model folder that ``train`` did not write, or data of another task or with
            unreadable files; ``resnet-backbone`` shows it as one line and exits with 2.
    """
    model, spec = load_task_model(args.model)
    dataset = evaluation_data(spec, args.data)
    device = evaluation_device(model)
    metrics = evaluate(model.to(device), dataset, spec, device)
    print(format_metrics(metrics))
    return metrics
