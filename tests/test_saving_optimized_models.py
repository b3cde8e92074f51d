"""A model optimised for inference (norms folded into the convolutions) is no checkpoint of the original
layout: every way of saving or exporting it refuses, before writing anything."""

from __future__ import annotations

import pytest
from helpers import TINY_BASIC, randomize_norms

from resnet_backbone import ResNetBackbone, optimize_for_inference
from resnet_backbone.adapters.torchvision import build_detector
from resnet_backbone.training.task_model import TaskSpec, save_task_model

REFUSAL = "was optimised for inference .* Save the original model instead"


def _files(directory) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_save_pretrained_and_the_peer_exports_refuse_an_optimised_backbone(tmp_path):
    original = randomize_norms(ResNetBackbone(**TINY_BASIC)).eval()
    original.save_pretrained(tmp_path)  # a good checkpoint, which the refused save must not touch
    before = _files(tmp_path)
    optimized = optimize_for_inference(original)
    with pytest.raises(ValueError, match=REFUSAL):
        optimized.save_pretrained(tmp_path)
    for export in (optimized.to_torchvision_state_dict, optimized.to_timm_state_dict):
        with pytest.raises(ValueError, match=REFUSAL):
            export()
    assert _files(tmp_path) == before
    original.save_pretrained(tmp_path / "again")  # the original stays savable


def test_the_cli_save_path_refuses_an_optimised_detector(tmp_path):
    spec = TaskSpec("detection", "fcos", 3, 64, {0: "background", 1: "a", 2: "b"})
    detector = build_detector("fcos", ResNetBackbone(**TINY_BASIC), num_classes=3, min_size=64, max_size=64)
    with pytest.raises(ValueError, match=REFUSAL):
        save_task_model(optimize_for_inference(detector), tmp_path / "model", spec)
    assert not (tmp_path / "model").exists()
    save_task_model(detector, tmp_path / "model", spec)
