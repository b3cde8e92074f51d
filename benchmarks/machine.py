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
# The CPU features that decide how fast the convolutions can run: AVX-512, and native bf16 and int8 dot products.
RELEVANT_CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni")


def describe_machine(device: torch.device) -> dict[str, object]:
    """Processor, threads, library versions, date and load: what a reader needs to compare two runs."""
    cpuinfo = _cpuinfo()
    cpu = cpuinfo.get("model name") or platform.processor() or platform.machine()
    flags = set(cpuinfo["flags"].split()) if "flags" in cpuinfo else None
    return {
        "device": device.type,
        **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}),
        "cpu": cpu,
        # Which of RELEVANT_CPU_FLAGS the CPU has; None where the system does not list them (no /proc/cpuinfo).
        "cpu_flags": None if flags is None else {flag: flag in flags for flag in RELEVANT_CPU_FLAGS},
        "native_bf16": computes_bf16_natively(device),
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


def processor(machine: dict[str, object]) -> object:
    """The name of what ran the work in a :func:`describe_machine` record: the GPU on CUDA, else the CPU."""
    return machine.get("gpu", machine["cpu"])


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in Linux's ``/proc/cpuinfo`` (``model name``, ``flags``, ...); empty elsewhere."""
    cpuinfo = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if not line.strip():
                break
            name, _, value = line.partition(":")
            fields[name.strip()] = value.strip()
    return fields


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
