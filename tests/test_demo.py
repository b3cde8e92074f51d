"""The synthetic data sets and a fast smoke run of `resnet-backbone demo`."""

from __future__ import annotations

import shutil
import subprocess

import matplotlib.image
import pytest
import torch

from resnet_backbone.training.data.synthetic import (
    SHAPE_CLASSES,
    SyntheticDetection,
    SyntheticSegmentation,
    render_scene,
)


def test_scenes_are_reproducible_and_boxes_bound_their_shapes():
    for seed in range(20):
        scene = render_scene(seed, size=96)
        again = render_scene(seed, size=96)
        assert torch.equal(scene.image, again.image) and torch.equal(scene.boxes, again.boxes)
        assert scene.image.shape == (3, 96, 96) and 0 <= scene.image.min() and scene.image.max() <= 1
        assert len(scene.boxes) == len(scene.labels) >= 1
        assert set(scene.labels.tolist()) <= set(range(1, len(SHAPE_CLASSES) + 1))
        for box, label in zip(scene.boxes.long().tolist(), scene.labels.tolist()):
            x1, y1, x2, y2 = box
            assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96
            inside = scene.mask[y1:y2, x1:x2] == label
            assert inside.any(dim=0).all() and inside.any(dim=1).all()  # the box is tight around its shape
    assert not torch.equal(render_scene(0).image, render_scene(1).image)


def test_datasets_share_the_scenes():
    image, target = SyntheticDetection(4, size=64, seed=3)[2]
    same_image, mask = SyntheticSegmentation(4, size=64, seed=3)[2]
    assert torch.equal(image, same_image) and set(mask.unique().tolist()) >= {0, *target["labels"].tolist()}


@pytest.mark.slow
def test_demo_smoke_run_writes_its_pictures(tmp_path):
    command = [shutil.which("resnet-backbone"), "demo", "--epochs", "1", "--train-images", "16",
               "--eval-images", "8", "--output-dir", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mAP@0.5 before fine-tuning" in result.stdout and "mAP@0.5 after 2 steps" in result.stdout
    assert "training 2 steps on 1 process(es), cpu, precision" in result.stdout
    assert "training: 100%" in result.stderr  # the progress bar
    predictions = matplotlib.image.imread(tmp_path / "predictions.png")
    features = matplotlib.image.imread(tmp_path / "feature_maps.png")
    assert predictions.shape[0] > 64 and predictions.shape[1] > 4 * 64
    assert features.shape[1] > features.shape[0]
