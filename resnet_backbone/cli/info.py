"""``resnet-backbone info``: a per-stage summary of a backbone: channels, stride, output shape, parameters
and FLOPs.

Everything is measured on the ``meta`` device, so even large inputs cost no compute or memory.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..backbone import ResNetBackbone
from ..config import ResNetConfig
from ..presets import PRESETS
from ..weights import resolve_source
from ..weights.files import CONFIG_NAME

HELP = "stage table: channels, strides, shapes, parameters, GFLOPs"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", metavar="PRESET_OR_CONFIG_JSON", help=f"one of {', '.join(PRESETS)}, or a config.json")
    parser.add_argument("--out-features", nargs="+", metavar="NAME", help="stages to output (default: the last)")
    parser.add_argument("--input", type=_input_shape, default=(3, 224, 224), metavar="CxHxW", help="default 3x224x224")
    return parser


def run(args: argparse.Namespace) -> None:
    """Print the stage table of ``args.model`` for one image of ``args.input``.

    Args:
        args: ``model`` (a preset, a config.json or its folder), ``out_features`` and ``input`` (C, H, W).

    Raises:
        ValueError, OSError: an unknown model or stage, or an input whose channels the model does not take;
            ``resnet-backbone`` shows it as one line and exits with 2.
    """
    config = config_from_argument(args.model)
    if args.out_features:
        config = config.with_overrides(out_features=args.out_features)
    if args.input[0] != config.num_channels:
        raise ValueError(f"--input has {args.input[0]} channels but the model expects {config.num_channels}.")
    print(f"{args.model}: input 1x{'x'.join(map(str, args.input))}, out_features {config.out_features}")
    print(format_stage_table(stage_rows(config, args.input)))


def config_from_argument(argument: str) -> ResNetConfig:
    """A preset name, a config.json file, or a folder that holds one."""
    source = resolve_source(argument)
    if source.kind == "preset":
        return ResNetConfig.from_preset(source.value)
    if source.kind == "folder":
        config = source.path / CONFIG_NAME
        if not config.is_file():
            raise ValueError(f"{argument} is a directory without a {CONFIG_NAME}.")
        return ResNetConfig.from_json_file(config)
    if source.kind == "file":
        return ResNetConfig.from_json_file(source.path)
    raise ValueError(
        f"{argument!r} is a Hub repo id or URL; info reads a preset name, a {CONFIG_NAME} file or a folder that "
        "holds one."
    )


def _input_shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"expected CHANNELSxHEIGHTxWIDTH such as 3x800x1333, got {text!r}")
    return tuple(int(part) for part in parts)


@dataclass(frozen=True)
class StageRow:
    name: str
    index: int
    channels: int
    stride: int
    output_shape: tuple[int, ...]
    parameters: int
    flops: int
    is_output: bool


def stage_rows(config: ResNetConfig, input_shape: tuple[int, int, int]) -> list[StageRow]:
    """One row per stage of the full network for a single image of ``input_shape`` (C, H, W).

    FLOPs come from ``torch.utils.flop_counter`` (a multiply-add counts as two).
    """
    all_stages = config.with_overrides(out_features=config.stage_names)
    with torch.device("meta"):
        backbone = ResNetBackbone(all_stages).eval()
        pixel_values = torch.empty(1, *input_shape)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        hidden_states = backbone(pixel_values, output_hidden_states=True).hidden_states
    flops_per_module = {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}
    module_names = ["embedder"] + [f"encoder.stages.{i}" for i in range(len(config.depths))]
    return [
        StageRow(
            name=spec.name,
            index=index,
            channels=spec.channels,
            stride=spec.stride,
            output_shape=tuple(hidden_state.shape),
            parameters=sum(p.numel() for p in module.parameters()),
            flops=flops_per_module.get(f"ResNetBackbone.{module_name}", 0),
            is_output=spec.name in config.out_features,
        )
        for index, (spec, hidden_state, module, module_name) in enumerate(
            zip(backbone.stage_specs, hidden_states, backbone.stage_modules(), module_names)
        )
    ]


def format_stage_table(rows: list[StageRow]) -> str:
    """A plain-text table; the total counts the stages up to the deepest output (what gets built)."""
    header = ("stage", "index", "channels", "stride", "output shape", "params (M)", "GFLOPs", "output")
    deepest = max((row.index for row in rows if row.is_output), default=0)
    built = rows[: deepest + 1]
    lines = [
        (
            row.name,
            str(row.index),
            str(row.channels),
            str(row.stride),
            "x".join(map(str, row.output_shape)),
            f"{row.parameters / 1e6:.2f}",
            f"{row.flops / 1e9:.2f}",
            "yes" if row.is_output else "",
        )
        for row in rows
    ]
    lines.append(
        (
            "total (built)",
            "",
            "",
            "",
            "",
            f"{sum(r.parameters for r in built) / 1e6:.2f}",
            f"{sum(r.flops for r in built) / 1e9:.2f}",
            "",
        )
    )
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    rule = ["-" * width for width in widths]
    return "\n".join(_render(cells, widths) for cells in [header, rule, *lines])


def _render(cells: tuple[str, ...] | list[str], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()
