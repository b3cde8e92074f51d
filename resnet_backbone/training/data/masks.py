"""A semantic segmentation folder: ``images/`` and ``masks/``, one PNG of class indices per image.

The layout VOC, ADE20K and Cityscapes exports share: a mask has the stem of its image, holds one class
index per pixel, and 255 marks pixels to ignore (borders, unlabelled regions). Every image and mask is
decoded and checked before training starts, so a wrong file is one error that names it. The class ids must
run 0..K-1 without gaps unless the number of classes is given: one stray value (254 in a mask of 0s and 1s)
would otherwise make a 255-class model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .images import decoded, decoded_size, in_threads, read_image

IMAGES_DIR = "images"
MASKS_DIR = "masks"
IGNORE_INDEX = 255
FILES_NAMED = 3  # files an error lists per class id
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class MaskFolder(Dataset):
    """``(image, mask)`` pairs: image (3, H, W) float in [0, 1], mask (H, W) int64 with 255 = ignore.

    ``num_classes`` bounds the class indices; by default it is read from the masks, whose ids must then be
    0..K-1 without gaps. ``class_pixels`` counts the pixels of each id (255 included), ``report`` says it
    in one line. ``transforms`` is a ``torchvision.transforms.v2`` transform of ``(image, mask)``.
    """

    def __init__(
        self, directory: str | Path, *, num_classes: int | None = None, transforms: Callable | None = None
    ) -> None:
        directory = Path(directory)
        images_dir, self.masks_dir = directory / IMAGES_DIR, directory / MASKS_DIR
        if not images_dir.is_dir() or not self.masks_dir.is_dir():
            raise ValueError(f"{directory} must hold an {IMAGES_DIR}/ and a {MASKS_DIR}/ folder (segmentation layout).")
        self.pairs = [
            (path, self.masks_dir / f"{path.stem}.png")
            for path in sorted(images_dir.iterdir())
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.pairs:
            raise ValueError(f"{images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        pixels_of = dict(zip((mask for _, mask in self.pairs), in_threads(_checked_class_pixels, self.pairs)))
        self.class_pixels = dict(sorted(sum(map(Counter, pixels_of.values()), Counter()).items()))
        self.num_classes = _checked_num_classes(pixels_of, self.class_pixels, num_classes, self.masks_dir)
        self.classes_given = num_classes is not None
        self.transforms = transforms

    @property
    def report(self) -> str:
        """``3 classes (from the masks); pixels per class id: 0: 5210, 1: 980, 2: 310, 255 (ignored): 96``."""
        pixels = ", ".join(
            f"{index}{' (ignored)' if index == IGNORE_INDEX else ''}: {count}"
            for index, count in self.class_pixels.items()
        )
        origin = "--num-classes" if self.classes_given else "from the masks"
        return f"{self.num_classes} classes ({origin}); pixels per class id: {pixels}"

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
    mask = decoded(path, "a mask")
    if mask.mode not in ("L", "P", "I", "I;16"):
        raise ValueError(
            f"{path} is a {mask.mode} image; a mask is a single-channel PNG of class indices (mode L or P)."
        )
    return np.array(mask)


def _checked_class_pixels(pair: tuple[Path, Path]) -> dict[int, int]:
    """The pixel count of each class id in the mask, after decoding its image and checking the two match."""
    image_path, mask_path = pair
    if not mask_path.is_file():
        raise ValueError(f"{image_path} has no mask: expected {mask_path} (a PNG with the image's stem).")
    mask = _read_mask(mask_path)
    size = decoded_size(image_path, f"the image of {mask_path}")
    if mask.shape != size:
        raise ValueError(
            f"{mask_path} is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image {image_path} is {size[0]}x{size[1]}."
        )
    indices, counts = np.unique(mask, return_counts=True)
    return dict(zip(indices.tolist(), counts.tolist()))


def _checked_num_classes(
    pixels_of: Mapping[Path, Mapping[int, int]], class_pixels: Mapping[int, int], num_classes: int | None, where: Path
) -> int:
    """``num_classes`` once no mask holds an id beyond it; else K when the ids are 0..K-1 without a gap."""
    labelled = [index for index in class_pixels if index != IGNORE_INDEX]
    if num_classes is not None:
        beyond = [index for index in labelled if index >= num_classes]
        if beyond:
            raise ValueError(
                f"{where}: class ids beyond the {num_classes} classes (ids 0..{num_classes - 1}, and {IGNORE_INDEX} = "
                f"ignore): {_ids_in_files(beyond, pixels_of)}. Fix those masks, or set --num-classes to cover them."
            )
        return num_classes
    first_gap = next(index for index in range(len(labelled) + 1) if index not in class_pixels)
    outliers = [index for index in labelled if index > first_gap]
    if outliers:
        raise ValueError(
            f"{where}: the class ids {labelled} have a gap (no mask holds {first_gap}): "
            f"{_ids_in_files(outliers, pixels_of)}. "
            f"Fix those masks, or pass --num-classes N (N > {outliers[-1]}) if the ids are right "
            f"({IGNORE_INDEX} marks pixels to ignore)."
        )
    return max(labelled, default=0) + 1


def _ids_in_files(indices: list[int], pixels_of: Mapping[Path, Mapping[int, int]]) -> str:
    """``254 in a.png, b.png and 3 more masks`` for each id, naming the first files that hold it."""
    parts = []
    for index in indices:
        names = [path.name for path, pixels in pixels_of.items() if index in pixels]
        more = f" and {len(names) - FILES_NAMED} more masks" if len(names) > FILES_NAMED else ""
        parts.append(f"{index} in {', '.join(names[:FILES_NAMED])}{more}")
    return "; ".join(parts)
