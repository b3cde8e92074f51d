"""``resnet-backbone quantize MODEL_DIR --data DIR --calibration-images N``: a fine-tuned model in int8, on the
CPU, calibrated on the first N images of a folder and written as a model folder that ``evaluate`` (and
``load_task_model``) reads as the int8 model (``resnet_backbone.training.quantized_model`` does the work)."""

from __future__ import annotations

import argparse

from ..training.evaluation import evaluation_data
from ..training.quantized_model import (
    check_calibration_count,
    compare_float_and_int8,
    format_comparison,
    quantize_task_model,
    save_int8_task_model,
)
from ..training.task_model import INT8_DIR, load_task_model
from .arguments import existing_directory, output_directory, positive_int, refuse_existing

HELP = "int8 copy of a fine-tuned model (CPU), calibrated on a folder's first images"
OUTPUT_SUFFIX = "-int8"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", type=existing_directory, metavar="MODEL_DIR",
                        help="train's OUTPUT_DIR/model or OUTPUT_DIR/best")  # fmt: skip
    parser.add_argument("--data", type=existing_directory, required=True, metavar="DIR",
                        help="COCO or mask folder whose first images calibrate (e.g. the training data)")  # fmt: skip
    parser.add_argument("--calibration-images", type=positive_int, required=True, metavar="N",
                        help="how many of its images, from the first (a few dozen)")  # fmt: skip
    parser.add_argument("--val-data", type=existing_directory, metavar="DIR",
                        help="held-out folder: evaluate the float32 and int8 models on it, side by side")  # fmt: skip
    parser.add_argument("--output", type=output_directory, metavar="OUT_DIR",
                        help=f"the int8 model folder (default: MODEL_DIR{OUTPUT_SUFFIX}, beside it)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier OUT_DIR")
    return parser


def run(args: argparse.Namespace) -> dict[str, dict[str, float]] | None:
    """Check every input, quantize, write the int8 model folder and, with ``--val-data``, print the float32 and
    int8 metrics side by side.

    Args:
        args: ``model``, ``data``, ``calibration_images``, ``val_data``, ``output`` and ``overwrite``.

    Returns:
        With ``--val-data``: ``{"float32": metrics, "int8": metrics}`` (mAP and mAP@0.5 for a detector, mIoU
        for a segmenter); otherwise None.

    Raises:
        ValueError, OSError: a folder that is no float fine-tuned model, data of another task, more calibration
            images than the folder holds, or an earlier OUT_DIR without ``--overwrite``; all before any work.
            ``resnet-backbone`` shows it as one line and exits with 2.
    """
    model_dir = args.model.resolve()  # so that "." has a name to put the suffix on
    output = args.output or output_directory(str(model_dir.with_name(model_dir.name + OUTPUT_SUFFIX)))
    if output.resolve() == model_dir:
        raise ValueError(f"--output {output} is MODEL_DIR itself; the int8 model is written to a folder of its own.")
    refuse_existing([output], args.overwrite)
    if (args.model / INT8_DIR).exists():
        raise ValueError(
            f"{args.model} is already an int8 model (it holds {INT8_DIR}/); quantize the float model folder it "
            "was made from."
        )
    model, spec = load_task_model(args.model)
    calibration_data = evaluation_data(spec, args.data)
    check_calibration_count(calibration_data, args.calibration_images, args.data)
    val_data = None if args.val_data is None else evaluation_data(spec, args.val_data)
    int8_model = quantize_task_model(model, spec, calibration_data, args.calibration_images)
    save_int8_task_model(model, int8_model, spec, output, overwrite=args.overwrite)
    print(f"wrote the int8 {spec.architecture} to {output} (calibrated on {args.calibration_images} images)")
    if val_data is None:
        return None
    compared = compare_float_and_int8(model, int8_model, spec, val_data)
    print(f"on {args.val_data}:\n{format_comparison(compared)}")
    return compared
