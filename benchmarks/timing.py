"""Interleaved timing: warm-up, then rounds that time every case once in turn (A B C A B C ...)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the rounds."""

    median: float
    min: float
    max: float


def time_interleaved(
    runs: dict[Hashable, Callable[[], Any]], *, rounds: int, warmup: int, device: torch.device, progress: tqdm
) -> dict[Hashable, Timing]:
    """Time each call of ``runs`` after ``warmup`` calls of each.

    Interleaving makes a change in the machine's speed (another process, the clock) hit every case alike,
    so ratios between cases stay fair even when absolute times drift.
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
            progress.update()
    samples: dict[Hashable, list[float]] = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            samples[key].append(time_call(run, device))
            progress.update()
    return {key: Timing(statistics.median(times), min(times), max(times)) for key, times in samples.items()}


def time_call(run: Callable[[], Any], device: torch.device) -> float:
    """Seconds for one call; on CUDA measured by events around the queued work, not by the host clock."""
    if device.type != "cuda":
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start_event.record()
    run()
    end_event.record()
    end_event.synchronize()
    return start_event.elapsed_time(end_event) / 1000
