"""The ``resnet-backbone`` command line: one sub-command per verb."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import bench, convert, demo, evaluate, export_onnx, info, quantize, train
from .arguments import ArgumentParser

# Each verb is a module with HELP, add_arguments(parser) and run(args) (and PARSER_OPTIONS where its parser
# differs), in the order --help lists them.
VERBS = {
    "info": info, "convert": convert, "demo": demo, "train": train, "evaluate": evaluate,
    "quantize": quantize, "export-onnx": export_onnx, "bench": bench,
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The parser of every verb; each one's ``run`` is the parsed namespace's ``run``."""
    parser = ArgumentParser(prog="resnet-backbone", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=ArgumentParser)
    for name, verb in VERBS.items():
        subparser = verbs.add_parser(name, help=verb.HELP, **getattr(verb, "PARSER_OPTIONS", {}))
        verb.add_arguments(subparser).set_defaults(run=verb.run)
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
