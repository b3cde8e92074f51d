"""``resnet-backbone bench ...``: the benchmark suite (``resnet_backbone.benchmarks``), which parses its own
options: everything after ``bench`` goes to it (``bench --help`` lists them)."""

from __future__ import annotations

import argparse

HELP = "benchmark against torchvision, timm and transformers"
# The suite's options are its own: no -h of this parser, and no option prefix it would claim.
PARSER_OPTIONS = {"add_help": False, "prefix_chars": "+"}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="options of the suite, see bench --help")
    return parser


def run(args: argparse.Namespace) -> None:
    """Run the suite with the arguments after ``bench``.

    Args:
        args: ``arguments``: everything after ``bench``, parsed by the suite itself.
    """
    from ..benchmarks import main as run_suite  # the peers it imports are the bench extra's

    run_suite(args.arguments, prog="resnet-backbone bench")
