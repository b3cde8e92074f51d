"""The PNG: throughput of every library and mode per workload, and time against input size in the sweep."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .machine import processor  # noqa: E402
from .peers import LIBRARIES  # noqa: E402
from .results import SuiteResult, WorkloadResult  # noqa: E402

COLORS = dict(zip(LIBRARIES, ("tab:gray", "tab:blue", "tab:orange", "tab:green")))
LINESTYLES = ("-", "--", ":", "-.")


def write_plot(result: SuiteResult, path: Path) -> None:
    architectures = list(dict.fromkeys(workload.architecture for workload in result.workloads))
    rows = [[w for w in result.workloads if w.architecture == arch] for arch in architectures]
    bar_panels = [[w for w in row if w.kind != "sweep"] for row in rows]
    columns = max(len(panels) for panels in bar_panels) + 1
    figure, axes = plt.subplots(
        len(rows), columns, figsize=(6 * columns, 7 * len(rows)), squeeze=False, layout="constrained"
    )
    for row_axes, panels, row in zip(axes, bar_panels, rows):
        for ax, workload in zip(row_axes, panels):
            _throughput_bars(ax, workload)
        _sweep_lines(row_axes[-1], [w for w in row if w.kind == "sweep" and w.batch == 1])
        for ax in row_axes[len(panels) : -1]:
            ax.set_visible(False)
    figure.suptitle(f"{processor(result.machine)}, {result.machine['torch_threads']} threads")
    figure.savefig(path, dpi=80)
    plt.close(figure)


def _throughput_bars(ax: plt.Axes, workload: WorkloadResult) -> None:
    cases = workload.cases[::-1]  # the reference on top
    ax.barh(
        [f"{case.library}: {case.mode}" for case in cases],
        [case.images_per_s for case in cases],
        color=[COLORS.get(case.library, "tab:purple") for case in cases],
    )
    ax.set_title(workload.label)
    ax.set_xlabel("images/s (higher is better)")
    ax.tick_params(axis="y", labelsize=8)


def _sweep_lines(ax: plt.Axes, sweep: list[WorkloadResult]) -> None:
    if not sweep:
        ax.set_visible(False)
        return
    sizes = [workload.size for workload in sweep]
    for index, first in enumerate(sweep[0].cases):
        times = [workload.case(first.library, first.mode).median_ms for workload in sweep]
        repeats = [case.library for case in sweep[0].cases[:index]].count(first.library)  # a library's modes
        linestyle = LINESTYLES[repeats % len(LINESTYLES)]
        label = f"{first.library}: {first.mode}"
        ax.plot(sizes, times, marker="o", linestyle=linestyle, color=COLORS[first.library], label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.minorticks_off()
    ax.set_xticks(sizes, [str(size) for size in sizes])
    ax.set_title(f"{sweep[0].architecture}: resolution sweep, batch 1")
    ax.set_xlabel("input height = width (pixels)")
    ax.set_ylabel("ms per image (lower is better)")
    ax.legend(fontsize=7)
