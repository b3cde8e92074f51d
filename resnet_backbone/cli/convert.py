"""``resnet-backbone convert SRC DST``: a checkpoint from one library's layout to another's, proved by running
both libraries' models on one input (``resnet_backbone.conversion`` does the work)."""

from __future__ import annotations

import argparse

from ..conversion import FORMATS, TARGET_FORMATS, check_source_kind, convert_checkpoint
from ..weights.files import CONFIG_NAME, WEIGHTS_NAMES
from .arguments import output_directory, output_file, refuse_existing

HELP = "convert a checkpoint between transformers, torchvision and timm, or to detectron2"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("source", metavar="SRC", help="file, directory, Hub repo id, torchvision weights or timm name")
    parser.add_argument("destination", metavar="DST", help="a directory for --to hf, a file otherwise")
    parser.add_argument("--from", dest="source_format", choices=("auto", *FORMATS), default="auto")
    parser.add_argument("--to", dest="target_format", choices=TARGET_FORMATS, default="hf")
    parser.add_argument("--overwrite", action="store_true", help="replace DST's checkpoint if it holds one")
    return parser


def run(args: argparse.Namespace) -> None:
    """Refuse to replace an earlier result without ``--overwrite``, convert, and print the difference.

    Args:
        args: ``source``, ``destination``, ``source_format`` (``--from``), ``target_format`` (``--to``) and
            ``overwrite``.

    Raises:
        ValueError, OSError: a source of the wrong kind or architecture, an earlier result without
            ``--overwrite``, or an unreadable source or unwritable destination; ``resnet-backbone`` shows it as
            one line and exits with 2.
    """
    check_source_kind(args.source, args.source_format, option="--from")
    if args.target_format == "hf":
        directory = output_directory(args.destination)
        refuse_existing([directory / CONFIG_NAME, directory / WEIGHTS_NAMES[0]], args.overwrite)
    else:
        refuse_existing([output_file(args.destination)], args.overwrite)
    result = convert_checkpoint(
        args.source, args.destination, source_format=args.source_format, target_format=args.target_format
    )
    print(f"converted {result.architecture} ({result.source_format} -> {result.target_format}): {result.destination}")
    print(f"max abs difference between the two libraries' outputs on one random input: {result.max_abs_diff:.3g}")
