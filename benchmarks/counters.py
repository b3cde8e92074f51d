"""FLOPs and peak memory of one call, counted by torch's own tools."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.flop_counter import FlopCounterMode


def count_flops(run: Callable[[], Any]) -> tuple[int, Any]:
    """FLOPs of one eager call (a multiply-add counts as two, as ``resnet-backbone info``) and its result."""
    counter = FlopCounterMode(display=False)
    with counter:
        result = run()
    return counter.get_total_flops(), result


def peak_memory_bytes(run: Callable[[], Any]) -> int:
    """Peak bytes of live tensors during one call: parameters, gradients, activations and temporaries.

    ``MemTracker`` follows every tensor's storage, so it counts the same on CPU (which keeps no allocator
    statistics) as on CUDA.
    """
    tracker = MemTracker()
    with tracker:
        run()
    peak = tracker.get_tracker_snapshot("peak")
    return max(device_peak["Total"] for device_peak in peak.values())
