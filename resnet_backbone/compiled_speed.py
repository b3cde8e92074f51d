"""A warning when a model compiled for inference runs slower than its own uncompiled forward.

Compiled code can be several times slower than eager without any error (on a CPU, a stale or foreign entry in
inductor's FX-graph cache is suspected), and a user who benchmarks the fast path would not know why. So the
first calls of each input shape after the one that compiles are timed against the same model's eager
``forward`` (the same folded weights, the same inputs), and one warning per model names both timings and the
fix. After those calls the compiled call runs alone: no timing, no extra eager call.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from .torch_compat import inductor_cache_dir, tree_flatten, wrap_compiled_call

CHECK_VARIABLE = "RESNET_BACKBONE_CHECK_COMPILED"
CALLS_TIMED = 3  # calls 2 to 4 of each input shape: the first one compiles
SLOWER_BY = 1.3  # the compiled median over the eager median that counts as clearly slower, beyond timing noise
# Nor is a loss below a millisecond worth a warning: it is the compiled call's fixed cost (guards, the C++
# wrapper's entry), which only a tiny model or input notices, and timing noise decides it.
SMALLEST_LOSS_S = 1e-3
# Size, dtype and strides of each tensor input: with static shapes, what makes a call compile anew.
InputShape = tuple[tuple[torch.Size, torch.dtype, tuple[int, ...]], ...]


class CompiledSlowerWarning(UserWarning):
    """A model compiled by ``optimize_for_inference(..., compile=True)`` ran slower than uncompiled."""


def check_compiled_speed(model: nn.Module) -> None:
    """Time the compiled calls of ``model`` (compiled by ``compile_for_inference``) against its uncompiled
    ``forward`` for the first calls of each input shape, and warn once (:class:`CompiledSlowerWarning`) where
    compiled is clearly slower.

    Skipped where ``RESNET_BACKBONE_CHECK_COMPILED=0``, and on CUDA: there the compiled call replays CUDA
    graphs whose outputs the next call overwrites, and timing it would need a synchronisation on every call
    of the window; the slowdown this looks for was seen on a CPU.

    Args:
        model: a module compiled by ``compile_for_inference``.
    """
    if os.environ.get(CHECK_VARIABLE) == "0" or any(parameter.is_cuda for parameter in model.parameters()):
        return
    wrap_compiled_call(model, partial(CompiledSpeedCheck, model_name=type(model).__name__))


class CompiledSpeedCheck:
    """A model's compiled call that, for calls 2 to ``calls_timed + 1`` of each input shape, also times the
    model's eager call on the same inputs, and warns once if the compiled median is over ``slower_by`` times
    the eager one (and a millisecond longer). It returns the compiled call's outputs.

    Args:
        compiled: the compiled call.
        eager: the uncompiled call of the same model, without autograd.
        model_name: the model's name, for the warning.
        clock: seconds, for the timings.
        calls_timed: calls timed per input shape, after the first.
        slower_by: the ratio of the medians above which it warns.
    """

    def __init__(
        self,
        compiled: Callable[..., Any],
        eager: Callable[..., Any],
        *,
        model_name: str,
        clock: Callable[[], float] = time.perf_counter,
        calls_timed: int = CALLS_TIMED,
        slower_by: float = SLOWER_BY,
    ) -> None:
        self.compiled, self.eager = compiled, eager
        self.model_name, self.clock = model_name, clock
        self.calls_timed, self.slower_by = calls_timed, slower_by
        self.calls: dict[InputShape, int] = {}
        self.seconds: dict[InputShape, tuple[list[float], list[float]]] = {}
        self.warned = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.warned:
            return self.compiled(*args, **kwargs)
        shape = _input_shape(args, kwargs)
        calls = self.calls[shape] = self.calls.get(shape, 0) + 1
        if not 2 <= calls <= self.calls_timed + 1:
            return self.compiled(*args, **kwargs)
        started = self.clock()
        outputs = self.compiled(*args, **kwargs)
        compiled_done = self.clock()
        self.eager(*args, **kwargs)
        eager_done = self.clock()
        compiled_seconds, eager_seconds = self.seconds.setdefault(shape, ([], []))
        compiled_seconds.append(compiled_done - started)
        eager_seconds.append(eager_done - compiled_done)
        if calls == self.calls_timed + 1:
            self._warn_if_slower(shape, statistics.median(compiled_seconds), statistics.median(eager_seconds))
        return outputs

    def _warn_if_slower(self, shape: InputShape, compiled: float, eager: float) -> None:
        if compiled <= self.slower_by * eager or compiled - eager < SMALLEST_LOSS_S:
            return
        self.warned = True
        inputs = ", ".join(
            f"{'x'.join(map(str, size))} {str(dtype).removeprefix('torch.')}" for size, dtype, _ in shape
        )
        warnings.warn(
            f"{self.model_name} compiled by optimize_for_inference(compile=True) runs slower than uncompiled: "
            f"{compiled * 1e3:.2f} ms per call against {eager * 1e3:.2f} ms for its uncompiled forward "
            f"({compiled / eager:.1f}x, medians of calls 2-{self.calls_timed + 1} on inputs {inputs}). "
            f"Inductor cache dir: {inductor_cache_dir()}; torch threads: {torch.get_num_threads()}. A stale or "
            "foreign entry in inductor's FX-graph cache can cause this: run with an empty TORCHINDUCTOR_CACHE_DIR "
            "(e.g. TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)), or use the uncompiled fast path (compile=False). "
            f"{CHECK_VARIABLE}=0 turns this check off.",
            CompiledSlowerWarning,
            stacklevel=4,  # this method, __call__, nn.Module's call, then the caller of the model
        )


def _input_shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> InputShape:
    # A backbone's call (tensors alone) skips flattening, which costs more than the rest of the wrapper.
    leaves = (
        args if not kwargs and all(isinstance(arg, torch.Tensor) for arg in args) else tree_flatten((args, kwargs))[0]
    )
    return tuple((leaf.shape, leaf.dtype, leaf.stride()) for leaf in leaves if isinstance(leaf, torch.Tensor))
