"""The benchmark suite through its real entry points: the smoke run goes end to end, checks every case's
outputs against the reference before timing, and writes its files. Timings are never asserted: the CPU is
shared, and the suite's numbers belong on the page it generates (``--report``), not in a test."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from resnet_backbone import computes_bf16_natively, computes_int8_natively
from resnet_backbone.benchmarks.agreement import Agreement
from resnet_backbone.benchmarks.compiled import FirstCall, find_slow_compiled, uncompiled_twin
from resnet_backbone.benchmarks.counters import peak_memory_bytes
from resnet_backbone.benchmarks.dense import (
    DEFAULT_WORKLOADS,
    FINETUNE_MODES,
    OUR_INFERENCE_MODES,
    cases_for,
)
from resnet_backbone.benchmarks.machine import RELEVANT_CPU_FLAGS, describe_machine
from resnet_backbone.benchmarks.modes import (
    CALIBRATION_BATCHES,
    EAGER_FP32,
    FAST_PATH_BF16,
    FAST_PATH_BF16_COMPILED,
    FAST_PATH_FP32,
    FAST_PATH_INT8,
    FAST_PATH_MODES,
    HEADLINE_CASES,
    LIBRARY_MODES,
    PEER_COMPILED,
    calibration_inputs,
    random_batch,
    why_not_run,
)
from resnet_backbone.benchmarks.page import format_page
from resnet_backbone.benchmarks.report import format_tables, write_json
from resnet_backbone.benchmarks.results import SuiteResult, WorkloadResult
from resnet_backbone.benchmarks.suite import build_parser, select
from resnet_backbone.benchmarks.targets import evaluate_sweep_targets
from resnet_backbone.benchmarks.timing import Timing
from resnet_backbone.benchmarks.workloads import case_results, plan
from resnet_backbone.cli.main import main
from resnet_backbone.torch_compat import inductor_cache_dir

REPOSITORY = Path(__file__).resolve().parents[1]
LIBRARIES = {"torchvision", "resnet_backbone", "timm", "transformers"}
CPU = torch.device("cpu")


def _selection(arguments: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The labels of the backbone workloads and the (task, model) dense workloads the options run."""
    settings, backbone, dense = select(build_parser("resnet-backbone bench").parse_args(arguments))
    return [w.label for w in plan(settings, CPU)] if backbone else [], [(w.task, w.model) for w in dense]


def test_the_default_is_the_quick_selection_and_full_runs_every_workload():
    backbone, dense = _selection([])
    assert backbone == ["resnet50 inference 4x3x224x224"] and dense == [("detection", "fasterrcnn")]
    settings, _, _ = select(build_parser("bench").parse_args([]))
    (inference,) = plan(settings, CPU)
    native = [case for case in HEADLINE_CASES if computes_bf16_natively() or case[1].dtype == torch.float32]
    assert inference.cases == tuple(native)  # every library eager, our fast path, compiled: our bf16 only
    assert [mode for _, mode in HEADLINE_CASES if mode.compile] == [FAST_PATH_BF16_COMPILED]
    fasterrcnn = DEFAULT_WORKLOADS[0]
    quick_cases, _ = cases_for(fasterrcnn, "torchvision", compile=True, full=False, device=CPU)
    assert quick_cases and not any(mode.compile for _, mode in quick_cases)  # the quick default compiles no whole model

    backbone, dense = _selection(["--full"])
    assert backbone == [
        "resnet50 inference 4x3x224x224",
        "resnet50 inference 1x3x640x640",
        "resnet50 training 4x3x224x224",
        *(f"resnet50 sweep 1x3x{size}x{size}" for size in (224, 384, 512, 640, 800, 1024, 1216)),
        *(f"resnet50 sweep {batch}x3x224x224" for batch in (2, 4, 8, 16)),
    ]
    settings, _, _ = select(build_parser("bench").parse_args(["--full"]))
    sweep = [workload for workload in plan(settings, CPU) if workload.kind == "sweep"]
    ours = {mode for library, mode in sweep[0].cases if library == "resnet_backbone"}
    assert {FAST_PATH_FP32, FAST_PATH_MODES[2]} <= ours and FAST_PATH_INT8 not in ours  # compiled or not
    assert dense == [(w.task, w.model) for w in DEFAULT_WORKLOADS]
    full_cases, _ = cases_for(fasterrcnn, "torchvision", compile=True, full=True, device=CPU)
    assert {mode for _, mode in full_cases if mode.compile} and set(quick_cases) < set(full_cases)


