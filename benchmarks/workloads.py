"""The workloads (inference, a training step, a sweep over input sizes) and running one of them: build every case,
check its outputs against the reference, time all cases interleaved, derive throughput and efficiency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .agreement import Agreement, checked_min_cosine
from .compiled import FirstCall, find_slow_compiled, first_call, uncompiled_twin
from .counters import count_flops, peak_memory_bytes
from .machine import matmul_runs
from .modes import (
    EAGER_FP32,
    FAST_PATH_MODES,
    HEADLINE_CASES,
    LIBRARY_MODES,
    TRAINING_FP32,
    Mode,
    min_cosine_for,
    prepare,
    random_batch,
    tolerance_for,
    why_not_run,
)
from .peers import LIBRARIES, OURS, feature_maps
from .results import CaseResult, WorkloadResult
from .timing import Timing, time_interleaved


@dataclass(frozen=True)
class Settings:
    """What a run measures; ``inference_shapes``, ``training_shape`` and ``sweep_shapes`` are (batch, size)
    pairs."""

    architectures: tuple[str, ...]
    inference_shapes: tuple[tuple[int, int], ...]
    training_shape: tuple[int, int]
    sweep_shapes: tuple[tuple[int, int], ...]
    compile: bool
    full: bool  # every workload and mode; else the quick default (see plan)
    rounds: int
    sweep_rounds: int
    dense_rounds: int
    warmup: int
    matmul_size: int


@dataclass(frozen=True)
class Workload:
    """One input shape and the (library, mode) cases run on it; the first case is the reference."""

    kind: str
    architecture: str
    batch: int
    size: int
    cases: tuple[tuple[str, Mode], ...]
    skipped: tuple[tuple[str, str], ...] = ()  # ("library mode", why it does not run here)

    @property
    def label(self) -> str:
        return f"{self.architecture} {self.kind} {self.batch}x3x{self.size}x{self.size}"


def plan(settings: Settings, device: torch.device) -> list[Workload]:
    """With ``settings.full``: inference with every library and mode (the compiled ones at the first shape only:
    each costs seconds of compiling per model and shape on a CPU); a training step per library; the sweep with
    every library eager and our fast path in float32 and bf16, compiled and not. Otherwise the quick default:
    inference at the first shape in the headline modes only. bf16 runs only where ``device`` computes it natively."""
    if settings.full:
        every_case = [(library, mode) for mode in LIBRARY_MODES for library in LIBRARIES]
        every_case += [(OURS, mode) for mode in FAST_PATH_MODES]
    else:
        every_case = list(HEADLINE_CASES)
    reasons = {
        case: why_not_run(case[1].dtype, case[1].compile, compile=settings.compile, device=device)
        for case in every_case
    }
    inference = tuple(case for case in every_case if reasons[case] is None)
    skipped = tuple((f"{library} {mode.name}", why) for (library, mode), why in reasons.items() if why is not None)
    uncompiled = tuple(case for case in inference if not case[1].compile)
    sweep = tuple((library, EAGER_FP32) for library in LIBRARIES)
    sweep += tuple(case for case in inference if case[1].fast_path and case[1].dtype != torch.int8)
    training = tuple((library, TRAINING_FP32) for library in LIBRARIES)
    (first_batch, first_size), *other_shapes = settings.inference_shapes
    workloads = []
    for architecture in settings.architectures:
        workloads.append(Workload("inference", architecture, first_batch, first_size, inference, skipped))
        if settings.full:
            workloads += [Workload("inference", architecture, *shape, uncompiled) for shape in other_shapes]
            workloads.append(Workload("training", architecture, *settings.training_shape, training))
            workloads += [Workload("sweep", architecture, *shape, sweep) for shape in settings.sweep_shapes]
    return workloads


def run_workload(
    workload: Workload,
    models: dict[str, nn.Module],
    *,
    rounds: int,
    warmup: int,
    matmul_size: int,
    device: torch.device,
    progress: tqdm,
) -> WorkloadResult:
    """Measure every case of ``workload`` and the matmul peaks in the same rounds; raise if any case's
    outputs differ from the reference's."""
    progress.set_description(workload.label)
    pixel_values = random_batch((workload.batch, 3, workload.size, workload.size), seed=0).to(device)
    runs, first_calls, agreements = {}, {}, {}
    reference_maps: list[torch.Tensor] = []
    for library, mode in workload.cases:
        run = prepare(mode, models[library], pixel_values)
        output, first_calls[library, mode] = first_call(run)
        maps = feature_maps(output)
        reference_maps = reference_maps or maps
        case = f"{workload.label}, {library} {mode.name}"
        cosine = checked_min_cosine(reference_maps, maps, min_cosine_for(mode.dtype), case)
        agreements[library, mode] = Agreement(_checked_difference(reference_maps, maps, mode.tolerance, case), cosine)
        runs[library, mode] = run
        progress.update()
    matmuls = matmul_runs(device, matmul_size)
    timings = time_interleaved({**runs, **matmuls}, rounds=rounds, warmup=warmup, device=device, progress=progress)
    peaks = {dtype: count_flops(run)[0] / timings.pop(dtype).median / 1e9 for dtype, run in matmuls.items()}
    reference = workload.cases[0]
    flops, _ = count_flops(runs[reference])
    memory = {key: peak_memory_bytes(run, device) for key, run in runs.items()} if workload.kind == "training" else {}
    torch.compiler.reset()  # frees the compiled graphs, and their recompilation budget, for the next workload
    cases = case_results(timings, reference, workload.batch, flops, peaks, first_calls, agreements, memory)
    return WorkloadResult(
        label=workload.label,
        kind=workload.kind,
        architecture=workload.architecture,
        batch=workload.batch,
        size=workload.size,
        flops=flops,
        matmul_peak_gflops=peaks,
        reference=f"{reference[0]} {reference[1].name}",
        outputs_checked=True,
        cases=cases,
        skipped=dict(workload.skipped),
        slow_compiled=find_slow_compiled(cases),
    )


