"""FLOPs and peak memory of one call, counted by torch's own tools."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from resnet_backbone.torch_compat import allocation_events


def count_flops(run: Callable[[], Any]) -> tuple[int, Any]:
    """FLOPs of one eager call (a multiply-add counts as two, as ``resnet-backbone info``) and its result."""
    counter = FlopCounterMode(display=False)
    with counter:
        result = run()
    return counter.get_total_flops(), result


def peak_memory_bytes(run: Callable[[], Any], device: torch.device) -> int:
    """The most bytes on ``device`` that the tensors one call allocates hold at once: activations, gradients,
    temporaries. What existed before the call (the weights, the inputs, the last step's gradients) is not
    counted, even where the call frees it.

    From the profiler's allocation events, which see every allocation of eager and compiled code alike, on a
    CPU (which keeps no allocator statistics) as on CUDA. A dispatch mode such as torch's ``MemTracker``
    would not do: torch.compile runs the eager code under one, so a compiled step would get the eager figure.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profiler = profile(activities=activities, profile_memory=True)
    with _stderr_silenced():
        profiler.start()
    try:
        run()
    finally:
        with _stderr_silenced():
            profiler.stop()
    allocations = allocation_events(profiler, device.type)
    held: dict[int, int] = {}  # address -> bytes of each block the call allocated and still holds
    live = peak = 0
    for _, address, size in sorted(allocations):
        if size > 0:
            held[address] = size
            live += size
            peak = max(peak, live)
        else:
            live -= held.pop(address, 0)
    return peak


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Kineto writes lines to the process's stderr as a profiler starts and stops ("profiler_start", ...),
    through the progress bar; only those two moments are silenced, never the profiled call."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