@pytest.mark.parametrize(
    ("arguments", "backbone", "dense"),
    [
        (["--tasks", "segmentation"], [], [("segmentation", "deeplabv3")]),
        (["--full", "--tasks", "segmentation"], [], [("segmentation", "deeplabv3"), ("segmentation", "unet")]),
        (["--tasks", "backbone", "--models", "resnet18", "resnet101"],
         ["resnet18 inference 4x3x224x224", "resnet101 inference 4x3x224x224"], []),
        (["--smoke"], ["resnet18 inference 1x3x32x32"], [("detection", "fasterrcnn")]),
    ],
)  # fmt: skip
def test_tasks_models_and_smoke_narrow_the_quick_selection_as_they_do_the_full_one(arguments, backbone, dense):
    assert _selection(arguments) == (backbone, dense)


@pytest.mark.slow
def test_smoke_run_checks_outputs_and_writes_table_json_and_plot(tmp_path, capsys):
    assert main(["bench", "--smoke", "--full", "--tasks", "backbone", "--output-dir", str(tmp_path)]) == 0

    result = json.loads((tmp_path / "results.json").read_text())
    assert [w["kind"] for w in result["workloads"]] == ["inference", "training", "sweep", "sweep", "sweep"]
    for workload in result["workloads"]:
        assert workload["outputs_checked"] and workload["reference"].startswith("torchvision ")
        assert {case["library"] for case in workload["cases"]} == LIBRARIES
        assert (workload["cases"][0]["library"], workload["cases"][0]["speedup"]) == ("torchvision", 1.0)
        for case in workload["cases"]:
            assert 0 <= case["max_relative_diff"] <= case["tolerance"], (workload["label"], case["mode"])
    modes = {case["mode"] for case in result["workloads"][0]["cases"]}
    skipped = result["workloads"][0]["skipped"]
    assert {"eager fp32 channels_last", "fast path fp32"} <= modes
    if computes_bf16_natively():
        assert {"eager bf16 autocast", "fast path bf16"} <= modes
    else:  # bf16 is slower than float32 here: not run, and the report says why
        assert not any("bf16" in mode for mode in modes)
        assert "no native bf16" in skipped["resnet_backbone fast path bf16"]
    assert not any("compiled" in mode for mode in modes)
    assert "compiled modes not run" in skipped["timm compiled frozen fp32 channels_last"]
    (training,) = (w for w in result["workloads"] if w["kind"] == "training")
    assert all(case["peak_memory_mib"] > 0 for case in training["cases"])
    peaks = {"float32", "bfloat16"} if computes_bf16_natively() else {"float32"}  # no bf16 mode runs without
    assert all(set(w["matmul_peak_gflops"]) == peaks for w in result["workloads"])
    assert [target["met"] for target in result["targets"]][2:5] == [None, None, None]  # compiled modes skipped

    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert "| torchvision     | eager fp32 " in printed and "fast path float32 (no compile)" in printed


