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
    fraction_of_peak: float | None  # None: int8, whose matmul peak is not measured
    max_relative_diff: float | None  # from the reference's outputs, as a fraction of the feature scale
    tolerance: float | None  # None: int8, checked by cosine similarity instead
    min_cosine: float | None  # the accuracy column: cosine similarity to the reference's (dense) outputs
    min_cosine_required: float | None  # int8's parity bound
    peak_memory_mib: float | None = None
    uncompiled_twin: str | None = None  # the mode of the same library a compiled mode is compared with
    fx_graph_cache: dict[str, int] | None = None  # compiled modes: FX graph cache hit/miss/bypass in the first call


@dataclass
class SlowCompiled:
    """A compiled case slower than its uncompiled twin, with what decides how its compiled code came to be: the
    graph cache's hits and misses in its first call (a hit reuses code compiled earlier, maybe elsewhere), the
    inductor cache folder, and the thread count."""

    case: str  # "library mode"
    twin: str
    median_ms: float
    twin_median_ms: float
    fx_graph_cache: dict[str, int] | None
    inductor_cache_dir: str
    threads: int


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
    slow_compiled: list[SlowCompiled] = field(default_factory=list)

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
