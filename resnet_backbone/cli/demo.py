"""``resnet-backbone demo``: fine-tune an FCOS detector on synthetic shapes, on the CPU, and show it
(``resnet_backbone.training.demo`` runs it)."""

from __future__ import annotations

import argparse
import dataclasses

from ..presets import PRESETS
from ..training.demo import DemoOptions, run_demo
from ..training.engine import PRECISIONS
from .arguments import output_directory, positive_int

HELP = "fine-tune an FCOS detector on synthetic shapes, on the CPU, and show it"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    defaults = DemoOptions()
    parser.add_argument("--epochs", type=positive_int, default=defaults.epochs)
    parser.add_argument("--image-size", type=positive_int, default=defaults.image_size, metavar="PIXELS")
    parser.add_argument("--preset", default=defaults.preset, choices=PRESETS, metavar="PRESET")
    parser.add_argument("--weights", help="checkpoint to start from: anything from_pretrained accepts")
    parser.add_argument("--output-dir", type=output_directory, default=str(defaults.output_dir), metavar="DIR")
    parser.add_argument("--train-images", type=positive_int, default=defaults.train_images, metavar="N")
    parser.add_argument("--eval-images", type=positive_int, default=defaults.eval_images, metavar="N")
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                        help="auto: bf16 where the CPU computes it natively (AVX512-BF16, AMX), else fp32")  # fmt: skip
    return parser


def run(args: argparse.Namespace) -> None:
    """Run the demo with the options given; the others keep ``DemoOptions``' defaults.

    Args:
        args: the fields of ``DemoOptions`` that the parser defines (``epochs``, ``preset``, ``weights``,
            ``output_dir``, ...), read by name.

    Raises:
        ValueError, OSError: weights that do not load, or an output folder that cannot be written;
            ``resnet-backbone`` shows it as one line and exits with 2.
    """
    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(DemoOptions) if field.name in args}
    run_demo(DemoOptions(**given))
