"""Whole detectors and segmenters on this backbone in ONNX: onnxruntime against eager PyTorch at two image sizes."""

from __future__ import annotations

import onnx
import onnxruntime
import pytest
import torch
from helpers import randomize_norms
from torch import nn

from resnet_backbone import ResNetBackbone
from resnet_backbone.adapters.torchvision import build_detector, build_segmenter
from resnet_backbone.adapters.torchvision_onnx import export_detector_onnx, onnx_detection_differences
from resnet_backbone.cli.main import main
from resnet_backbone.export import export_model_onnx
from resnet_backbone.training.task_model import TaskSpec, build_task_model, load_task_model, save_task_model

IMAGE_SIZES = [(128, 160), (96, 144)]


def tiny_backbone(**overrides) -> ResNetBackbone:
    return ResNetBackbone.from_preset("resnet18", depths=[1, 1, 1, 1], **overrides)


def tiny_detector(kind: str) -> nn.Module:
    """A random detector that keeps low-scoring detections, so that there are some to compare. The one-stage heads
    start from torchvision's prior (every score near 0.01); wider weights spread the scores, so near-equal ones
    (which float rounding may order either way) do not decide the comparison."""
    if "rcnn" in kind:
        options = {"box_score_thresh": 0.0, "box_detections_per_img": 20}
    else:
        options = {"score_thresh": 0.0, "detections_per_img": 20}
    detector = build_detector(kind, tiny_backbone(), num_classes=3, min_size=128, max_size=160, **options)
    if "rcnn" not in kind:
        with torch.no_grad():
            for module in detector.head.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias)
    return randomize_norms(detector).eval()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fasterrcnn", "retinanet", "fcos", "maskrcnn"])
def test_a_detector_in_onnx_gives_the_same_detections_at_two_image_sizes(tmp_path, kind):
    detector = tiny_detector(kind)
    path = export_detector_onnx(detector, tmp_path / f"{kind}.onnx")
    assert [p.name for p in tmp_path.iterdir()] == [f"{kind}.onnx"]
    for found in onnx_detection_differences(path, detector, IMAGE_SIZES):
        assert found["detections"] > 0 and found["count_difference"] == 0, found
        assert found["boxes"] <= 1e-3 and found["labels"] == 0 and found["scores"] <= 1e-4, found
        assert found.get("masks", 0) == 0, found
    assert ("masks" in found) == (kind == "maskrcnn")


def _segmenter_parity(path, segmenter: nn.Module, sizes: list[tuple[int, int, int]]) -> None:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, height, width in sizes:
        pixel_values = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            expected = segmenter(pixel_values)
        expected = expected["out"] if isinstance(expected, dict) else expected
        actual = torch.from_numpy(session.run(None, {"pixel_values": pixel_values.numpy()})[0])
        assert actual.shape == expected.shape
        assert (actual - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())
        assert torch.equal(actual.argmax(1), expected.argmax(1))


@pytest.mark.slow
def test_a_torchvision_deeplabv3_in_onnx_gives_the_same_logits_at_two_image_sizes(tmp_path):
    segmenter = randomize_norms(build_segmenter("deeplabv3", tiny_backbone(output_stride=8), num_classes=4)).eval()
    path = export_model_onnx(segmenter, tmp_path / "deeplabv3.onnx")
    _segmenter_parity(path, segmenter, [(1, 96, 128), (2, 160, 104)])


@pytest.mark.slow
def test_an_smp_unet_folder_from_training_exports_whole_with_the_same_logits_at_two_image_sizes(tmp_path, capsys):
    spec = TaskSpec("segmentation", "unet", 3, 128, {0: "background", 1: "cat", 2: "dog"})
    save_task_model(randomize_norms(build_task_model(spec, "resnet18")), tmp_path / "model", spec)
    assert main(["export-onnx", str(tmp_path / "model"), str(tmp_path / "unet.onnx"), "--opset", "17"]) == 0
    printed = capsys.readouterr().out
    assert "output logits: dynamic batch, height and width in multiples of 32" in printed
    assert printed.count("onnxruntime vs PyTorch at [(1, 128, 128), (2, 160, 96)]") == 1, printed
    assert [(op.domain, op.version) for op in onnx.load(tmp_path / "unet.onnx").opset_import] == [("", 17)]
    segmenter, _ = load_task_model(tmp_path / "model")
    _segmenter_parity(tmp_path / "unet.onnx", segmenter.eval(), [(1, 96, 128), (2, 160, 64)])


def test_a_whole_model_export_refuses_an_opset_or_a_model_it_cannot_write(tmp_path):
    detector = build_detector("fasterrcnn", tiny_backbone(), num_classes=3)
    with pytest.raises(ValueError, match="TorchScript-based exporter, the one that exports detectors, writes opsets"):
        export_detector_onnx(detector, tmp_path / "d.onnx", opset=21)
    with pytest.raises(ValueError, match="got DeepLabV3; export a segmenter with resnet_backbone.export"):
        export_detector_onnx(build_segmenter("deeplabv3", tiny_backbone()), tmp_path / "d.onnx")
    with pytest.raises(ValueError, match="tensor or a dict of tensors .* returned a BackboneOutput"):
        export_model_onnx(tiny_backbone(), tmp_path / "b.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def detector_folder(tmp_path):
    spec = TaskSpec("detection", "fasterrcnn", 3, 128, {0: "background", 1: "cat", 2: "dog"})
    save_task_model(randomize_norms(build_task_model(spec, tiny_backbone())), tmp_path / "model", spec)
    return tmp_path / "model"


@pytest.mark.slow
def test_export_onnx_command_line_exports_a_fine_tuned_model_folder_whole(tmp_path, detector_folder, capsys):
    output = tmp_path / "detector.onnx"
    assert main(["export-onnx", str(detector_folder), str(output), "--opset", "17"]) == 0
    printed = capsys.readouterr().out
    assert next(op.version for op in onnx.load(output).opset_import if op.domain in ("", "ai.onnx")) == 17
    assert f"wrote {output}: the whole fasterrcnn (detection)" in printed
    assert printed.count("onnxruntime vs PyTorch at") == 2
    assert printed.count("count_difference 0, ") == 2 and printed.count("labels 0") == 2, printed
    written = output.stat().st_mtime_ns
    assert main(["export-onnx", str(detector_folder), str(output)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert output.stat().st_mtime_ns == written and sorted(p.name for p in tmp_path.iterdir()) == [
        "detector.onnx",
        "model",
    ]


def test_export_onnx_command_line_refuses_backbone_options_for_a_model_folder(tmp_path, detector_folder, capsys):
    assert main(["export-onnx", str(detector_folder), str(tmp_path / "d.onnx"), "--fpn"]) == 2
    assert "is a fine-tuned model folder, exported whole; --fpn and --out-features" in capsys.readouterr().err
    assert not (tmp_path / "d.onnx").exists()
