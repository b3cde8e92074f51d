"""The int8 fast path: static quantization of the dense parts with torchao's PT2E flow, against the float models
(torchvision's own ResNet-50 for the per-stage accuracy), the parts it quantizes and those it leaves float32, and a
quantized model kept on disk and loaded back without calibration.

The inner-loop tests run the quantized programs uncompiled (``compile=False``: the same int8 rounding, computed
by torch's reference operators), so they check what quantization does without the minutes inductor takes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_norms
from torch import nn
from torchvision.models import resnet50
from torchvision.models.feature_extraction import create_feature_extractor

from resnet_backbone import (
    ResNetBackbone,
    computes_int8_natively,
    load_quantized,
    optimize_for_inference,
    save_quantized,
)
from resnet_backbone.adapters.torchvision import build_detector
from resnet_backbone.inference import INT8_COSINE_SIMILARITY
from resnet_backbone.quantization import MANIFEST_NAME, quantized_programs

pytest.importorskip("torchao", reason='int8 needs torchao: pip install -e ".[test]" installs it')

STAGES = ["stage1", "stage2", "stage3", "stage4"]


def cosine(first: torch.Tensor, second: torch.Tensor) -> float:
    return F.cosine_similarity(first.flatten().double(), second.flatten().double(), dim=0).item()


def calibration_batches(count: int = 3, size: tuple[int, int] = (64, 64)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, *size, generator=generator) for _ in range(count)]


@pytest.fixture(scope="module")
def tiny_backbone() -> ResNetBackbone:
    return randomize_norms(ResNetBackbone.from_preset("resnet18", depths=[1, 1, 1, 1], out_features=STAGES)).eval()


@pytest.fixture(scope="module")
def int8_backbone(tiny_backbone: ResNetBackbone) -> ResNetBackbone:
    return optimize_for_inference(tiny_backbone, dtype=torch.int8, calibration=calibration_batches(), compile=False)


def test_int8_features_follow_the_float_model_at_other_sizes(tiny_backbone, int8_backbone):
    images = torch.randn(1, 3, 96, 72, generator=torch.Generator().manual_seed(5))  # not a calibration size
    with torch.no_grad():
        expected, actual = tiny_backbone(images).feature_maps, int8_backbone(images).feature_maps
    for stage, first, second in zip(STAGES, expected, actual):
        assert second.dtype == torch.float32 and second.shape == first.shape, stage
        assert cosine(first, second) >= INT8_COSINE_SIMILARITY, stage


def int8_weight_count(program: torch.export.ExportedProgram) -> int:
    values = [*program.constants.values(), *program.state_dict.values()]
    return sum(value.dtype == torch.int8 for value in values)


def convolution_calls(program: torch.export.ExportedProgram) -> int:
    return sum(node.target == torch.ops.aten.conv2d.default for node in program.graph.nodes)


def test_int8_program_quantizes_every_convolution(tiny_backbone, int8_backbone):
    (name, program), *others = quantized_programs(int8_backbone).items()
    assert name == "" and not others  # a backbone is one dense part
    operators = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    convolutions = sum(isinstance(module, nn.Conv2d) for module in tiny_backbone.modules())
    assert sum("convolution" in operator or "conv2d" in operator for operator in operators) == convolutions
    assert any("quantize_per_tensor" in operator for operator in operators)
    assert int8_weight_count(program) == convolutions
    # Calibration leaves the model it was given as it was.
    assert all(parameter.dtype == torch.float32 for parameter in tiny_backbone.parameters())


def test_int8_detector_quantizes_the_dense_parts_and_keeps_the_rest_float32():
    backbone = ResNetBackbone.from_preset("resnet18", depths=[1, 1, 1, 1])
    detector = randomize_norms(build_detector("fasterrcnn", backbone, num_classes=3, min_size=96, max_size=128))
    detector.eval()
    generator = torch.Generator().manual_seed(3)
    calibration = [[torch.rand(3, 96, 128, generator=generator)] for _ in range(2)]
    int8 = optimize_for_inference(detector, dtype=torch.int8, calibration=calibration, compile=False)

    programs = quantized_programs(int8)
    assert set(programs) == {"backbone.body", "backbone.fpn", "rpn.head"}
    # The RPN head runs once per feature level: each call has an int8 weight of its own (see the compiled test).
    assert int8_weight_count(programs["rpn.head"]) == convolution_calls(programs["rpn.head"]) == 3 * 5
    assert all(parameter.dtype == torch.float32 for parameter in int8.roi_heads.parameters())
    images = torch.rand(2, 3, 128, 96, generator=generator)
    with torch.no_grad():
        expected, actual = detector.backbone(images), int8.backbone(images)
        detections = int8([image for image in images])
    assert all(cosine(expected[level], actual[level]) >= 0.99 for level in expected)
    assert {value.dtype for value in detections[0].values()} <= {torch.float32, torch.int64}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(dtype=torch.int8), r"dtype=torch.int8 needs calibration=\.\.\."),
        (dict(dtype=torch.bfloat16, calibration=[torch.randn(1, 3, 64, 64)]), "calibration is for dtype=torch.int8"),
        (dict(dtype=torch.int8, calibration=[]), "calibration is empty"),
        (dict(dtype=torch.int8, calibration=torch.randn(2, 3, 64, 64)), r"got a Tensor of shape \(2, 3, 64, 64\)"),
    ],
)
def test_int8_refuses_bad_calibration_before_any_work(tiny_backbone, options, message):
    with pytest.raises(ValueError, match=message):
        optimize_for_inference(tiny_backbone, **options)


def test_int8_refuses_calibration_inputs_too_small_for_the_programs(tiny_backbone):
    calibration = [torch.randn(2, 3, 64, 64), torch.randn(1, 3, 32, 32)]  # 32 px: a 1x1 deepest map
    with pytest.raises(ValueError, match=r"calibration input 1: .*33 pixels a side or more"):
        optimize_for_inference(tiny_backbone, dtype=torch.int8, calibration=calibration, compile=False)


def test_int8_runs_on_a_cpu_only():
    on_meta = ResNetBackbone.from_preset("resnet18", depths=[1, 1, 1, 1]).to("meta")
    with pytest.raises(ValueError, match="runs on a CPU only, the model is on meta"):
        optimize_for_inference(on_meta, dtype=torch.int8, calibration=[torch.randn(1, 3, 64, 64)])
    assert not computes_int8_natively("cuda")


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU flags from Linux's /proc/cpuinfo")
def test_computes_int8_natively_matches_the_cpu_flags():
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE).group(1).split())
    assert computes_int8_natively() == bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def test_a_saved_int8_model_loads_back_without_calibration(tiny_backbone, int8_backbone, tmp_path):
    folder = save_quantized(int8_backbone, tmp_path / "int8")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["parts"] == {"": "model.pt2"} and (folder / "model.pt2").is_file()

    loaded = load_quantized(tiny_backbone, folder, compile=False)
    images = torch.randn(2, 3, 80, 64)
    with torch.no_grad():
        for first, second in zip(int8_backbone(images).feature_maps, loaded(images).feature_maps):
            torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_save_quantized_writes_nothing_over_an_existing_folder_or_from_a_float_model(
    tiny_backbone, int8_backbone, tmp_path
):
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        save_quantized(int8_backbone, existing)
    with pytest.raises(ValueError, match="no quantized part"):
        save_quantized(tiny_backbone, tmp_path / "float")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["existing"] and not any(existing.iterdir())


def test_load_quantized_refuses_folders_of_other_models(int8_backbone, tmp_path):
    folder = save_quantized(int8_backbone, tmp_path / "int8")
    detector = build_detector("fasterrcnn", ResNetBackbone.from_preset("resnet18", depths=[1, 1, 1, 1]), num_classes=3)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / MANIFEST_NAME).write_text(json.dumps({"format": 1, "parts": {"backbone.head": "x.pt2"}}))
    with pytest.raises(FileNotFoundError, match="lacks x.pt2"):
        load_quantized(detector, tmp_path / "other")
    (tmp_path / "other" / "x.pt2").write_bytes(b"")
    with pytest.raises(ValueError, match="'backbone.head' that this FasterRCNN does not have"):
        load_quantized(detector, tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="holds no quantized model"):
        load_quantized(detector, tmp_path)
    (folder / MANIFEST_NAME).write_text("{}")
    with pytest.raises(ValueError, match="not a quantization manifest"):
        load_quantized(detector, folder)


@pytest.mark.slow
def test_a_head_run_once_per_feature_level_compiles_to_int8_convolutions():
    """Inductor turns dequantize-convolution into an int8 convolution only where the dequantized weight feeds
    that convolution alone; a head shares its weights across levels, and without a copy per call it would run
    in float32 on dequantized weights."""
    from torch._dynamo.utils import counters

    backbone = ResNetBackbone.from_preset("resnet18", depths=[1, 1, 1, 1])
    detector = randomize_norms(build_detector("fasterrcnn", backbone, num_classes=3, min_size=96, max_size=128))
    generator = torch.Generator().manual_seed(5)
    calibration = [[torch.rand(3, 96, 128, generator=generator)] for _ in range(2)]
    int8 = optimize_for_inference(detector.eval(), dtype=torch.int8, calibration=calibration, parts=["rpn.head"])
    counters.clear()
    with torch.no_grad():
        int8([torch.rand(3, 96, 128, generator=generator)])
    calls = convolution_calls(quantized_programs(int8)["rpn.head"])
    assert counters["inductor"]["qconv_weight_prepack_matcher_count"] == calls == 3 * 5


@pytest.mark.slow
def test_resnet50_int8_features_match_torchvision_per_stage():
    """A ResNet-50 with random weights and randomised BatchNorm statistics, compiled int8 against torchvision's own
    float model: cosine similarity of at least 0.999 at every stage."""
    reference = randomize_norms(resnet50()).eval()
    ours = ResNetBackbone.from_torchvision(reference, out_features=STAGES).eval()
    layers = {f"layer{index}": stage for index, stage in enumerate(STAGES, 1)}
    torchvision_features = create_feature_extractor(reference, return_nodes=list(layers))
    generator = torch.Generator().manual_seed(7)
    calibration = [torch.randn(4, 3, 224, 224, generator=generator) for _ in range(4)]
    int8 = optimize_for_inference(ours, dtype=torch.int8, calibration=calibration)
    images = torch.randn(2, 3, 256, 192, generator=generator)
    with torch.no_grad():
        expected = torchvision_features(images)
        actual = dict(zip(STAGES, int8(images).feature_maps))
    similarities = {stage: cosine(expected[layer], actual[stage]) for layer, stage in layers.items()}
    assert min(similarities.values()) >= INT8_COSINE_SIMILARITY, similarities
