"""Reading the user's image files, for the COCO and mask folders alike."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

Item = TypeVar("Item")
Result = TypeVar("Result")


def read_image(path: Path) -> tv_tensors.Image:
    """(3, H, W) float in [0, 1], whatever the file's mode (grey, palette, RGBA)."""
    with Image.open(path) as file:
        return tv_tensors.Image(TF.to_dtype(TF.pil_to_tensor(file.convert("RGB")), torch.float32, scale=True))


def decoded(path: Path, where: str) -> Image.Image:
    """The image with all of its data decoded: a header can be intact while the data behind it is cut off or
    corrupt, which would otherwise stop training at the first step that reads it. ``where`` names the entry
    in the error."""
    try:
        with Image.open(path) as image:
            image.load()
        return image
    except Exception as error:  # PIL's decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise ValueError(f"{where}: {path} is not an image PIL can decode ({error}).") from None


def decoded_size(path: Path, where: str) -> tuple[int, int]:
    """(height, width) of the image once :func:`decoded`; the pixels are dropped at once."""
    width, height = decoded(path, where).size
    return height, width


def in_threads(function: Callable[[Item], Result], items: Iterable[Item]) -> list[Result]:
    """``[function(item) for item in items]`` on a thread pool (PIL's decoders and NumPy release the GIL); the
    first failure in ``items``' order is raised, and the work not yet started is dropped."""
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        return list(pool.map(function, items))
    finally:
        pool.shutdown(cancel_futures=True)
