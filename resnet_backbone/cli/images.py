"""Reading the user's image files, for the COCO and mask folders alike."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF


def read_image(path: Path) -> tv_tensors.Image:
    """(3, H, W) float in [0, 1], whatever the file's mode (grey, palette, RGBA)."""
    with Image.open(path) as file:
        return tv_tensors.Image(TF.to_dtype(TF.pil_to_tensor(file.convert("RGB")), torch.float32, scale=True))


def image_size(path: Path, where: str) -> tuple[int, int]:
    """(height, width) from the file's header; ``where`` names the entry in the error if PIL cannot read it."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except OSError as error:
        raise ValueError(f"{where}: {path} is not an image PIL can read ({error}).") from None
