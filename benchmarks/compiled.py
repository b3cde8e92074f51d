"""Compiled modes against their uncompiled twins: which mode is the twin, whether a first call's graphs came
from inductor's cache, and the flag raised where compiling made a mode slower."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from resnet_backbone.torch_compat import fx_graph_cache_counts, inductor_cache_dir

from .results import CaseResult, SlowCompiled

Result = TypeVar("Result")
# What compiling changes, besides the mode's name: the rest (precision, memory format, autocast, fast path)
# makes the twin.
_COMPILE_SETTINGS = ("name", "compile", "frozen")


@dataclass(frozen=True)
class FirstCall:
    """A case's first call: it compiles a compiled mode. ``fx_graph_cache``: inductor's FX graph cache hits,
    misses and bypasses during it."""

    seconds: float
    fx_graph_cache: dict[str, int]


def first_call(call: Callable[[], Result]) -> tuple[Result, FirstCall]:
    """Run ``call`` once: its result, and its seconds and graph cache counts."""
    before = fx_graph_cache_counts()
    started = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - started
    after = fx_graph_cache_counts()
    return result, FirstCall(seconds, {outcome: after[outcome] - before[outcome] for outcome in after})


def uncompiled_twin(case: tuple[str, Any], cases: Sequence[tuple[str, Any]]) -> str | None:
    """The name of the mode a compiled ``(library, mode)`` case is compared with: of the same library and
    precision, uncompiled, and otherwise alike in the most settings (memory format, autocast, fast path).

    Args:
        case: a library and its mode (a backbone ``Mode`` or a ``DenseMode``).
        cases: every case of the workload.

    Returns:
        The twin's mode name; None for an uncompiled mode or where no uncompiled mode of that library and
        precision runs.
    """
    library, mode = case
    if not mode.compile:
        return None
    settings = [field.name for field in dataclasses.fields(mode) if field.name not in _COMPILE_SETTINGS]
    candidates = [other for name, other in cases if name == library and not other.compile and other.dtype == mode.dtype]
    twin = min(
        candidates,
        key=lambda other: sum(getattr(other, setting) != getattr(mode, setting) for setting in settings),
        default=None,
    )
    return None if twin is None else twin.name


def find_slow_compiled(cases: Sequence[CaseResult]) -> list[SlowCompiled]:
    """The compiled cases whose median time is above their uncompiled twin's, with the inductor cache folder
    and the thread count of this process, which decide how fast the compiled code is.

    Args:
        cases: a workload's measured cases (``uncompiled_twin`` names each compiled one's twin).

    Returns:
        One flag per slower compiled case, in the cases' order.
    """
    by_mode = {(case.library, case.mode): case for case in cases}
    flags = []
    for case in cases:
        twin = by_mode.get((case.library, case.uncompiled_twin))
        if twin is not None and case.median_ms > twin.median_ms:
            flags.append(
                SlowCompiled(
                    case=f"{case.library} {case.mode}",
                    twin=f"{twin.library} {twin.mode}",
                    median_ms=case.median_ms,
                    twin_median_ms=twin.median_ms,
                    fx_graph_cache=case.fx_graph_cache,
                    inductor_cache_dir=inductor_cache_dir(),
                    threads=torch.get_num_threads(),
                )
            )
    return flags
