"""Training augmentation that moves boxes and masks with the pixels (``torchvision.transforms.v2``).

Horizontal flip, then scale jitter: the image is scaled to fit ``image_size`` times a random factor in
[0.5, 1.5] and cropped or padded to ``image_size`` square (large-scale jitter, as in the Copy-Paste and
ViTDet recipes). Boxes that the crop leaves degenerate go, with their labels and masks. Evaluation uses
none of it: the detectors resize and map boxes back themselves.
"""

from __future__ import annotations

from torchvision import tv_tensors
from torchvision.transforms import v2

from .masks import IGNORE_INDEX

SCALE_RANGE = (0.5, 1.5)


def detection_transforms(image_size: int, *, augment: bool) -> v2.Transform | None:
    """For ``(image, {"boxes", "labels", ["masks"]})``; ``None`` without augmentation (sizes may vary)."""
    if not augment:
        return None
    return v2.Compose([*_jitter(image_size, fill=0), v2.SanitizeBoundingBoxes(min_size=1)])


def segmentation_transforms(image_size: int, *, augment: bool) -> v2.Transform:
    """For ``(image, mask)``: padding is ignored (255) in the mask; without augmentation a plain resize
    to ``image_size`` square, so images of any size batch together."""
    if not augment:
        return v2.Resize((image_size, image_size))
    return v2.Compose(_jitter(image_size, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}))


def _jitter(image_size: int, fill: int | dict) -> list[v2.Transform]:
    return [
        v2.RandomHorizontalFlip(),
        v2.ScaleJitter((image_size, image_size), scale_range=SCALE_RANGE, antialias=True),
        v2.RandomCrop((image_size, image_size), pad_if_needed=True, fill=fill),
    ]
