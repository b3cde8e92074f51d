"""Held-out evaluation: during training (``--val-data``, rank 0) and on its own (``resnet-backbone evaluate``).

Detection: mAP@0.5 and mAP@[.5:.95] by torchmetrics' ``MeanAveragePrecision`` (the COCO protocol through
pycocotools, so crowd regions neither count as misses nor make detections on them false positives).
Segmentation: mIoU and per-class IoU by torchmetrics' ``MulticlassJaccardIndex``, 255 ignored; each image
is predicted at the training size and the logits resized back to its mask. Every result is printed,
appended to ``metrics.jsonl``, and the best model of this run so far kept as ``best/``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..quantization import quantized_programs
from .data.coco import CocoFolder
from .data.masks import IGNORE_INDEX, MaskFolder
from .engine import World, json_line, keep_log_until
from .task_model import TaskSpec, save_task_model

METRICS_NAME = "metrics.jsonl"
BEST_DIR = "best"
PRIMARY_METRIC = {"detection": "mAP", "segmentation": "mIoU"}


def evaluation_data(spec: TaskSpec, directory: Path) -> Dataset:
    """``directory`` read as ``spec``'s task: COCO boxes (crowd kept, flagged) with the training label
    mapping, or masks checked against the model's classes."""
    if spec.task == "detection":
        if spec.category_ids is None:
            raise ValueError("This detector was trained on the synthetic shapes; it has no COCO categories to map.")
        return CocoFolder(directory, keep_crowd=True, categories=spec.categories)
    return MaskFolder(directory, num_classes=spec.num_classes)


def model_input(spec: TaskSpec, image: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
    """One image as evaluation feeds it to ``spec``'s model: in a list for a detector (which resizes it
    itself), as a batch of one at the training size for a segmenter."""
    if spec.task == "detection":
        return [image]
    return F.interpolate(image[None], size=(spec.image_size,) * 2, mode="bilinear")


def evaluation_device(model: nn.Module) -> torch.device:
    """Where ``resnet-backbone evaluate`` runs ``model``: CUDA when there is one, except for an int8 model,
    which runs on the CPU only."""
    if quantized_programs(model) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def evaluate(model: nn.Module, dataset: Dataset, spec: TaskSpec, device: torch.device) -> dict[str, Any]:
    """The metrics of ``model`` on ``dataset``, without touching the training's random state; the model is
    left in eval mode. One process computes them all (torchmetrics' cross-process sync stays off, so the
    other ranks of a DDP job need not join)."""
    model.eval()
    with torch.inference_mode(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if spec.task == "detection":
            return _detection_metrics(model, dataset, spec, device)
        return _segmentation_metrics(model, dataset, spec, device)


def _detection_metrics(model: nn.Module, dataset: Dataset, spec: TaskSpec, device: torch.device) -> dict[str, float]:
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", sync_on_compute=False)
    for index in range(len(dataset)):
        image, target = dataset[index]
        (prediction,) = model(model_input(spec, image.to(device)))
        metric.update([{key: value.cpu() for key, value in prediction.items()}], [target])
    result = metric.compute()
    return {"mAP@0.5": float(result["map_50"]), "mAP": float(result["map"])}


def _segmentation_metrics(model: nn.Module, dataset: Dataset, spec: TaskSpec, device: torch.device) -> dict[str, Any]:
    from torchmetrics.classification import MulticlassJaccardIndex

    options = dict(num_classes=spec.num_classes, ignore_index=IGNORE_INDEX, sync_on_compute=False)
    mean_iou = MulticlassJaccardIndex(average="macro", **options)
    class_iou = MulticlassJaccardIndex(average="none", **options)
    for index in range(len(dataset)):
        image, mask = dataset[index]
        logits = F.interpolate(model(model_input(spec, image.to(device))).float(), size=mask.shape, mode="bilinear")
        prediction = logits.argmax(dim=1).cpu()
        mean_iou.update(prediction, mask[None])
        class_iou.update(prediction, mask[None])
    per_class = {str(label): float(iou) for label, iou in enumerate(class_iou.compute())}
    return {"mIoU": float(mean_iou.compute()), "per_class_IoU": per_class}


def format_metrics(metrics: dict[str, Any]) -> str:
    """One log line: ``step 40: mAP@0.5 0.512, mAP 0.231`` or ``mIoU 0.6 (per class 0: 0.9, 1: 0.3)``."""
    scalars = ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key not in ("step", "per_class_IoU"))
    line = f"step {metrics['step']}: {scalars}" if "step" in metrics else scalars
    if "per_class_IoU" in metrics:
        line += (
            " (per class " + ", ".join(f"{label}: {iou:.4f}" for label, iou in metrics["per_class_IoU"].items()) + ")"
        )
    return line


class PeriodicEvaluation:
    """``fit``'s ``after_step``: rank 0 evaluates every ``every`` steps (0: never) and at the last step,
    logs, and saves the best model of this run so far to ``output_dir/best``; other ranks wait for it.

    ``best/`` is chosen among this run's evaluations only; a resumed run (``resume``) is the same run, so
    it counts the evaluations logged before the step it resumed from and drops the later ones (it redoes
    those steps)."""

    def __init__(
        self, dataset: Dataset, spec: TaskSpec, every: int, output_dir: Path, world: World, *, resume: bool = False
    ) -> None:
        self.dataset, self.spec, self.every, self.output_dir, self.world = dataset, spec, every, output_dir, world
        self.metric = PRIMARY_METRIC[spec.task]
        self.resume = resume
        self.best: float | None = None  # known at the first evaluation, which tells where the run resumed

    def __call__(self, model: nn.Module, step: int, last: bool) -> None:
        if not (last or (self.every and step % self.every == 0)):
            return
        if self.world.is_main:
            if self.best is None:
                earlier = keep_log_until(self.output_dir / METRICS_NAME, step - 1) if self.resume else []
                self.best = max((entry[self.metric] for entry in earlier), default=-math.inf)
            metrics = {"step": step, **evaluate(model, self.dataset, self.spec, self.world.device)}
            model.train()
            print(format_metrics(metrics))
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / METRICS_NAME, "a", encoding="utf-8") as log:
                log.write(json_line(metrics))
            if metrics[self.metric] > self.best:
                self.best = metrics[self.metric]
                save_task_model(model, self.output_dir / BEST_DIR, self.spec)
        if self.world.size > 1:
            dist.barrier()
