"""The ``resnet-backbone`` command line: one sub-command per verb."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..adapters.torchvision import resnet_fpn_backbone
from ..backbone import ResNetBackbone
from ..config import ResNetConfig
from ..export import LOWEST_OPSET, check_opset, export_onnx, external_data_path, onnx_max_abs_diff, output_names
from ..presets import PRESETS
from . import convert
from .arguments import ArgumentParser, output_directory, output_file, positive_int, refuse_existing
from .demo import DemoOptions, run_demo
from .evaluation import add_arguments as add_evaluation_arguments
from .evaluation import run as run_evaluation
from .info import format_stage_table, stage_rows
from .train import add_arguments as add_training_arguments
from .train import run as run_training
from .training import PRECISIONS


def config_from_argument(source: str) -> ResNetConfig:
    """A preset name, a config.json file, or a directory that holds one."""
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"{source} is a directory without a config.json.")
    if path.is_file():
        return ResNetConfig.from_json_file(path)
    if source not in PRESETS and (path.suffix or "/" in source):
        raise ValueError(f"{source} does not exist (expected a preset name or a config.json path).")
    return ResNetConfig.from_preset(source)


def _input_shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"expected CHANNELSxHEIGHTxWIDTH such as 3x800x1333, got {text!r}")
    return tuple(int(part) for part in parts)


def _run_info(args: argparse.Namespace) -> None:
    config = config_from_argument(args.model)
    if args.out_features:
        config = config.with_overrides(out_features=args.out_features)
    if args.input[0] != config.num_channels:
        raise ValueError(f"--input has {args.input[0]} channels but the model expects {config.num_channels}.")
    print(f"{args.model}: input 1x{'x'.join(map(str, args.input))}, out_features {config.out_features}")
    print(format_stage_table(stage_rows(config, args.input)))


def _run_demo(args: argparse.Namespace) -> None:
    options = DemoOptions(
        epochs=args.epochs, image_size=args.image_size, preset=args.preset, weights=args.weights,
        output_dir=args.output_dir, train_images=args.train_images, eval_images=args.eval_images,
        precision=args.precision,
    )  # fmt: skip
    run_demo(options)


def _run_export_onnx(args: argparse.Namespace) -> None:
    refuse_existing([args.output, external_data_path(args.output)], args.overwrite)
    check_opset(args.opset)
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


def _run_bench(args: argparse.Namespace) -> None:
    from ..benchmarks import main as run_suite  # the peers it imports are the bench extra's

    run_suite(args.arguments, prog="resnet-backbone bench")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="resnet-backbone", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=ArgumentParser)

    info = verbs.add_parser("info", help="stage table: channels, strides, shapes, parameters, GFLOPs")
    info.add_argument("model", metavar="PRESET_OR_CONFIG_JSON", help=f"one of {', '.join(PRESETS)}, or a config.json")
    info.add_argument("--out-features", nargs="+", metavar="NAME", help="stages to output (default: the last)")
    info.add_argument("--input", type=_input_shape, default=(3, 224, 224), metavar="CxHxW", help="default 3x224x224")
    info.set_defaults(run=_run_info)

    converter = verbs.add_parser("convert", help=convert.HELP)
    convert.add_arguments(converter).set_defaults(run=convert.run)

    demo = verbs.add_parser("demo", help="fine-tune an FCOS detector on synthetic shapes, on the CPU, and show it")
    defaults = DemoOptions()
    demo.add_argument("--epochs", type=positive_int, default=defaults.epochs)
    demo.add_argument("--image-size", type=positive_int, default=defaults.image_size, metavar="PIXELS")
    demo.add_argument("--preset", default=defaults.preset, choices=PRESETS, metavar="PRESET")
    demo.add_argument("--weights", help="checkpoint to start from: anything from_pretrained accepts")
    demo.add_argument("--output-dir", type=output_directory, default=str(defaults.output_dir), metavar="DIR")
    demo.add_argument("--train-images", type=positive_int, default=defaults.train_images, metavar="N")
    demo.add_argument("--eval-images", type=positive_int, default=defaults.eval_images, metavar="N")
    demo.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                      help="auto: bf16 where the CPU computes it natively (AVX512-BF16, AMX), else fp32")  # fmt: skip
    demo.set_defaults(run=_run_demo)

    trainer = verbs.add_parser("train", help="fine-tune a detector or segmenter, alone or under torchrun")
    add_training_arguments(trainer).set_defaults(run=run_training)

    evaluator = verbs.add_parser(
        "evaluate", help="mAP or mIoU of a fine-tuned model (train's OUTPUT_DIR/best) on a folder"
    )
    add_evaluation_arguments(evaluator).set_defaults(run=run_evaluation)

    onnx = verbs.add_parser("export-onnx", help="export to ONNX (dynamic batch, height, width) and verify it")
    onnx.add_argument("model", metavar="MODEL", help="a preset, or anything from_pretrained accepts")
    onnx.add_argument("output", type=output_file, metavar="OUTPUT.onnx",
                      help="one self-contained file; a model over protobuf's 2 GB limit keeps its weights beside it "
                           "in OUTPUT.onnx.data")  # fmt: skip
    onnx.add_argument("--out-features", nargs="+", metavar="NAME", help="stages to output (default: the config's)")
    onnx.add_argument("--opset", type=positive_int,
                      help=f"ONNX opset version, {LOWEST_OPSET} or higher (default: the exporter's)")  # fmt: skip
    onnx.add_argument("--overwrite", action="store_true", help="replace an earlier OUTPUT.onnx (and its .data)")
    onnx.add_argument("--fpn", action="store_true", help="export the torchvision adapter's FPN on these features")
    onnx.set_defaults(run=_run_export_onnx)

    # The suite parses its own options: everything after "bench" goes to it ("bench --help" lists them).
    bench = verbs.add_parser(
        "bench", help="benchmark against torchvision, timm and transformers", add_help=False, prefix_chars="+"
    )
    bench.add_argument("arguments", nargs=argparse.REMAINDER, help="options of the suite, see bench --help")
    bench.set_defaults(run=_run_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb. A user error (bad input, an unreadable or unwritable path) is one line on stderr and exit
    code 2; argument errors are caught while parsing, before any work starts."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        args.run(args)
    except (ValueError, OSError) as error:
        print(f"resnet-backbone {args.verb}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0


def _one_line(error: Exception) -> str:
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.strerror or error}: {error.filename}"
    return str(error).replace("\n", " ")


if __name__ == "__main__":
    sys.exit(main())
