"""FLOPs and peak memory of one call, counted by torch's own tools."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from torch import nn
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
    tracker = _FrozenParameterMemTracker()
    with tracker:
        run()
    peak = tracker.get_tracker_snapshot("peak")
    return max(device_peak["Total"] for device_peak in peak.values())


class _FrozenParameterMemTracker(MemTracker):
    """``MemTracker`` hooks every parameter's gradient, and torch refuses a hook on a frozen parameter (a
    frozen stage, FrozenBatchNorm's model): a frozen parameter gets no gradient, so it gets a hook that is
    never installed (and whose removal does nothing) instead."""

    _NOT_INSTALLED = SimpleNamespace(remove=lambda: None)

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        for parameter in module.parameters():
            if not parameter.requires_grad:
                self._param_to_grad_hook_handles.setdefault(parameter, (self._NOT_INSTALLED, self._NOT_INSTALLED))
        return super()._track_module_params_and_buffers(module, install_grad_hooks)