def case_results(
    timings: dict[tuple[str, Any], Timing],
    reference: tuple[str, Any],
    batch: int,
    flops: int,
    peaks: dict[str, float],
    first_calls: dict[tuple[str, Any], FirstCall],
    agreements: dict[tuple[str, Any], Agreement],
    memory_bytes: dict[tuple[str, Any], int | None],
) -> list[CaseResult]:
    """Every timed (library, mode) case's figures, in timing order (a mode has a ``name``, a ``dtype`` and
    ``compile``): throughput, speedup over the reference, efficiency against the matmul peak of its dtype
    measured in the same rounds (none for int8); a compiled mode's uncompiled twin and graph cache counts."""
    results = []
    for (library, mode), timing in timings.items():
        dtype = str(mode.dtype).removeprefix("torch.")
        memory = memory_bytes.get((library, mode))
        first = first_calls[library, mode]
        results.append(
            CaseResult(
                library=library,
                mode=mode.name,
                dtype=dtype,
                median_ms=timing.median * 1e3,
                min_ms=timing.min * 1e3,
                max_ms=timing.max * 1e3,
                first_call_s=first.seconds,
                images_per_s=batch / timing.median,
                speedup=timings[reference].median / timing.median,
                gflops_per_s=flops / timing.median / 1e9,
                fraction_of_peak=flops / timing.median / 1e9 / peaks[dtype] if dtype in peaks else None,
                max_relative_diff=agreements[library, mode].max_relative_diff,
                tolerance=tolerance_for(mode.dtype),
                min_cosine=agreements[library, mode].min_cosine,
                min_cosine_required=min_cosine_for(mode.dtype),
                peak_memory_mib=None if memory is None else memory / 2**20,
                uncompiled_twin=uncompiled_twin((library, mode), list(timings)),
                fx_graph_cache=first.fx_graph_cache if mode.compile else None,
            )
        )
    return results


def _checked_difference(
    reference: list[torch.Tensor], actual: list[torch.Tensor], tolerance: float | None, case: str
) -> float:
    """Max abs difference from the reference over all feature maps (of the same shapes), as a fraction of each
    map's scale; raise past ``tolerance`` (None: not checked, int8)."""
    difference = max(
        ((expected.float() - feature_map.float()).abs().max() / expected.abs().max()).item()
        for expected, feature_map in zip(reference, actual)
    )
    if tolerance is not None and not difference <= tolerance:
        raise RuntimeError(
            f"{case}: outputs differ from the reference by {difference:.3g} of the feature scale (tolerance "
            f"{tolerance:g}); a model that computes something else is not timed."
        )
    return difference
