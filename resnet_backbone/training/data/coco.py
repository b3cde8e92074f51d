"""A COCO detection folder (``annotations.json`` and ``images/``) as labelling tools really export it.

Everything is checked before training starts, so a bad file is one clear error that names the file and the
entry, not a crash deep inside a detector. Targets are then cleaned the way torchvision's detection
references do: images without annotations stay as negatives, crowd regions leave the training targets
(evaluation keeps them, flagged, as COCO does), boxes are clipped to the image, and boxes with a side of
at most one pixel are dropped. Category ids become contiguous labels 1..K (0 is the detectors' background).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .images import decoded_size, in_threads, read_image

ANNOTATIONS_NAME = "annotations.json"
IMAGES_DIR = "images"
BACKGROUND = "background"


@dataclass(frozen=True)
class Category:
    id: int
    name: str


@dataclass
class CleaningReport:
    """What cleaning left out of the training targets, said once in the log."""

    crowd_boxes: int = 0
    degenerate_boxes: int = 0
    negative_images: int = 0

    def __str__(self) -> str:
        parts = [
            f"ignored {_count(self.crowd_boxes, 'crowd box', 'crowd boxes')}",
            f"dropped {_count(self.degenerate_boxes, 'degenerate box', 'degenerate boxes')}",
            f"{_count(self.negative_images, 'image', 'images')} without annotations kept as "
            f"{'a negative' if self.negative_images == 1 else 'negatives'}",
        ]
        return ", ".join(parts)


@dataclass
class _ImageTargets:
    path: Path
    boxes: list[list[float]] = field(default_factory=list)  # x1 y1 x2 y2, clipped
    labels: list[int] = field(default_factory=list)
    iscrowd: list[int] = field(default_factory=list)
    segmentations: list[Any] = field(default_factory=list)


class CocoFolder(Dataset):
    """``(image, target)`` pairs of a COCO folder in torchvision's detection format.

    ``target`` holds ``boxes`` (n, 4) x1 y1 x2 y2 and ``labels`` (n,); with ``masks`` also ``masks``
    (n, H, W) uint8 decoded from the polygons or RLE; with ``keep_crowd`` (evaluation) the crowd boxes stay,
    flagged in ``iscrowd``. ``categories`` fixes the label mapping (a validation folder uses the training
    folder's); by default it is this folder's categories in id order. ``transforms`` is a
    ``torchvision.transforms.v2`` transform of ``(image, target)``.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        masks: bool = False,
        keep_crowd: bool = False,
        categories: Sequence[Category] | None = None,
        transforms: Callable | None = None,
    ) -> None:
        directory = Path(directory)
        self.annotations_path = directory / ANNOTATIONS_NAME
        data = _read_json(directory)
        own_categories = _categories(data, self.annotations_path)
        self.categories = list(categories) if categories is not None else own_categories
        self.masks, self.keep_crowd, self.transforms = masks, keep_crowd, transforms
        self.report = CleaningReport()
        self._images = self._targets(data, directory / IMAGES_DIR)

    @property
    def num_classes(self) -> int:
        """Number of detector classes: the categories and the background."""
        return len(self.categories) + 1

    @property
    def id2label(self) -> dict[int, str]:
        return {0: BACKGROUND, **{label: category.name for label, category in enumerate(self.categories, 1)}}

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        entry = self._images[index]
        image = read_image(entry.path)
        height, width = image.shape[-2:]
        target: dict[str, torch.Tensor] = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(entry.boxes, dtype=torch.float32).reshape(-1, 4),
                format="XYXY",
                canvas_size=(height, width),
            ),
            "labels": torch.tensor(entry.labels, dtype=torch.int64),
        }
        if self.keep_crowd:
            target["iscrowd"] = torch.tensor(entry.iscrowd, dtype=torch.int64)
        if self.masks:
            decoded = [_decode_mask(segmentation, height, width) for segmentation in entry.segmentations]
            target["masks"] = tv_tensors.Mask(
                torch.from_numpy(np.stack(decoded)) if decoded else torch.zeros(0, height, width, dtype=torch.uint8)
            )
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image.as_subclass(torch.Tensor), {key: value.as_subclass(torch.Tensor) for key, value in target.items()}

    def _targets(self, data: dict, images_dir: Path) -> list[_ImageTargets]:
        where = self.annotations_path
        images: dict[int, _ImageTargets] = {}
        entries: list[str] = []
        for index, image in enumerate(_entries(data, "images", where)):
            entry = f"{where}: images[{index}]"
            _require_keys(image, ("id", "file_name"), entry)
            if image["id"] in images:
                raise ValueError(f"{entry}: image id {image['id']!r} is used twice; ids must be unique.")
            path = images_dir / str(image["file_name"])
            if not path.is_file():
                raise ValueError(f"{entry}: the image file {path} does not exist.")
            images[image["id"]] = _ImageTargets(path)
            entries.append(f"{entry} (id {image['id']!r})")
        decoded = in_threads(lambda pair: decoded_size(*pair), zip([image.path for image in images.values()], entries))
        sizes = dict(zip(images, decoded))
        label_of = {category.id: label for label, category in enumerate(self.categories, 1)}
        annotations = _entries(data, "annotations", where)
        for index, annotation in enumerate(annotations):
            entry = f"{where}: annotations[{index}] (id {annotation.get('id')!r})"
            self._add(annotation, entry, images, sizes, label_of)
        self.report.negative_images = len(images.keys() - {annotation["image_id"] for annotation in annotations})
        return list(images.values())

    def _add(self, annotation: dict, entry: str, images: dict, sizes: dict, label_of: dict[int, int]) -> None:
        _require_keys(
            annotation, ("image_id", "category_id", "bbox", *(("segmentation",) if self.masks else ())), entry
        )
        if annotation["image_id"] not in images:
            raise ValueError(f"{entry}: image_id {annotation['image_id']!r} is not in 'images'.")
        if annotation["category_id"] not in label_of:
            known = ", ".join(str(category_id) for category_id in label_of)
            raise ValueError(f"{entry}: category_id {annotation['category_id']!r} is not a category ({known}).")
        bbox = annotation["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite_number(value) for value in bbox)):
            raise ValueError(f"{entry}: bbox must be 4 numbers [x, y, width, height], got {bbox!r}.")
        height, width = sizes[annotation["image_id"]]
        x, y, box_width, box_height = bbox
        box = [min(max(x, 0), width), min(max(y, 0), height)]
        box += [min(max(x + box_width, 0), width), min(max(y + box_height, 0), height)]
        crowd = bool(annotation.get("iscrowd", 0))
        if crowd and not self.keep_crowd:
            self.report.crowd_boxes += 1
            return
        if box[2] - box[0] <= 1 or box[3] - box[1] <= 1:
            self.report.degenerate_boxes += 1
            return
        if self.masks:
            _check_segmentation(
                annotation["segmentation"], f"{entry} on image_id {annotation['image_id']!r}", height, width
            )
        image = images[annotation["image_id"]]
        image.boxes.append(box)
        image.labels.append(label_of[annotation["category_id"]])
        image.iscrowd.append(int(crowd))
        image.segmentations.append(annotation.get("segmentation"))


def _read_json(directory: Path) -> dict:
    path = directory / ANNOTATIONS_NAME
    if not path.is_file() or not (directory / IMAGES_DIR).is_dir():
        raise ValueError(f"{directory} must hold {ANNOTATIONS_NAME} and an {IMAGES_DIR}/ folder (COCO layout).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object with images, annotations and categories.")
    return data


def _entries(data: dict, key: str, where: Path) -> list[dict]:
    if not isinstance(data.get(key), list):
        raise ValueError(f"{where}: expected a list under {key!r}, got {type(data.get(key)).__name__}.")
    for index, entry in enumerate(data[key]):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: {key}[{index}] must be an object, got {entry!r}.")
    return data[key]


def _categories(data: dict, where: Path) -> list[Category]:
    categories = []
    for index, category in enumerate(_entries(data, "categories", where)):
        _require_keys(category, ("id", "name"), f"{where}: categories[{index}]")
        categories.append(Category(category["id"], str(category["name"])))
    if not categories:
        raise ValueError(
            f"{where}: 'categories' is empty, so there is nothing to detect; list the classes there, "
            'such as {"id": 1, "name": "person"}, with the annotations\' category_id pointing at them.'
        )
    if len({category.id for category in categories}) != len(categories):
        raise ValueError(f"{where}: category ids must be unique, got {[category.id for category in categories]}.")
    return sorted(categories, key=lambda category: category.id)


def _require_keys(entry: dict, keys: Sequence[str], where: str) -> None:
    missing = [key for key in keys if key not in entry]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(map(repr, missing))} (it has {', '.join(map(repr, entry))}).")


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_segmentation(segmentation: Any, where: str, height: int, width: int) -> None:
    problem = _segmentation_problem(segmentation, height, width)
    if problem:
        raise ValueError(
            f"{where}: {problem}; got {str(segmentation)[:80]}. Mask R-CNN needs each annotation's mask as "
            "polygons ([[x1, y1, x2, y2, x3, y3, ...], ...]) or an RLE ({'counts': ..., 'size': [height, width]})."
        )


