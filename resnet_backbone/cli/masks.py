"""A semantic segmentation folder: ``images/`` and ``masks/``, one PNG of class indices per image.

The layout VOC, ADE20K and Cityscapes exports share: a mask has the stem of its image, holds one class
index per pixel, and 255 marks pixels to ignore (borders, unlabelled regions). Every mask is read and
checked before training starts, so a wrong file is one error that names it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .images import image_size, read_image

IMAGES_DIR = "images"
MASKS_DIR = "masks"
IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class MaskFolder(Dataset):
    """``(image, mask)`` pairs: image (3, H, W) float in [0, 1], mask (H, W) int64 with 255 = ignore.

    ``num_classes`` bounds the class indices; by default it is read from the masks (the largest index
    plus one). ``transforms`` is a ``torchvision.transforms.v2`` transform of ``(image, mask)``.
    """

    def __init__(
        self, directory: str | Path, *, num_classes: int | None = None, transforms: Callable | None = None
    ) -> None:
        directory = Path(directory)
        images_dir, masks_dir = directory / IMAGES_DIR, directory / MASKS_DIR
        if not images_dir.is_dir() or not masks_dir.is_dir():
            raise ValueError(f"{directory} must hold an {IMAGES_DIR}/ and a {MASKS_DIR}/ folder (segmentation layout).")
        self.pairs = [
            (path, masks_dir / f"{path.stem}.png")
            for path in sorted(images_dir.iterdir())
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.pairs:
            raise ValueError(f"{images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        largest = {mask: _checked_largest_index(image, mask) for image, mask in self.pairs}
        offenders = [mask for mask, index in largest.items() if num_classes is not None and index >= num_classes]
        if offenders:
            raise ValueError(
                f"{offenders[0]} holds class index {largest[offenders[0]]}, beyond the {num_classes} classes "
                f"(indices 0..{num_classes - 1}, and {IGNORE_INDEX} = ignore): set --num-classes to cover it."
            )
        self.num_classes = num_classes if num_classes is not None else max(largest.values()) + 1
        self.transforms = transforms

    @property
    def id2label(self) -> dict[int, str]:
        return {index: f"class_{index}" for index in range(self.num_classes)}

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        mask = tv_tensors.Mask(torch.from_numpy(_read_mask(mask_path)).long())
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def _read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as mask:
        if mask.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(
                f"{path} is a {mask.mode} image; a mask is a single-channel PNG of class indices (mode L or P)."
            )
        return np.array(mask)


def _checked_largest_index(image_path: Path, mask_path: Path) -> int:
    """The largest class index in the mask (ignoring 255), after checking it matches its image."""
    if not mask_path.is_file():
        raise ValueError(f"{image_path} has no mask: expected {mask_path} (a PNG with the image's stem).")
    mask = _read_mask(mask_path)
    size = image_size(image_path, f"the image of {mask_path}")
    if mask.shape != size:
        raise ValueError(
            f"{mask_path} is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image {image_path} is {size[0]}x{size[1]}."
        )
    labelled = mask[mask != IGNORE_INDEX]
    return int(labelled.max()) if labelled.size else 0