@pytest.mark.slow
def test_report_writes_a_generated_page_with_the_machine_the_command_and_the_tables(tmp_path):
    page_path = tmp_path / "docs" / "benchmarks.md"
    arguments = ["--smoke", "--full", "--tasks", "segmentation", "--output-dir", str(tmp_path / "results dir")]
    arguments += ["--report", str(page_path)]
    assert main(["bench", *arguments]) == 0

    page = page_path.read_text()
    assert page.startswith("# Benchmark results\n") and "generated by the benchmark suite; do not edit it" in page
    machine = json.loads((tmp_path / "results dir" / "results.json").read_text())["machine"]
    machine_table = page.split("## Machine\n\n")[1].split("\n\n")[0].splitlines()[2:]  # below the header
    rows = dict((cell.strip() for cell in line.strip("|").split("|")) for line in machine_table)
    assert rows["cpu"] == machine["cpu"] and rows["device"] == "cpu" and rows["torch"] == torch.__version__
    assert rows["torch threads"] == str(torch.get_num_threads()) and rows["date"] == machine["date"]
    assert rows["native bf16"] == ("yes" if computes_bf16_natively() else "no")
    flags = machine["cpu_flags"]
    assert list(flags) == list(RELEVANT_CPU_FLAGS)  # read from /proc/cpuinfo (Linux)
    assert rows["cpu flags"] == (", ".join(f for f, has in flags.items() if has) or f"none of {', '.join(flags)}")
    assert "| smp             | eager fp32 " in page and "deeplabv3 segmentation 1x3x64x64" in page
    assert "\ntargets\n" in page and "wall time" in page
    command = page.split("```bash\n")[1].split("\n```")[0]
    words = shlex.split(command)
    assert words[:2] == ["resnet-backbone", "bench"]
    parser = build_parser("resnet-backbone bench")
    assert parser.parse_args(words[2:]) == parser.parse_args(arguments)
    assert sorted(path.name for path in page_path.parent.iterdir()) == ["benchmarks.md"]  # no staged file left


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (["--report", "{tmp}"], "--report {tmp} is a folder: give the page's file name, e.g. {tmp}/benchmarks.md"),
        (["--report", "{tmp}/file/page.md"], "--report: cannot create the folder {tmp}/file: {tmp}/file is a file"),
        (["--output-dir", "{tmp}/file/x"], "--output-dir: cannot create the folder {tmp}/file/x: {tmp}/file is a file"),
    ],
)  # fmt: skip
def test_an_output_path_that_cannot_be_written_is_refused_before_anything_runs(tmp_path, capsys, options, error):
    (tmp_path / "file").write_text("")
    arguments = ["--smoke", "--output-dir", str(tmp_path / "results"), *(o.format(tmp=tmp_path) for o in options)]
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *arguments])
    assert exit_info.value.code == 2
    assert f"resnet-backbone bench: error: {error.format(tmp=tmp_path)}" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]  # nothing created, nothing run


@pytest.mark.slow
def test_a_peer_that_computes_something_else_is_refused_before_timing():
    from resnet_backbone.benchmarks.modes import EAGER_FP32
    from resnet_backbone.benchmarks.peers import build_peers
    from resnet_backbone.benchmarks.workloads import Workload, run_workload

    models = build_peers("resnet18")
    with torch.no_grad():
        models["timm"].layer4[-1].conv2.weight.mul_(1.01)
    workload = Workload("inference", "resnet18", 1, 32, (("torchvision", EAGER_FP32), ("timm", EAGER_FP32)))
    with pytest.raises(RuntimeError, match="timm eager fp32: outputs differ from the reference by .* of the feature"):
        run_workload(
            workload,
            models,
            rounds=1,
            warmup=0,
            matmul_size=8,
            device=torch.device("cpu"),
            progress=tqdm(disable=True),
        )


@pytest.mark.slow
def test_python_m_benchmarks_runs_from_the_repository_root():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"], cwd=REPOSITORY, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m benchmarks") and "--smoke" in result.stdout


@pytest.mark.slow
def test_dense_smoke_run_checks_whole_segmenters_against_their_peers_and_splits_our_fastest_mode(tmp_path, capsys):
    """DeepLabV3 against torchvision's own, U-Net with a tu-rb_ encoder against smp's resnet50 encoder."""
    assert main(["bench", "--smoke", "--full", "--tasks", "segmentation", "--output-dir", str(tmp_path)]) == 0

    result = json.loads((tmp_path / "results.json").read_text())
    assert [(w["kind"], w["architecture"]) for w in result["workloads"]] == [
        ("segmentation", "deeplabv3"),
        ("segmentation", "unet"),
    ]
    for workload, peer in zip(result["workloads"], ("torchvision", "smp")):
        assert workload["outputs_checked"] and workload["reference"] == f"{peer} eager fp32"
        assert {case["library"] for case in workload["cases"]} == {peer, "resnet_backbone"}
        for case in workload["cases"]:
            assert 0 <= case["max_relative_diff"] <= case["tolerance"], (workload["label"], case["mode"])
        assert any("compiled" in case for case in workload["skipped"])  # the smoke run compiles nothing
        split = workload["part_split_ms"]
        assert split["mode"].startswith("resnet_backbone ") and "rest" in split
    assert {t["name"].split(" (")[0] for t in result["targets"]} >= {"our eager vs the peer's eager"}
    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")
    assert "ms per part" in capsys.readouterr().out


