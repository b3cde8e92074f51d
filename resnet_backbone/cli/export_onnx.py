"""``resnet-backbone export-onnx MODEL OUTPUT.onnx``: export a backbone (or the torchvision adapter's FPN on it)
to ONNX with ``resnet_backbone.export``, or a whole fine-tuned model folder with ``training.task_onnx``, and check
the file with onnxruntime."""

from __future__ import annotations

import argparse

from ..adapters.torchvision import resnet_fpn_backbone
from ..backbone import ResNetBackbone
from ..export import LOWEST_OPSET, check_opset, export_onnx, external_data_path, onnx_max_abs_diff, output_names
from ..training.task_model import load_task_model
from ..training.task_onnx import export_task_model_onnx, is_task_model_dir, onnx_parity_report
from .arguments import output_file, positive_int, refuse_existing

HELP = "export a backbone, or a fine-tuned model whole, to ONNX and verify it"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", metavar="MODEL",
                        help="a preset, anything from_pretrained accepts, or a fine-tuned model folder (with "
                             "task.json, from train) to export whole")  # fmt: skip
    parser.add_argument("output", type=output_file, metavar="OUTPUT.onnx",
                        help="one self-contained file; a model over protobuf's 2 GB limit keeps its weights beside "
                             "it in OUTPUT.onnx.data")  # fmt: skip
    parser.add_argument("--out-features", nargs="+", metavar="NAME", help="stages to output (default: the config's)")
    parser.add_argument("--opset", type=positive_int,
                        help=f"ONNX opset version, {LOWEST_OPSET} or higher (default: the exporter's)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier OUTPUT.onnx (and its .data)")
    parser.add_argument("--fpn", action="store_true", help="export the torchvision adapter's FPN on these features")
    return parser


def run(args: argparse.Namespace) -> None:
    """Export, then print the outputs and onnxruntime's difference from PyTorch at two input sizes.

    Args:
        args: ``model``, ``output``, ``out_features``, ``opset``, ``overwrite`` and ``fpn``.

    Raises:
        ValueError, OSError: an unknown model, an unsupported opset, an earlier file without ``--overwrite``, an
            option that does not apply to a fine-tuned model, or an unwritable output; ``resnet-backbone`` shows it
            as one line and exits with 2.
    """
    refuse_existing([args.output, external_data_path(args.output)], args.overwrite)
    check_opset(args.opset)
    if is_task_model_dir(args.model):
        _export_task_model(args)
        return
    out_features = args.out_features or (["stage1", "stage2", "stage3", "stage4"] if args.fpn else None)
    model = ResNetBackbone.load(args.model, **({"out_features": out_features} if out_features else {}))
    if args.fpn:
        model = resnet_fpn_backbone(model, out_features=out_features)
    path = export_onnx(model, args.output, opset=args.opset)
    print(f"wrote {path}: input pixel_values, outputs {output_names(model)} (dynamic batch, height, width)")
    divisor = model.size_divisibility
    sizes = [(1, 2 * divisor, 3 * divisor), (2, 5 * divisor, 4 * divisor)]
    difference = onnx_max_abs_diff(path, model, sizes)
    print(f"onnxruntime vs PyTorch at {sizes} (batch, height, width): max abs difference {difference:.3g}")


def _export_task_model(args: argparse.Namespace) -> None:
    if args.fpn or args.out_features:
        raise ValueError(
            f"{args.model} is a fine-tuned model folder, exported whole; --fpn and --out-features choose the outputs "
            "of a backbone. Leave them out, or name a backbone."
        )
    model, spec = load_task_model(args.model)
    path = export_task_model_onnx(model, spec, args.output, opset=args.opset)
    print(f"wrote {path}: the whole {spec.architecture} ({spec.task})")
    for line in onnx_parity_report(path, model, spec):
        print(line)
