"""What gradient checkpointing buys and costs: peak training memory and step time, with and without it.

``python -m benchmarks.grad_checkpointing`` (from the repository root) trains ResNet-50 at batch 8 x
512x512 (all four stages as outputs, as a detector uses them) and reports both in one run, with the two
cases timed in interleaved rounds. The project's bar: at most half the memory for at most 1.35x the time, so
that checkpointing is worth turning on wherever memory limits the batch or the image size.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from resnet_backbone import ResNetBackbone

from .counters import peak_memory_bytes
from .timing import time_interleaved

MEMORY_BAR, TIME_BAR = 0.5, 1.35


def training_step(checkpointing: bool, batch: int, size: int, architecture: str) -> Callable[[], None]:
    torch.manual_seed(0)
    backbone = ResNetBackbone.from_preset(architecture, out_features=["stage1", "stage2", "stage3", "stage4"])
    backbone.train().set_grad_checkpointing(checkpointing)
    images = torch.randn(batch, 3, size, size)

    def step() -> None:
        backbone.zero_grad(set_to_none=True)
        sum(feature.mean() for feature in backbone(images).feature_maps).backward()

    return step


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.grad_checkpointing", description=__doc__)
    parser.add_argument("--architecture", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-dir", type=Path, default=Path("benchmark-results"))
    args = parser.parse_args(argv)
    steps = {checkpointing: training_step(checkpointing, args.batch, args.size, args.architecture)
             for checkpointing in (False, True)}  # fmt: skip
    cpu = torch.device("cpu")
    with tqdm(total=2 * (args.rounds + 1), desc="grad checkpointing", unit="step") as progress:
        memory = {key: peak_memory_bytes(step, cpu) for key, step in steps.items()}
        timings = time_interleaved(steps, rounds=args.rounds, warmup=1, device=cpu, progress=progress)
    memory_ratio = memory[True] / memory[False]
    time_ratio = timings[True].median / timings[False].median
    shape = f"{args.batch}x3x{args.size}x{args.size}"
    result = {
        "workload": f"{args.architecture} training step, {shape}, {torch.get_num_threads()} threads",
        "peak_memory_mib": {str(k): v / 2**20 for k, v in memory.items()},
        "step_seconds_median": {str(k): t.median for k, t in timings.items()},
        "memory_ratio": memory_ratio,
        "time_ratio": time_ratio,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "grad_checkpointing.json").write_text(json.dumps(result, indent=2) + "\n")
    print(result["workload"])
    print("| gradient checkpointing | peak memory (MiB) | step time, median s (min-max) |")
    print("|---|---|---|")
    for key in (False, True):
        timing, label = timings[key], "on" if key else "off"
        print(f"| {label} | {memory[key] / 2**20:.0f} | {timing.median:.2f} ({timing.min:.2f}-{timing.max:.2f}) |")
    print(f"memory {memory_ratio:.2f}x (bar <= {MEMORY_BAR}), time {time_ratio:.2f}x (bar <= {TIME_BAR})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
