"""The machine the suite runs on: what it is, and its own matrix-multiply limit."""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Callable
from functools import partial
from pathlib import Path

import timm
import torch
import torchvision
import transformers

from resnet_backbone import computes_bf16_natively

PEAK_DTYPES = (torch.float32, torch.bfloat16)


def describe_machine(device: torch.device) -> dict[str, object]:
    """Processor, threads, library versions, date and load: what a reader needs to compare two runs."""
    processor = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    return {
        "device": device.type,
        "processor": processor,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def peak_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """The dtypes whose matmul peak a run needs: bf16 only where ``device`` computes it natively (elsewhere no
    bf16 mode runs, and its emulated matmul would cost seconds per workload for nothing)."""
    return PEAK_DTYPES if computes_bf16_natively(device) else (torch.float32,)


def matmul_runs(device: torch.device, size: int) -> dict[str, Callable[[], torch.Tensor]]:
    """A ``size`` x ``size`` matrix multiply per dtype of :func:`peak_dtypes`: the most a convolution can hope
    for, since the convolution kernels are matrix multiplies underneath. Timed within each workload's rounds,
    so that the peak and the cases see the machine in the same state."""
    generator = torch.Generator(device).manual_seed(0)
    runs = {}
    for dtype in peak_dtypes(device):
        first, second = (torch.randn(size, size, generator=generator, device=device, dtype=dtype) for _ in range(2))
        runs[str(dtype).removeprefix("torch.")] = partial(torch.mm, first, second)
    return runs