@pytest.mark.slow
def test_dense_smoke_run_checks_detectors_and_fine_tuning_steps_and_splits_the_backward_pass(tmp_path):
    """Faster R-CNN and RetinaNet detections, FCOS and DeepLabV3 training losses against torchvision's own
    models; the training split times each dense part's backward pass too."""
    assert main(["bench", "--smoke", "--full", "--tasks", "detection", "finetune", "--output-dir", str(tmp_path)]) == 0

    result = json.loads((tmp_path / "results.json").read_text())
    assert [(w["kind"], w["architecture"]) for w in result["workloads"]] == [
        ("detection", "fasterrcnn"),
        ("detection", "retinanet"),
        ("finetune", "fcos"),
        ("finetune", "deeplabv3"),
    ]
    for workload in result["workloads"]:
        assert workload["outputs_checked"] and workload["reference"] == "torchvision eager fp32"
        for case in workload["cases"]:
            assert 0 <= case["max_relative_diff"] <= case["tolerance"], (workload["label"], case["mode"])
    fcos, deeplabv3 = result["workloads"][2:]
    assert all(case["peak_memory_mib"] > 0 for case in fcos["cases"] + deeplabv3["cases"])
    assert {"backbone.body backward", "backbone.fpn backward", "head backward"} <= set(fcos["part_split_ms"])
    assert {"backbone backward", "classifier backward"} <= set(deeplabv3["part_split_ms"])
    for workload in (fcos, deeplabv3):
        assert all(ms >= 0 for name, ms in workload["part_split_ms"].items() if name != "mode"), workload["label"]


def test_peak_memory_counts_what_a_call_allocates_and_holds_at_once(capfd):
    """Three ReLUs in a row on a 1 MiB input: each output lives until the next one exists, so two are held at
    once; the input, allocated before the call, does not count. The profiler's own lines stay off stderr."""
    images = torch.randn(256, 1024)
    assert peak_memory_bytes(lambda: images.relu().relu().relu(), torch.device("cpu")) == 2 * 2**20
    assert "profiler_st" not in capfd.readouterr().err


@pytest.mark.slow
def test_peak_memory_of_a_compiled_call_is_that_of_the_compiled_code():
    """Inductor fuses the three ReLUs into one kernel that writes one output: 1 MiB, where eager holds 2 MiB.
    (A counter built on a dispatch mode, such as torch's MemTracker, would see the eager figure: torch.compile
    runs the eager code under one.)"""
    images = torch.randn(256, 1024)
    compiled = torch.compile(lambda: images.relu().relu().relu())
    compiled()
    assert peak_memory_bytes(compiled, torch.device("cpu")) == 2**20


@pytest.mark.parametrize(
    ("case", "cases", "twin"),
    [
        (("resnet_backbone", FAST_PATH_BF16_COMPILED), HEADLINE_CASES, FAST_PATH_BF16.name),
        (("timm", PEER_COMPILED), [("timm", mode) for mode in LIBRARY_MODES], "eager bf16 autocast"),
        (("timm", LIBRARY_MODES[-1]), [("timm", mode) for mode in LIBRARY_MODES], "eager fp32 channels_last"),
        (("resnet_backbone", FAST_PATH_MODES[2]), [("resnet_backbone", m) for m in FAST_PATH_MODES], "fast path fp32"),
        (("torchvision", FINETUNE_MODES[1]), [("torchvision", mode) for mode in FINETUNE_MODES], "eager fp32"),
        (("resnet_backbone", OUR_INFERENCE_MODES[-1]), [("resnet_backbone", m) for m in OUR_INFERENCE_MODES], None),
        (("timm", PEER_COMPILED), [("torchvision", EAGER_FP32), ("timm", PEER_COMPILED)], None),
        (("timm", EAGER_FP32), [("timm", mode) for mode in LIBRARY_MODES], None),
    ],
)  # fmt: skip
def test_a_compiled_mode_is_compared_with_the_same_library_and_precision_uncompiled(case, cases, twin):
    """The closest uncompiled mode: the same memory format where it runs, else the same precision's eager; none
    across libraries or precisions (our dense bf16 runs compiled only), and none for an uncompiled mode."""
    assert uncompiled_twin(case, cases) == twin


