"""The printed report (Markdown tables, readable in a terminal and on the generated page) and the JSON file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from resnet_backbone.weights.files import atomic_write

from .machine import processor
from .modes import INT8_MIN_COSINE
from .results import CaseResult, SuiteResult, WorkloadResult

CASE_COLUMNS = ("library", "mode", "median ms", "min-max ms", "images/s", "speedup", "GFLOP/s", "% of peak")
CASE_COLUMNS += ("max diff", "min cosine", "first call s")


def format_report(result: SuiteResult) -> str:
    """The machine in one line, then :func:`format_tables`."""
    machine = result.machine
    summary = (
        f"{processor(machine)} ({machine['device']}, {machine['torch_threads']} threads, "
        f"{machine['cpu_capability']}), torch {machine['torch']}, {machine['date']}, load average before the run "
        f"{machine['load_average_1min_at_start']:.2f}"
    )
    return f"{summary}\n\n{format_tables(result)}"


def format_tables(result: SuiteResult) -> str:
    """Every workload's table, the sweep, the targets and the wall time, as Markdown blocks with a blank line
    between them (so that a note after a table does not render as one of its rows)."""
    blocks = []
    sweep = [workload for workload in result.workloads if workload.kind == "sweep"]
    for workload in result.workloads:
        if workload.kind != "sweep":
            blocks += [_workload_heading(workload), format_table(*_case_table(workload))]
            notes = [f"- skipped: {case}: {why}" for case, why in workload.skipped.items()]
            if workload.part_split_ms:
                split = dict(workload.part_split_ms)
                mode = split.pop("mode")
                parts = ", ".join(f"{name} {ms:.0f}" for name, ms in split.items())
                notes.append(f"- one call of {mode}, ms per part: {parts}")
            blocks += ["\n".join(notes)] if notes else []
    for architecture in dict.fromkeys(workload.architecture for workload in sweep):
        blocks.append(
            f"{architecture} sweep over batch x size: ms per image, speedup against torchvision eager fp32 at the "
            "same shape in brackets (outputs checked as above)"
        )
        blocks.append(format_table(*_sweep_table([w for w in sweep if w.architecture == architecture])))
    blocks += _slow_compiled_blocks(result)
    if result.targets:
        rows = [
            (t.workload, t.name, f">= {t.threshold:g}", "not run" if t.measured is None else f"{t.measured:.2f}",
             _verdict(t.met))
            for t in result.targets
        ]  # fmt: skip
        blocks += ["targets", format_table(("workload", "target", "required", "measured", "met"), rows)]
    first_calls = sum(case.first_call_s for workload in result.workloads for case in workload.cases)
    selection = "every workload and mode (--full)" if result.settings["full"] else "the quick selection"
    blocks.append(
        f"wall time {result.wall_s:.0f} s, of which {first_calls:.0f} s in first calls (compiling included); "
        f"{selection}"
    )
    return "\n\n".join(blocks)


def _slow_compiled_blocks(result: SuiteResult) -> list[str]:
    """The compiled modes slower than their uncompiled twin, with where their graphs came from; a line saying
    there are none where compiled modes ran; nothing where none did."""
    flags = [(workload.label, flag) for workload in result.workloads for flag in workload.slow_compiled]
    compiled = any(case.uncompiled_twin for workload in result.workloads for case in workload.cases)
    if not flags:
        return ["no compiled mode is slower than its uncompiled twin"] if compiled else []
    rows = [
        (label, flag.case, flag.twin, f"{flag.median_ms:.1f}", f"{flag.twin_median_ms:.1f}",
         f"{flag.median_ms / flag.twin_median_ms:.2f}x", _graph_cache(flag.fx_graph_cache), flag.inductor_cache_dir,
         str(flag.threads))
        for label, flag in flags
    ]  # fmt: skip
    header = ("workload", "SLOWER compiled mode", "uncompiled twin", "median ms", "twin ms", "time ratio")
    header += ("FX graph cache in its first call", "inductor cache dir", "threads")
    return ["compiled modes slower than their uncompiled twin", format_table(header, rows)]


def _graph_cache(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "not recorded"
    return ", ".join(f"{count} {outcome}" for outcome, count in counts.items())


def _workload_heading(workload: WorkloadResult) -> str:
    peaks = ", ".join(f"{dtype} {gflops:.0f}" for dtype, gflops in workload.matmul_peak_gflops.items())
    return (
        f"{workload.label}: {workload.flops / 1e9:.1f} GFLOP per call; matmul peak in the same rounds (GFLOP/s): "
        f"{peaks}. Speedup and outputs against {workload.reference}; every max diff (a fraction of the output "
        f"scale) is within its mode's tolerance, int8's min cosine (similarity of the dense outputs) at least "
        f"{INT8_MIN_COSINE}."
    )


def _case_table(workload: WorkloadResult) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    training = workload.kind in ("training", "finetune")
    header = CASE_COLUMNS + (("peak MiB",) if training else ())
    return header, [_case_row(case, training) for case in workload.cases]


def _case_row(case: CaseResult, training: bool) -> tuple[str, ...]:
    cells = (
        case.library,
        case.mode,
        f"{case.median_ms:.1f}",
        f"{case.min_ms:.1f}-{case.max_ms:.1f}",
        f"{case.images_per_s:.1f}",
        f"{case.speedup:.2f}x",
        f"{case.gflops_per_s:.0f}",
        _figure(case.fraction_of_peak, ".0%"),
        _figure(case.max_relative_diff, ".1e"),
        _figure(case.min_cosine, ".4f"),
        f"{case.first_call_s:.1f}",
    )
    memory = "n/a" if case.peak_memory_mib is None else f"{case.peak_memory_mib:.0f}"
    return cells + ((memory,) if training else ())


def _figure(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _sweep_table(sweep: list[WorkloadResult]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    header = ("library", "mode", *(f"{workload.batch}x{workload.size}" for workload in sweep))

    def cell(workload: WorkloadResult, library: str, mode: str) -> str:
        case = workload.case(library, mode)
        return f"{case.median_ms / workload.batch:.1f} ({case.speedup:.2f}x)"

    rows = [
        (first.library, first.mode, *(cell(workload, first.library, first.mode) for workload in sweep))
        for first in sweep[0].cases
    ]
    return header, rows


def _verdict(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[met]


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A Markdown table with padded columns."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"

    return "\n".join([line(header), line(tuple("-" * width for width in widths)), *map(line, rows)])


def write_json(result: SuiteResult, path: Path) -> None:
    text = json.dumps(dataclasses.asdict(result), indent=2) + "\n"
    atomic_write(path, lambda staged: staged.write_text(text, encoding="utf-8"))
