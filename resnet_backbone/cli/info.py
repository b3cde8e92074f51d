"""Per-stage summary of a backbone: channels, stride, output shape, parameters and FLOPs.

Everything is measured on the ``meta`` device, so even large inputs cost no compute or memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..backbone import ResNetBackbone
from ..config import ResNetConfig


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
