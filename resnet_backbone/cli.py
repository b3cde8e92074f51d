"""The ``resnet-backbone`` command line: one sub-command per verb."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import ResNetConfig
from .info import format_stage_table, stage_rows
from .presets import PRESETS
from .weights.convert import FORMATS, convert


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


def _run_convert(args: argparse.Namespace) -> None:
    result = convert(args.source, args.destination, source_format=args.source_format, target_format=args.target_format)
    formats = f"{result.source_format} -> {result.target_format}"
    print(f"converted {result.architecture} ({formats}): {result.destination}")
    print(f"max abs difference between the two libraries' outputs on one random input: {result.max_abs_diff:.3g}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet-backbone", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    info = verbs.add_parser("info", help="stage table: channels, strides, shapes, parameters, GFLOPs")
    info.add_argument("model", metavar="PRESET_OR_CONFIG_JSON", help=f"one of {', '.join(PRESETS)}, or a config.json")
    info.add_argument("--out-features", nargs="+", metavar="NAME", help="stages to output (default: the last)")
    info.add_argument("--input", type=_input_shape, default=(3, 224, 224), metavar="CxHxW", help="default 3x224x224")
    info.set_defaults(run=_run_info)

    converter = verbs.add_parser("convert", help="convert a checkpoint between transformers, torchvision and timm")
    converter.add_argument(
        "source", metavar="SRC", help="file, directory, Hub repo id, torchvision weights or timm name"
    )
    converter.add_argument("destination", metavar="DST", help="a directory for --to hf, a file otherwise")
    converter.add_argument("--from", dest="source_format", choices=("auto", *FORMATS), default="auto")
    converter.add_argument("--to", dest="target_format", choices=FORMATS, default="hf")
    converter.set_defaults(run=_run_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ValueError as error:
        print(f"resnet-backbone {args.verb}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
