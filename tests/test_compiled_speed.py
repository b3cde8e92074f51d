"""The check that a model compiled for inference is not slower than its own uncompiled forward: given a
compiled call and an eager call (real functions, one made slow by sleeping) or a clock the calls advance, it
warns once where compiled is clearly slower, stays silent otherwise, and stops timing after its window."""

from __future__ import annotations

import getpass
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable

import pytest
import torch
from helpers import TINY_BASIC

from resnet_backbone import CompiledSlowerWarning, ResNetBackbone
from resnet_backbone.compiled_speed import CALLS_TIMED, CHECK_VARIABLE, CompiledSpeedCheck, check_compiled_speed
from resnet_backbone.torch_compat import compile_without_autograd, inductor_cache_dir, wrap_compiled_call

SLEEP_S = 0.03  # far above the cost of a call that does not sleep, on any machine load


class CountingCall:
    """A call that counts its calls and returns its input doubled; it takes ``seconds`` of the clock it
    advances, or of real time where it has no clock."""

    def __init__(self, seconds: float = 0.0, clock: SteppedClock | None = None) -> None:
        self.seconds, self.clock, self.calls = seconds, clock, 0

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.clock is not None:
            self.clock.now += self.seconds
        elif self.seconds:
            time.sleep(self.seconds)
        return pixel_values * 2


class SteppedClock:
    """A clock that only the calls move, counting how often it is read."""

    def __init__(self) -> None:
        self.now, self.reads = 0.0, 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


def call_repeatedly(check: Callable, pixel_values: torch.Tensor, times: int) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(times):
            assert torch.equal(check(pixel_values), pixel_values * 2), "the compiled call's outputs come back"
    return [warning for warning in caught if issubclass(warning.category, CompiledSlowerWarning)]


def test_a_compiled_call_clearly_slower_than_eager_warns_once_naming_the_timings_the_cache_and_the_fix():
    compiled, eager = CountingCall(seconds=SLEEP_S), CountingCall()
    check = CompiledSpeedCheck(compiled, eager, model_name="TinyNet")
    caught = call_repeatedly(check, torch.zeros(1, 3, 8, 8), times=CALLS_TIMED + 3)
    caught += call_repeatedly(check, torch.zeros(2, 3, 8, 8), times=CALLS_TIMED + 3)
    assert len(caught) == 1
    message = str(caught[0].message)
    compiled_ms, eager_ms = map(float, re.search(r"([\d.]+) ms per call against ([\d.]+) ms", message).groups())
    assert compiled_ms >= SLEEP_S * 1e3 > eager_ms
    for expected in (
        "TinyNet compiled by optimize_for_inference(compile=True) runs slower than uncompiled",
        f"medians of calls 2-{CALLS_TIMED + 1} on inputs 1x3x8x8 float32",
        f"Inductor cache dir: {inductor_cache_dir()}",
        f"torch threads: {torch.get_num_threads()}",
        "run with an empty TORCHINDUCTOR_CACHE_DIR",
        "use the uncompiled fast path (compile=False)",
        f"{CHECK_VARIABLE}=0 turns this check off",
    ):
        assert expected in message
    assert eager.calls == CALLS_TIMED, "once it has warned, a new shape is not timed"
    assert compiled.calls == 2 * (CALLS_TIMED + 3)


def test_a_compiled_call_faster_than_eager_gives_no_warning():
    compiled, eager = CountingCall(), CountingCall(seconds=SLEEP_S)
    check = CompiledSpeedCheck(compiled, eager, model_name="TinyNet")
    assert call_repeatedly(check, torch.zeros(1, 3, 8, 8), times=CALLS_TIMED + 3) == []
    assert eager.calls == CALLS_TIMED


