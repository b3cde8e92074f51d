"""How a case runs: precision, memory format, compilation, this project's fast path, or a training step."""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from resnet_backbone import computes_bf16_natively, computes_int8_natively, optimize_for_inference
from resnet_backbone.inference import FLOAT32_TOLERANCE, LOW_PRECISION_TOLERANCE
from resnet_backbone.torch_compat import compile_without_autograd

from .peers import LIBRARIES, OURS, feature_maps


@dataclass(frozen=True)
class Mode:
    """``dtype`` is the precision of the arithmetic: it picks the matmul peak and the output tolerance."""

    name: str
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    autocast: bool = False
    compile: bool = False
    frozen: bool = False  # compiled with inductor's freezing (its documented inference setting), not the defaults
    fast_path: bool = False
    training: bool = False

    @property
    def tolerance(self) -> float:
        return tolerance_for(self.dtype)


def tolerance_for(dtype: torch.dtype) -> float | None:
    """Max abs difference from the float32 reference, as a fraction of the output's scale; None for int8,
    whose parity is checked by :func:`min_cosine_for` instead."""
    if dtype == torch.int8:
        return None
    return FLOAT32_TOLERANCE if dtype == torch.float32 else LOW_PRECISION_TOLERANCE


def min_cosine_for(dtype: torch.dtype) -> float | None:
    """The least cosine similarity to the float32 reference an int8 mode must keep (None: floating point,
    checked by :func:`tolerance_for`)."""
    return INT8_MIN_COSINE if dtype == torch.int8 else None


def why_not_run(dtype: torch.dtype, compiled: bool, *, compile: bool, device: torch.device) -> str | None:
    """Why a mode is skipped on this machine (listed in the report), or None when it runs."""
    if dtype == torch.bfloat16 and not computes_bf16_natively(device):
        return f"this {device.type} has no native bf16 (slower than float32 here)"
    if dtype == torch.int8 and not computes_int8_natively(device):
        return f"this {device.type} has no native int8 (VNNI or AMX-INT8)"
    if dtype == torch.int8 and importlib.util.find_spec("torchao") is None:
        return "torchao, which quantizes to int8, is not installed"
    if compiled and not compile:
        return "compiled modes not run (--no-compile or --smoke)"
    return None


INT8_MIN_COSINE = 0.99
# A bf16 or float16 detector's dense outputs against float32's: rounding only, closer than int8's.
LOW_PRECISION_MIN_COSINE = 0.995
CALIBRATION_BATCHES = 4  # random inputs of the workload's shape, none of them the timed one

EAGER_FP32 = Mode("eager fp32")
TRAINING_FP32 = Mode("train step fp32", training=True)
# Every library runs these. The compiled ones are the peers' best: channels_last and bf16 autocast, with
# torch.compile as it comes, and with inductor's freezing (the weights become constants).
_BEST_PEER_SETTINGS = dict(dtype=torch.bfloat16, channels_last=True, autocast=True, compile=True)
PEER_COMPILED = Mode("compiled bf16 autocast channels_last", **_BEST_PEER_SETTINGS)
LIBRARY_MODES = (
    EAGER_FP32,
    Mode("eager fp32 channels_last", channels_last=True),
    Mode("eager bf16 autocast", dtype=torch.bfloat16, autocast=True),
    PEER_COMPILED,
    Mode("compiled frozen bf16 autocast channels_last", **_BEST_PEER_SETTINGS, frozen=True),
    # The peers' best float32 (the best mode where bf16 is not native).
    Mode("compiled frozen fp32 channels_last", channels_last=True, compile=True, frozen=True),
)
# This project only: optimize_for_inference (channels_last weights), given the same float32 channels_last
# input as the peers' channels_last modes.
FAST_PATH_FP32 = Mode("fast path fp32", channels_last=True, fast_path=True)
FAST_PATH_BF16_COMPILED = Mode(
    "fast path bf16 compiled", dtype=torch.bfloat16, channels_last=True, fast_path=True, compile=True
)
FAST_PATH_BF16 = Mode("fast path bf16", dtype=torch.bfloat16, channels_last=True, fast_path=True)
FAST_PATH_INT8 = Mode("fast path int8 compiled", dtype=torch.int8, channels_last=True, fast_path=True, compile=True)
FAST_PATH_MODES = (
    FAST_PATH_FP32,
    FAST_PATH_BF16,
    Mode("fast path fp32 compiled", channels_last=True, fast_path=True, compile=True),
    FAST_PATH_BF16_COMPILED,
    FAST_PATH_INT8,  # always compiled
)
# The quick default's backbone cases: every library eager, our fast path uncompiled, and compiled only where it
# is the point (our fastest mode, one compile).
HEADLINE_CASES = (
    *((library, EAGER_FP32) for library in LIBRARIES),
    *((OURS, mode) for mode in (FAST_PATH_FP32, FAST_PATH_BF16, FAST_PATH_BF16_COMPILED)),
)


def prepare(mode: Mode, model: nn.Module, pixel_values: torch.Tensor) -> Callable[[], Any]:
    """A call that runs ``model`` on ``pixel_values`` in ``mode``; the caller's model is left as it is."""
    if mode.training:
        return _training_step(copy.deepcopy(model).train(), pixel_values)
    device = pixel_values.device
    if mode.channels_last:
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
    if mode.fast_path:
        options = {}
        if mode.dtype == torch.int8:
            options["calibration"] = calibration_inputs(lambda seed: random_batch(pixel_values.shape, seed).to(device))
        model = optimize_for_inference(model, dtype=mode.dtype, compile=mode.compile, **options)
    else:
        model = copy.deepcopy(model)
        if mode.channels_last:
            model.to(memory_format=torch.channels_last)
        if mode.frozen:
            # As compile_for_inference, but with inductor's freezing only. dynamic=False keeps this compilation
            # from reusing the unfrozen one of the plain compiled mode (Dynamo shares entries between equal
            # compile settings).
            compile_without_autograd(model, {"freezing": True})
        elif mode.compile:
            model = torch.compile(model)

    def run() -> Any:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode.autocast):
            return model(pixel_values)

    return run


def calibration_inputs(make: Callable[[int], Any]) -> list[Any]:
    """:data:`CALIBRATION_BATCHES` inputs ``make(seed)`` with seeds 1, 2, ...: the timed input has seed 0."""
    return [make(seed) for seed in range(1, CALIBRATION_BATCHES + 1)]


def random_batch(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Normal random pixels from ``seed``: 0 for the timed input, others for int8's calibration."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _training_step(model: nn.Module, pixel_values: torch.Tensor) -> Callable[[], Any]:
    def step() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        maps = feature_maps(model(pixel_values))
        sum(feature_map.mean() for feature_map in maps).backward()
        return maps

    return step
