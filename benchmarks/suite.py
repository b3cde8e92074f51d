"""The command line of the suite (``python -m benchmarks``, ``resnet-backbone bench``) and the whole run."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from resnet_backbone.compiled_speed import CHECK_VARIABLE

from .dense import TASKS, DenseWorkload, run_dense_workload, select_workloads
from .machine import describe_machine, peak_dtypes
from .page import write_page
from .peers import ARCHITECTURES, build_peers
from .plot import write_plot
from .report import format_report, write_json
from .results import SuiteResult
from .targets import evaluate_dense_targets, evaluate_sweep_targets, evaluate_targets
from .workloads import Settings, Workload, plan, run_workload

DEFAULT_RUNS = dict(
    inference_shapes=((4, 224), (1, 640)),
    training_shape=(4, 224),
    # One image from 224 to 1216 pixels, then 224 pixels from 2 to 16 images.
    sweep_shapes=tuple((1, size) for size in (224, 384, 512, 640, 800, 1024, 1216))
    + tuple((batch, 224) for batch in (2, 4, 8, 16)),
    rounds=7,
    sweep_rounds=3,  # a trend over sizes, eager and the fast path only: 1216 pixels takes seconds per call
    dense_rounds=3,  # a whole detector at 800x1216 takes seconds per call on a CPU
    warmup=2,
    matmul_size=2048,
)
ALL_TASKS = ("backbone", *TASKS)
QUICK_TASKS = ("backbone", "detection")
# Seconds on any machine: proves the whole pipeline (outputs checked, files written), measures nothing.
SMOKE_RUNS = dict(
    inference_shapes=((1, 32),),
    training_shape=(2, 32),
    sweep_shapes=((1, 32), (1, 48), (2, 32)),
    rounds=1,
    sweep_rounds=1,
    dense_rounds=1,
    warmup=0,
    matmul_size=128,
)


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Compare this project's ResNetBackbone with torchvision, timm and transformers (same weights, "
        "same inputs, outputs checked equal), in one process with interleaved rounds.",
    )
    parser.add_argument(
        "--models", nargs="+", choices=ARCHITECTURES, default=["resnet50"], help="architectures (default: resnet50)"
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=ALL_TASKS,
        help="backbone: the four libraries' ResNets; detection, segmentation, finetune: whole models against "
        f"torchvision's and smp's own (default: {' '.join(QUICK_TASKS)}; with --full: all). Without --full each "
        "task runs its headline workload only",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="every workload and mode of the tasks (30+ minutes on 2 CPU cores); the default is the quick "
        "selection: the headline backbone modes at 4x3x224x224 (compiled: our fast path bf16 only) and Faster "
        "R-CNN inference uncompiled (minutes)",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile modes (minutes on a CPU)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, resnet18, no compile, of the quick selection or of --full: checks that the suite runs",
    )
    parser.add_argument("--rounds", type=int, help=f"timed rounds per workload (default {DEFAULT_RUNS['rounds']})")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, here %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument(
        "--output-dir", type=Path, default=Path("benchmark-results"), help="for results.json and results.png"
    )
    parser.add_argument(
        "--report",
        type=Path,
        metavar="PAGE.md",
        help="also write the tables as a Markdown page with the machine, the date and this command "
        "(e.g. docs/benchmarks.md)",
    )
    parser.set_defaults(threads=torch.get_num_threads())
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m benchmarks") -> int:
    """Run the suite, print its tables and write results.json, results.png and, with ``--report``, the page.

    Args:
        argv: the options (default: ``sys.argv[1:]``); ``--help`` lists them.
        prog: the command that runs the suite, shown in the help and written on the page.

    Returns:
        0; invalid options exit with argparse's status 2 before anything runs.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args = parser.parse_args(arguments)
    _create_output_folders(parser, args)
    settings, backbone, dense = select(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    # The suite compares the compiled modes with the uncompiled ones itself, and its timed rounds can be the
    # compiled-speed check's window, whose extra uncompiled calls they would count.
    os.environ[CHECK_VARIABLE] = "0"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the fastest convolution algorithm for each shape
    result = run_suite(settings, device, backbone=backbone, dense=dense)
    write_json(result, args.output_dir / "results.json")
    write_plot(result, args.output_dir / "results.png")
    print(format_report(result))
    print(f"\nwrote {args.output_dir / 'results.json'} and {args.output_dir / 'results.png'}")
    if args.report is not None:
        write_page(result, args.report, command=" ".join((prog, *map(shlex.quote, arguments))))
        print(f"wrote {args.report}")
    return 0


def select(args: argparse.Namespace) -> tuple[Settings, bool, list[DenseWorkload]]:
    """What the parsed options run: the backbone settings, whether the backbone task runs, the dense workloads.

    Args:
        args: options parsed by :func:`build_parser`.

    Returns:
        ``(settings, backbone, dense)``: the quick selection of the tasks unless ``--full``, at smoke sizes with
        ``--smoke``.
    """
    tasks = args.tasks or (ALL_TASKS if args.full else QUICK_TASKS)
    runs = SMOKE_RUNS if args.smoke else DEFAULT_RUNS
    settings = Settings(
        architectures=("resnet18",) if args.smoke else tuple(args.models),
        compile=not (args.smoke or args.no_compile),
        full=args.full,
        **{**runs, "rounds": args.rounds or runs["rounds"]},
    )
    return settings, "backbone" in tasks, select_workloads(tasks, full=args.full, smoke=args.smoke)


def _create_output_folders(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check, then create, the folders the run writes to, before it starts: a path that cannot be written fails
    at once and creates nothing, not after the whole suite."""
    if args.report is not None and args.report.is_dir():
        parser.error(
            f"--report {args.report} is a folder: give the page's file name, e.g. {args.report / 'benchmarks.md'}"
        )
    folders = {"--output-dir": args.output_dir, **({} if args.report is None else {"--report": args.report.parent})}
    for option, folder in folders.items():
        existing = next(path for path in (folder, *folder.parents) if path.exists())
        if not existing.is_dir():
            parser.error(f"{option}: cannot create the folder {folder}: {existing} is a file; choose another path")
        if not os.access(existing, os.W_OK | os.X_OK):
            parser.error(
                f"{option}: cannot create the folder {folder}: {existing} is not writable; choose another path"
            )
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)


def run_suite(
    settings: Settings, device: torch.device, *, backbone: bool = True, dense: Sequence[DenseWorkload] = ()
) -> SuiteResult:
    started = time.perf_counter()
    workloads = plan(settings, device) if backbone else []
    calls = sum((len(w.cases) + len(peak_dtypes(device))) * (1 + sum(_rounds(settings, w))) for w in workloads)
    calls += len(dense) * 8 * (1 + settings.dense_rounds)
    result = SuiteResult(machine=describe_machine(device), settings=asdict(settings))
    with tqdm(total=calls, unit="call") as progress:
        for architecture in settings.architectures if backbone else ():
            models = {library: model.to(device) for library, model in build_peers(architecture).items()}
            for workload in (w for w in workloads if w.architecture == architecture):
                rounds, warmup = _rounds(settings, workload)
                measured = run_workload(
                    workload,
                    models,
                    rounds=rounds,
                    warmup=warmup,
                    matmul_size=settings.matmul_size,
                    device=device,
                    progress=progress,
                )
                result.workloads.append(measured)
            ours = [w for w in result.workloads if w.architecture == architecture]
            result.targets += evaluate_targets(ours[0])
            result.targets += evaluate_sweep_targets([w for w in ours if w.kind == "sweep"])
        for workload in dense:
            measured = run_dense_workload(
                workload,
                compile=settings.compile,
                full=settings.full,
                rounds=settings.dense_rounds,
                matmul_size=settings.matmul_size,
                device=device,
                progress=progress,
            )
            result.workloads.append(measured)
            result.targets += evaluate_dense_targets(measured)
    result.wall_s = time.perf_counter() - started
    return result


def _rounds(settings: Settings, workload: Workload) -> tuple[int, int]:
    """Timed rounds and warm-up calls of a backbone workload: fewer for the sweep, which only shows a trend."""
    if workload.kind == "sweep":
        return settings.sweep_rounds, min(settings.warmup, 1)
    return settings.rounds, settings.warmup