def _segmentation_problem(segmentation: Any, height: int, width: int) -> str | None:
    """What makes ``segmentation`` no mask of a ``height`` x ``width`` image (pycocotools would crash on it or
    decode it silently wrong), or None."""
    if isinstance(segmentation, dict):
        return _rle_problem(segmentation, height, width)
    if not (isinstance(segmentation, list) and segmentation):
        return "the segmentation is empty" if not segmentation else "the segmentation is neither polygons nor an RLE"
    for polygon in segmentation:
        if not (isinstance(polygon, list) and all(_is_finite_number(value) for value in polygon)):
            return f"a polygon must be a list of numbers, got {str(polygon)[:40]}"
        if len(polygon) < 6 or len(polygon) % 2:
            return f"a polygon needs 3 or more x, y points (an even count of 6 or more numbers), got {len(polygon)}"
    return None


def _rle_problem(rle: dict, height: int, width: int) -> str | None:
    if not {"counts", "size"} <= rle.keys():
        return "an RLE needs 'counts' and 'size'"
    if rle["size"] != [height, width]:
        return f"the RLE's size {rle['size']!r} is not its image's [height, width] [{height}, {width}]"
    runs = _compressed_runs(rle["counts"]) if isinstance(rle["counts"], str) else rle["counts"]
    valid = isinstance(runs, list) and all(isinstance(run, int) and not isinstance(run, bool) for run in runs)
    if not valid or any(run < 0 for run in runs):
        return "the RLE's counts are neither COCO's compressed string nor a list of run lengths"
    if sum(runs) != height * width:
        return f"the RLE's runs cover {sum(runs)} pixels, not the image's {height}x{width} = {height * width}"
    return None


def _compressed_runs(counts: str) -> list[int] | None:
    """The run lengths of COCO's compressed RLE string (pycocotools' ``rleFrString``), or None if it is not one."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position == len(counts) or not 0 <= ord(counts[position]) - 48 < 64:
                return None
            chunk = ord(counts[position]) - 48
            value |= (chunk & 0x1F) << shift
            more, position, shift = bool(chunk & 0x20), position + 1, shift + 5
            if not more and chunk & 0x10:
                value |= -1 << shift
        runs.append(value + runs[-2] if len(runs) > 2 else value)
    return runs


def _decode_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """Polygons, uncompressed RLE or compressed RLE as one (height, width) uint8 mask (pycocotools' rules)."""
    from pycocotools import mask as coco_mask

    if isinstance(segmentation, list):
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return coco_mask.decode(rle)


def _count(number: int, singular: str, plural: str) -> str:
    return f"{number} {singular if number == 1 else plural}"
