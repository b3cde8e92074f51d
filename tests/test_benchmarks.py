"""The benchmark suite through its real entry points: the smoke run goes end to end, checks every case's
outputs against the reference before timing, and writes its files. Timings are never asserted: the CPU is
shared, and the suite's numbers belong in the README, not in a test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from resnet_backbone import computes_bf16_natively
from resnet_backbone.benchmarks.counters import peak_memory_bytes
from resnet_backbone.cli.main import main

REPOSITORY = Path(__file__).resolve().parents[1]
LIBRARIES = {"torchvision", "resnet_backbone", "timm", "transformers"}


@pytest.mark.slow
def test_smoke_run_checks_outputs_and_writes_table_json_and_plot(tmp_path, capsys):
    assert main(["bench", "--smoke", "--tasks", "backbone", "--output-dir", str(tmp_path)]) == 0

    result = json.loads((tmp_path / "results.json").read_text())
    assert [w["kind"] for w in result["workloads"]] == ["inference", "training", "sweep", "sweep"]
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
    assert main(["bench", "--smoke", "--tasks", "segmentation", "--output-dir", str(tmp_path)]) == 0

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
    assert main(["bench", "--smoke", "--tasks", "detection", "finetune", "--output-dir", str(tmp_path)]) == 0

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
    (torch's MemTracker, a dispatch mode, made torch.compile run the eager code: every compiled step got its
    eager figure.)"""
    images = torch.randn(256, 1024)
    compiled = torch.compile(lambda: images.relu().relu().relu())
    compiled()
    assert peak_memory_bytes(compiled, torch.device("cpu")) == 2**20
