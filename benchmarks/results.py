"""What a run measured, as plain data that serialises to JSON."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CaseResult:
    """One library in one mode on one workload; ``speedup`` is against the workload's reference case."""

    library: str
    mode: str
    dtype: str
    median_ms: float
    min_ms: float
    max_ms: float
    first_call_s: float  # includes compilation
    images_per_s: float
    speedup: float
    gflops_per_s: float
    fraction_of_peak: float
    max_relative_diff: float  # from the reference's outputs, as a fraction of the feature scale
    tolerance: float
    peak_memory_mib: float | None = None


@dataclass
class WorkloadResult:
    label: str
    kind: str
    architecture: str
    batch: int
    size: int
    flops: int  # per call, from torch.utils.flop_counter
    matmul_peak_gflops: dict[str, float]  # per dtype, timed in the same rounds as the cases
    reference: str
    outputs_checked: bool
    cases: list[CaseResult]
    skipped: dict[str, str] = field(default_factory=dict)  # "library mode" -> why it did not run here
    part_split_ms: dict[str, object] = field(default_factory=dict)  # ms per part of our fastest mode, one call

    def case(self, library: str, mode: str) -> CaseResult | None:
        return next((c for c in self.cases if (c.library, c.mode) == (library, mode)), None)


@dataclass
class TargetResult:
    """One of the project's speed targets (see ``targets.py``); ``measured`` is None (and ``met`` too) when its mode
    did not run."""

    name: str
    workload: str
    threshold: float
    measured: float | None
    met: bool | None


@dataclass
class SuiteResult:
    machine: dict[str, object]
    settings: dict[str, object]
    workloads: list[WorkloadResult] = field(default_factory=list)
    targets: list[TargetResult] = field(default_factory=list)
    wall_s: float = 0.0
