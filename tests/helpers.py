"""Helpers the tests share: peer models with random weights and randomised norm statistics, tiny
architectures, the Hub cache layout, and fresh interpreters."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from torch import nn

from resnet_backbone import ResNetConfig
from resnet_backbone.config import FIELD_CHOICES

ALL_STAGES = ["stem", "stage1", "stage2", "stage3", "stage4"]

# Small architectures that still exercise every stage (and its first-block shortcut).
TINY_BOTTLENECK = dict(embedding_size=32, hidden_sizes=[64, 128, 192, 256], depths=[1, 2, 1, 1])
TINY_BASIC = dict(layer_type="basic", embedding_size=32, hidden_sizes=[32, 48, 64, 96], depths=[1, 1, 2, 1])


def non_default_config_values() -> dict[str, Any]:
    """For every ``ResNetConfig`` field, a valid value other than the default config's (valid alone, on top of
    the defaults): tests that loop over it cover a field added later without being edited, and fail, naming
    the field, when no candidate fits it."""
    default = ResNetConfig()
    values = {}
    for field in dataclasses.fields(ResNetConfig):
        current = getattr(default, field.name)
        values[field.name] = next(
            (value for value in _candidate_values(field.name, current) if _changes(field.name, value, current)), None
        )
        assert values[field.name] is not None, f"no valid non-default value of ResNetConfig.{field.name}: add one"
    return values


def _candidate_values(name: str, current: Any) -> Iterator[Any]:
    yield from FIELD_CHOICES.get(name, ())
    if isinstance(current, bool):
        yield not current
    elif isinstance(current, (int, float)):
        yield from (current + 1, (current + 1) / 2)
    elif isinstance(current, list):
        yield [item * 2 for item in current]
    # The shapes of the fields whose default is None or derived: stage names, indices, label maps.
    yield from (["stage1"], [1], {"cat": 0, "dog": 1, "bird": 2}, {0: "cat", 1: "dog", 2: "bird"})


def _changes(name: str, value: Any, current: Any) -> bool:
    try:
        return getattr(ResNetConfig(**{name: value}), name) != current
    except ValueError:
        return False


def slow_param(*values: object, id: str | None = None) -> object:  # noqa: A002  (pytest.param's name)
    """A parameter that runs in the full suite only, not in the inner loop (``pytest -m "not slow"``): a
    real-size model (ResNet-18 and up, a whole detector), or more of a grid the inner loop samples."""
    return pytest.param(*values, id=id, marks=pytest.mark.slow)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics, so parity tests cannot pass
    by accident on the identity-like defaults."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) or hasattr(module, "running_var"):
                size = module.running_mean.shape
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.2)
    return model


def max_abs_diff(first: torch.Tensor, second: torch.Tensor) -> float:
    assert first.shape == second.shape, f"shapes differ: {tuple(first.shape)} vs {tuple(second.shape)}"
    return (first.float() - second.float()).abs().max().item()


def place_in_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay files out exactly as huggingface_hub's cache stores a downloaded revision of ``repo_id``, so the
    real loaders find them offline."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copyfile(source, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def run_python(
    code: str, env: dict[str, str], args: list[str] = (), timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (library settings read at import time apply)."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


SIZES = [(64, 64), (48, 80), (72, 56), (64, 96), (56, 64), (80, 48)]  # height, width
SQUARE, BAR = 3, 7  # non-contiguous category ids


def _rectangles(index: int, height: int, width: int) -> list[tuple[int, list[int]]]:
    """(category id, [x1, y1, x2, y2]) of the shapes drawn on image ``index``; image 1 is a negative."""
    if index == 1:
        return []
    return [(SQUARE, [4, 6, 4 + width // 3, 6 + height // 3]), (BAR, [width // 2, height // 2, width - 6, height - 3])]


def _polygon(box: list[int]) -> list[list[float]]:
    x1, y1, x2, y2 = box
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def write_labelled_folders(root: Path) -> tuple[Path, Path]:
    """A COCO folder and a mask folder under ``root`` over the same images of different sizes, with what real
    exports hold: a negative image, a crowd region, a degenerate box, a box past the border, non-contiguous
    category ids, an unlabelled mask border; and ``val/`` in the COCO folder, two of its images held out."""
    coco, semantic = root / "coco", root / "semantic"
    for directory in (coco / "images", semantic / "images", semantic / "masks"):
        directory.mkdir(parents=True)
    generator = np.random.default_rng(0)
    images, annotations = [], []

    def annotate(**fields) -> None:
        annotations.append({"id": len(annotations) + 1, "iscrowd": 0, **fields})

    for index, (height, width) in enumerate(SIZES):
        pixels = generator.integers(0, 80, (height, width, 3), dtype=np.uint8)
        mask = np.zeros((height, width), dtype=np.uint8)
        for category, (x1, y1, x2, y2) in _rectangles(index, height, width):
            pixels[y1:y2, x1:x2] = (220, 40, 40) if category == SQUARE else (40, 220, 220)
            mask[y1:y2, x1:x2] = 1 if category == SQUARE else 2
            area = (x2 - x1) * (y2 - y1)
            annotate(image_id=index, category_id=category, bbox=[x1, y1, x2 - x1, y2 - y1], area=area,
                     segmentation=_polygon([x1, y1, x2, y2]))  # fmt: skip
        mask[:3, :] = 255  # an unlabelled border, to ignore
        for folder in (coco, semantic):
            Image.fromarray(pixels).save(folder / "images" / f"{index}.png")
        Image.fromarray(mask).save(semantic / "masks" / f"{index}.png")
        images.append({"id": index, "file_name": f"{index}.png", "height": height, "width": width})
    crowd = np.zeros((48, 80), dtype=np.uint8, order="F")
    crowd[30:44, 2:30] = 1
    rle = coco_mask.encode(crowd)
    annotate(image_id=1 + 1, category_id=SQUARE, bbox=[2, 30, 28, 14], area=392, iscrowd=1,
             segmentation={"size": rle["size"], "counts": rle["counts"].decode()})  # fmt: skip
    annotate(image_id=0, category_id=BAR, bbox=[10, 10, 0, 12], area=0, segmentation=_polygon([10, 10, 10, 22]))
    annotate(image_id=3, category_id=BAR, bbox=[70, 40, 40, 20], area=800, segmentation=_polygon([70, 40, 110, 60]))
    categories = [{"id": SQUARE, "name": "square"}, {"id": BAR, "name": "bar"}]
    (coco / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                       "categories": categories}))  # fmt: skip
    # A held-out folder of two images (one with the crowd region), as small as evaluation can be.
    (coco / "val" / "images").mkdir(parents=True)
    held_out = [image for image in images if image["id"] in (2, 3)]
    for image in held_out:
        shutil.copy(coco / "images" / image["file_name"], coco / "val" / "images")
    kept = [annotation for annotation in annotations if annotation["image_id"] in (2, 3)]
    (coco / "val" / "annotations.json").write_text(json.dumps({"images": held_out, "annotations": kept,
                                                               "categories": categories}))  # fmt: skip
    return coco, semantic