@pytest.mark.parametrize(("compiled_seconds", "warns"), [(1.2, False), (1.4, True)])
def test_it_warns_above_1_3_times_the_eager_median(compiled_seconds, warns):
    """On a clock the calls advance: the medians, not the timing noise, decide."""
    clock = SteppedClock()
    check = CompiledSpeedCheck(
        CountingCall(compiled_seconds, clock), CountingCall(1.0, clock), model_name="Net", clock=clock
    )
    caught = call_repeatedly(check, torch.zeros(1, 3, 8, 8), times=CALLS_TIMED + 1)
    assert len(caught) == warns
    if warns:
        assert "1400.00 ms per call against 1000.00 ms for its uncompiled forward (1.4x" in str(caught[0].message)


def test_each_input_shape_is_timed_on_its_calls_2_to_4_and_never_after():
    """The first call of a shape compiles; after the window the compiled call runs alone."""
    clock, eager = SteppedClock(), CountingCall()
    check = CompiledSpeedCheck(CountingCall(), eager, model_name="Net", clock=clock)
    channels_last = torch.zeros(1, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    # Other strides compile anew, so they are a shape of their own.
    for pixel_values in (torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 16, 16), channels_last):
        for times, timed in ((1, False), (CALLS_TIMED, True), (10, False)):
            reads_before, eager_before = clock.reads, eager.calls
            call_repeatedly(check, pixel_values, times=times)
            assert (clock.reads - reads_before, eager.calls - eager_before) == ((3 * times, times) if timed else (0, 0))


def tiny_compiled_backbone() -> ResNetBackbone:
    """Compiled lazily: nothing compiles before its first call, which these tests never make."""
    model = ResNetBackbone(**TINY_BASIC).eval()
    compile_without_autograd(model, {"freezing": True})
    return model


def test_the_check_wraps_a_compiled_model_unless_switched_off(monkeypatch):
    monkeypatch.delenv(CHECK_VARIABLE, raising=False)
    model = tiny_compiled_backbone()
    check_compiled_speed(model)
    assert isinstance(model._compiled_call_impl, CompiledSpeedCheck)
    assert model._compiled_call_impl.model_name == "ResNetBackbone"
    monkeypatch.setenv(CHECK_VARIABLE, "0")
    model = tiny_compiled_backbone()
    check_compiled_speed(model)
    assert not isinstance(model._compiled_call_impl, CompiledSpeedCheck)


def test_an_uncompiled_model_is_refused_with_what_to_do(monkeypatch):
    monkeypatch.delenv(CHECK_VARIABLE, raising=False)  # the benchmark suite's main() switches the check off
    with pytest.raises(TypeError, match="ResNetBackbone is not compiled: compile it with compile_without_autograd"):
        check_compiled_speed(ResNetBackbone(**TINY_BASIC))


def test_the_inductor_cache_dir_is_the_variable_or_inductors_default(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    assert inductor_cache_dir() == str(tmp_path / "cache")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert inductor_cache_dir() == os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    from torch._inductor.runtime import cache_dir_utils

    monkeypatch.delattr(cache_dir_utils, "default_cache_dir")
    with pytest.raises(RuntimeError, match=rf"torch {re.escape(torch.__version__)} changed .*default_cache_dir"):
        inductor_cache_dir()


def test_the_warning_points_at_the_line_that_called_the_model():
    """Through nn.Module's call, as a user meets it; the compiled call is stood in for by the eager one plus a
    sleep, so nothing compiles."""
    model = tiny_compiled_backbone()

    def slow_check(compiled: Callable, eager: Callable) -> CompiledSpeedCheck:
        def slow_compiled(pixel_values: torch.Tensor) -> object:
            time.sleep(0.2)  # over 1.3 times the eager call while that takes under 0.6 s, as a tiny model does
            return eager(pixel_values)

        return CompiledSpeedCheck(slow_compiled, eager, model_name="ResNetBackbone")

    wrap_compiled_call(model, slow_check)
    pixel_values = torch.zeros(1, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(CALLS_TIMED + 2):
            model(pixel_values)
    assert [(warning.category, warning.filename) for warning in caught] == [(CompiledSlowerWarning, __file__)]
