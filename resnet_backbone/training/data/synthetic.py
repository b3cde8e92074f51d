"""Synthetic data sets that need no download: coloured shapes on textured backgrounds.

Each image is a pure function of (seed, index), so a data set is reproducible and costs no disk. The
same scenes serve detection (boxes and labels) and segmentation (a class per pixel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from torchvision.ops import box_iou

SHAPE_CLASSES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class Scene:
    image: torch.Tensor  # (3, size, size) float in [0, 1]
    boxes: torch.Tensor  # (n, 4) float, x1 y1 x2 y2 in pixels
    labels: torch.Tensor  # (n,) int64, 1-based index into SHAPE_CLASSES
    mask: torch.Tensor  # (size, size) int64, 0 = background, else the label of the shape on top


def render_scene(seed: int, size: int = 128, max_shapes: int = 4) -> Scene:
    """One scene: a noisy two-colour gradient background with 1 to ``max_shapes`` shapes of random class,
    colour, size and position, none overlapping."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator)

    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    direction = uniform(0, 2 * torch.pi, 1)
    ramp = (xs * direction.cos() + ys * direction.sin()) / size
    start, end = uniform(0.1, 0.6, 3, 1, 1), uniform(0.1, 0.6, 3, 1, 1)
    image = start + (end - start) * ramp + 0.08 * torch.randn(3, size, size, generator=generator)
    mask = torch.zeros(size, size, dtype=torch.int64)
    boxes, labels = torch.zeros(0, 4), []
    for _ in range(int(torch.randint(1, max_shapes + 1, (1,), generator=generator))):
        label = int(torch.randint(1, len(SHAPE_CLASSES) + 1, (1,), generator=generator))
        radius = float(uniform(size * 0.08, size * 0.2))
        center_x, center_y = (float(v) for v in uniform(radius, size - radius, 2))
        inside = _shape_pixels(SHAPE_CLASSES[label - 1], xs - center_x, ys - center_y, radius)
        rows, columns = inside.any(dim=1).nonzero(), inside.any(dim=0).nonzero()
        box = torch.tensor([[columns.min(), rows.min(), columns.max() + 1, rows.max() + 1]], dtype=torch.float32)
        if len(boxes) and box_iou(box, boxes).max() > 0:
            continue  # shapes never overlap: every box and mask shows a whole shape
        colour = uniform(0.5, 1.0, 3, 1, 1) if float(uniform(0, 1)) < 0.5 else uniform(0.0, 0.3, 3, 1, 1)
        image = torch.where(inside, colour.expand_as(image), image)
        mask[inside] = label
        boxes = torch.cat([boxes, box])
        labels.append(label)
    return Scene(image.clamp(0, 1), boxes, torch.tensor(labels), mask)


def _shape_pixels(shape: str, dx: torch.Tensor, dy: torch.Tensor, radius: float) -> torch.Tensor:
    if shape == "circle":
        return dx.square() + dy.square() <= radius**2
    if shape == "square":
        return (dx.abs() <= radius * 0.85) & (dy.abs() <= radius * 0.85)
    # An upright isosceles triangle whose apex is at the top.
    return (dy >= -radius) & (dy <= radius * 0.8) & (dx.abs() <= (dy + radius) * 0.55)


class SyntheticDetection(Dataset):
    """``(image, {"boxes", "labels"})`` pairs in torchvision's detection format."""

    def __init__(self, length: int, *, size: int = 128, seed: int = 0) -> None:
        self.length, self.size, self.seed = length, size, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scene = render_scene(self.seed * 1_000_003 + index, self.size)
        return scene.image, {"boxes": scene.boxes, "labels": scene.labels}


class SyntheticSegmentation(Dataset):
    """``(image, mask)`` pairs; the mask holds 0 for background and 1..3 for the shape classes."""

    def __init__(self, length: int, *, size: int = 128, seed: int = 0) -> None:
        self.length, self.size, self.seed = length, size, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        scene = render_scene(self.seed * 1_000_003 + index, self.size)
        return scene.image, scene.mask


def collate_detection(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """torchvision detectors take lists of images and targets, not stacked tensors."""
    images, targets = zip(*batch)
    return list(images), list(targets)
