"""The issue's speed targets, read off one inference workload (resnet50 at 4x3x224x224 by default)."""

from __future__ import annotations

from .modes import BEST_MODE, EAGER_FP32, FAST_PATH_FP32
from .results import TargetResult, WorkloadResult

OURS = "resnet_backbone"


def evaluate_targets(workload: WorkloadResult) -> list[TargetResult]:
    """Ratios are against the workload's reference, torchvision eager float32, measured in the same run."""
    ours = [case for case in workload.cases if case.library == OURS]
    peers = [case for case in workload.cases if case.library != OURS]

    def speedup(mode: str) -> float | None:
        case = workload.case(OURS, mode)
        return None if case is None else case.speedup

    best = speedup(BEST_MODE.name)
    # The peer setting: channels_last + bf16 autocast + torch.compile (every uncompiled mode too).
    best_peer = max((case.speedup for case in peers if not case.mode.startswith("compiled frozen")), default=None)
    best_frozen_peer = max((case.speedup for case in peers if case.mode.startswith("compiled frozen")), default=None)
    best_float32 = max(case.fraction_of_peak for case in ours if case.dtype == "float32")
    measured = [
        ("eager float32 vs torchvision eager float32", 0.97, speedup(EAGER_FP32.name)),
        ("fast path float32 (no compile) vs torchvision eager float32", 1.15, speedup(FAST_PATH_FP32.name)),
        ("best mode (fast path bf16 compiled) vs torchvision eager float32", 3.0, best),
        (
            "best mode vs the best peer mode (channels_last + bf16 autocast + torch.compile)",
            1.0,
            _ratio(best, best_peer),
        ),
        (
            "beyond the issue: best mode vs peers compiled with inductor's freezing too",
            1.0,
            _ratio(best, best_frozen_peer),
        ),
        ("best float32 mode: fraction of the float32 matmul peak", 0.85, best_float32),
    ]
    return [
        TargetResult(name, workload.label, threshold, value, None if value is None else value >= threshold)
        for name, threshold, value in measured
    ]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or denominator is None else numerator / denominator