def test_a_compiled_mode_slower_than_its_uncompiled_twin_is_flagged_in_the_json_and_the_page(tmp_path, monkeypatch):
    """Results built directly: the compiled fp32 fast path is slower than the uncompiled one (flagged, with the
    graph cache counts of its first call, the inductor cache folder and the threads); bf16 compiled is faster."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor cache"))
    fp32_compiled = FAST_PATH_MODES[2]
    median_ms = {EAGER_FP32: 200, FAST_PATH_FP32: 100, fp32_compiled: 120, FAST_PATH_BF16: 50}
    median_ms[FAST_PATH_BF16_COMPILED] = 30
    timings = {("resnet_backbone", mode): Timing(ms / 1e3, ms / 1e3, ms / 1e3) for mode, ms in median_ms.items()}
    graph_cache = {"hit": 1, "miss": 2, "bypass": 0}
    first_calls = {case: FirstCall(1.0, graph_cache) for case in timings}
    reference = ("resnet_backbone", EAGER_FP32)
    peaks = {"float32": 300.0, "bfloat16": 1500.0}
    agreements = dict.fromkeys(timings, Agreement(0.0, 1.0))
    cases = case_results(timings, reference, 4, 10**10, peaks, first_calls, agreements, {})
    assert [case.fx_graph_cache for case in cases] == [None, None, graph_cache, None, graph_cache]

    (flag,) = find_slow_compiled(cases)
    assert (flag.case, flag.twin) == ("resnet_backbone fast path fp32 compiled", "resnet_backbone fast path fp32")
    assert (flag.median_ms, flag.twin_median_ms, flag.fx_graph_cache) == (120, 100, graph_cache)
    assert flag.inductor_cache_dir == inductor_cache_dir() == str(tmp_path / "inductor cache")
    assert flag.threads == torch.get_num_threads()
    label = "resnet50 inference 4x3x224x224"
    workload = WorkloadResult(label, "inference", "resnet50", 4, 224, 10**10, peaks, "resnet_backbone eager fp32",
                              True, cases, slow_compiled=[flag])  # fmt: skip
    result = SuiteResult(machine=describe_machine(CPU), settings={"full": True}, workloads=[workload])
    write_json(result, tmp_path / "results.json")
    (written,) = json.loads((tmp_path / "results.json").read_text())["workloads"][0]["slow_compiled"]
    assert written["case"] == flag.case and written["fx_graph_cache"] == graph_cache

    page = format_page(result, "resnet-backbone bench --full")
    table = page.split("compiled modes slower than their uncompiled twin\n\n")[1].split("\n\n")[0].splitlines()
    (row,) = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert row == [label, flag.case, flag.twin, "120.0", "100.0", "1.20x", "1 hit, 2 miss, 0 bypass",
                   str(tmp_path / "inductor cache"), str(torch.get_num_threads())]  # fmt: skip


def test_the_sweep_target_is_the_least_ratio_of_any_fast_path_mode_at_any_shape_and_names_where():
    """Results built directly: our eager mode's ratio does not count, the fast path's least one does."""
    fp32_compiled = FAST_PATH_MODES[2]

    def sweep_point(batch: int, size: int, median_ms: dict) -> WorkloadResult:
        timings = {case: Timing(ms / 1e3, ms / 1e3, ms / 1e3) for case, ms in median_ms.items()}
        first_calls = {case: FirstCall(1.0, None) for case in timings}
        agreements = dict.fromkeys(timings, Agreement(0.0, 1.0))
        reference = ("torchvision", EAGER_FP32)
        cases = case_results(timings, reference, batch, 10**9, {"float32": 1.0}, first_calls, agreements, {})
        label = f"resnet50 sweep {batch}x3x{size}x{size}"
        return WorkloadResult(label, "sweep", "resnet50", batch, size, 10**9, {}, "torchvision eager fp32", True, cases)

    ours = partial(tuple.__add__, ("resnet_backbone",))
    sweep = [
        sweep_point(1, 224, {("torchvision", EAGER_FP32): 60, ours((EAGER_FP32,)): 90, ours((FAST_PATH_FP32,)): 50,
                             ours((fp32_compiled,)): 40}),
        sweep_point(16, 224, {("torchvision", EAGER_FP32): 800, ours((EAGER_FP32,)): 790,
                              ours((FAST_PATH_FP32,)): 820, ours((fp32_compiled,)): 500}),
    ]  # fmt: skip
    (target,) = evaluate_sweep_targets(sweep)
    assert target.measured == pytest.approx(800 / 820) and target.met is False
    assert target.name.endswith("(batch 1-16, 224-224 px); least: fast path fp32 at resnet50 sweep 16x3x224x224")
    assert evaluate_sweep_targets([]) == []

    table = format_tables(SuiteResult(machine={}, settings={"full": True}, workloads=sweep))
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines() if "|" in line]
    assert rows[0] == ["library", "mode", "1x224", "16x224"]
    assert ["resnet_backbone", "fast path fp32", "50.0 (1.20x)", "51.2 (0.98x)"] in rows  # ms per image (speedup)


@pytest.mark.slow
def test_a_compiled_mode_records_its_twin_and_whether_its_graphs_came_from_the_cache():
    from resnet_backbone.benchmarks.peers import build_peers
    from resnet_backbone.benchmarks.workloads import Workload, run_workload

    cases = (("torchvision", EAGER_FP32), ("resnet_backbone", FAST_PATH_FP32), ("resnet_backbone", FAST_PATH_MODES[2]))
    workload = Workload("inference", "resnet18", 1, 32, cases)
    result = run_workload(
        workload, build_peers("resnet18"), rounds=1, warmup=0, matmul_size=8, device=CPU, progress=tqdm(disable=True)
    )
    eager, fast, compiled = result.cases
    assert (eager.uncompiled_twin, eager.fx_graph_cache, fast.uncompiled_twin) == (None, None, None)
    assert compiled.uncompiled_twin == "fast path fp32"
    assert set(compiled.fx_graph_cache) == {"hit", "miss", "bypass"} and sum(compiled.fx_graph_cache.values()) >= 1
    assert [flag.case for flag in result.slow_compiled] in ([], ["resnet_backbone fast path fp32 compiled"])


def test_int8_modes_run_where_int8_is_native_and_torchao_is_installed_or_are_skipped_with_the_reason(monkeypatch):
    """In --full, with the compiled modes: our int8 fast path in the backbone and the dense inference suites."""
    settings, _, dense = select(build_parser("bench").parse_args(["--full"]))
    backbone = plan(settings, CPU)[0]
    fasterrcnn_cases, fasterrcnn_skipped = cases_for(dense[0], "torchvision", compile=True, full=True, device=CPU)
    int8 = OUR_INFERENCE_MODES[-1]
    assert (int8.name, int8.dtype) == (FAST_PATH_INT8.name, torch.int8)
    if computes_int8_natively() and importlib.util.find_spec("torchao"):
        assert ("resnet_backbone", FAST_PATH_INT8) in backbone.cases and ("resnet_backbone", int8) in fasterrcnn_cases
    else:
        assert "resnet_backbone fast path int8 compiled" in dict(backbone.skipped)
        assert "resnet_backbone fast path int8 compiled" in fasterrcnn_skipped

    assert why_not_run(torch.int8, True, compile=True, device=torch.device("cuda")) == (
        "this cuda has no native int8 (VNNI or AMX-INT8)"
    )
    assert why_not_run(torch.int8, True, compile=False, device=CPU) in (
        "compiled modes not run (--no-compile or --smoke)",
        "this cpu has no native int8 (VNNI or AMX-INT8)",
    )
    monkeypatch.setitem(sys.modules, "torchao", None)  # what an environment without torchao imports
    if computes_int8_natively():
        assert why_not_run(torch.int8, True, compile=True, device=CPU) == (
            "torchao, which quantizes to int8, is not installed"
        )


@pytest.mark.slow
def test_int8_is_calibrated_on_other_inputs_and_checked_by_cosine_similarity():
    """Its max difference is recorded but not bounded; its cosine similarity to the float32 reference is."""
    from resnet_backbone.benchmarks.peers import build_peers
    from resnet_backbone.benchmarks.workloads import Workload, run_workload

    if why_not_run(torch.int8, True, compile=True, device=CPU):
        pytest.skip(why_not_run(torch.int8, True, compile=True, device=CPU))
    cases = (("torchvision", EAGER_FP32), ("resnet_backbone", FAST_PATH_INT8))
    workload = Workload("inference", "resnet18", 2, 64, cases)
    result = run_workload(
        workload, build_peers("resnet18"), rounds=1, warmup=0, matmul_size=8, device=CPU, progress=tqdm(disable=True)
    )
    eager, int8 = result.cases
    assert eager.min_cosine == pytest.approx(1.0) and eager.min_cosine_required is None
    assert (int8.dtype, int8.tolerance, int8.min_cosine_required, int8.fraction_of_peak) == ("int8", None, 0.99, None)
    assert 0.99 <= int8.min_cosine < 1.0 and int8.max_relative_diff > 0
    assert int8.uncompiled_twin is None  # int8 always runs compiled
    calibration = calibration_inputs(partial(random_batch, (1, 2)))
    timed = random_batch((1, 2), seed=0)
    assert len(calibration) == CALIBRATION_BATCHES and not any(torch.equal(batch, timed) for batch in calibration)
