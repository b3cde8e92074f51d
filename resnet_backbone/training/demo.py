"""The demo behind ``resnet-backbone demo``: fine-tune a torchvision detector on this backbone, on the CPU, with
no download.

FCOS with an FPN on a ResNet-18 learns the synthetic shapes data set in a few minutes: mAP@0.5 is
measured (torchmetrics) before and after, and the predictions and the multi-scale feature maps are
written as PNG files.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..adapters.torchvision import build_detector, detection_loss
from .data.synthetic import SHAPE_CLASSES, SyntheticDetection, collate_detection
from .engine import TrainingOptions, autocast_for, distributed_world, fit, resolve_precision


@dataclass(frozen=True)
class DemoOptions:
    """What ``run_demo`` trains and where it writes; the command line sets the fields it has an option for."""

    epochs: int = 5
    image_size: int = 128
    preset: str = "resnet18"
    weights: str | None = None  # anything from_pretrained accepts; overrides preset
    output_dir: Path = Path("demo-output")
    train_images: int = 640
    eval_images: int = 96
    batch_size: int = 8
    learning_rate: float = 1e-3
    precision: str = "auto"  # one of PRECISIONS
    seed: int = 0


@dataclass(frozen=True)
class DemoResult:
    map50_before: float
    map50_after: float
    precision: str
    steps: int
    seconds: float
    predictions_png: Path
    features_png: Path


@dataclass(frozen=True)
class FineTunedDemo:
    """The demo's detector after fine-tuning, its data, and what was measured on the way."""

    model: nn.Module
    train_set: SyntheticDetection
    eval_set: SyntheticDetection
    autocast: AbstractContextManager  # the precision it trained in, for running it
    map50_before: float
    map50_after: float
    precision: str
    steps: int
    seconds: float


def run_demo(options: DemoOptions, log=print) -> DemoResult:
    """Measure mAP@0.5, fine-tune, measure again, and draw the predictions and feature maps.

    Args:
        options: the run's settings.
        log: where the progress lines go (``print`` by default).

    Returns:
        Both measurements, the precision and steps used, the training time and the two PNG files.
    """
    tuned = fine_tune_demo_detector(options, log)
    options.output_dir.mkdir(parents=True, exist_ok=True)
    predictions_png = draw_predictions(
        tuned.model, tuned.eval_set, options.output_dir / "predictions.png", tuned.autocast
    )
    features_png = draw_feature_maps(tuned.model, tuned.eval_set[0][0], options.output_dir / "feature_maps.png")
    log(f"wrote {predictions_png} and {features_png}")
    return DemoResult(
        tuned.map50_before,
        tuned.map50_after,
        tuned.precision,
        tuned.steps,
        tuned.seconds,
        predictions_png,
        features_png,
    )


def fine_tune_demo_detector(options: DemoOptions, log=print) -> FineTunedDemo:
    """The demo's training: FCOS on the synthetic shapes, with mAP@0.5 on held-out scenes before and after.

    Args:
        options: the run's settings (``output_dir`` is not written).
        log: where the progress lines go.

    Returns:
        The fine-tuned detector (in training mode), its data and the measurements.
    """
    size = options.image_size
    torch.manual_seed(options.seed)
    model = build_detector(
        "fcos", options.weights or options.preset, num_classes=len(SHAPE_CLASSES) + 1, min_size=size, max_size=size
    )
    train_set = SyntheticDetection(options.train_images, size=size, seed=options.seed)
    eval_set = SyntheticDetection(options.eval_images, size=size, seed=options.seed + 1)
    steps = options.epochs * (len(train_set) // options.batch_size)
    training = TrainingOptions(
        steps=steps, batch_size=options.batch_size, learning_rate=options.learning_rate,
        precision=options.precision, seed=options.seed,
    )  # fmt: skip
    with distributed_world() as world:
        precision = resolve_precision(options.precision, world.device)
        autocast = autocast_for(precision, world.device)
        map_before = evaluate_map50(model, eval_set, autocast)
        log(f"mAP@0.5 before fine-tuning: {map_before:.3f}")
        started = time.perf_counter()
        fit(model, train_set, detection_loss, training, world, collate_fn=collate_detection)
        seconds = time.perf_counter() - started
        map_after = evaluate_map50(model, eval_set, autocast)
    log(f"mAP@0.5 after {steps} steps ({seconds:.0f} s, {precision}): {map_after:.3f}")
    return FineTunedDemo(model, train_set, eval_set, autocast, map_before, map_after, precision, steps, seconds)


@torch.no_grad()
def evaluate_map50(model: nn.Module, data: SyntheticDetection, autocast) -> float:
    """mAP at IoU 0.5 over ``data``, by torchmetrics' COCO-style evaluation."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(iou_thresholds=[0.5])
    model.eval()
    loader = DataLoader(data, batch_size=16, collate_fn=collate_detection)
    for images, targets in loader:
        with autocast:
            predictions = model(images)
        metric.update(
            [{k: v.float() if v.is_floating_point() else v for k, v in p.items()} for p in predictions], targets
        )
    model.train()
    return float(metric.compute()["map_50"])


@torch.no_grad()
def draw_predictions(model: nn.Module, data: SyntheticDetection, path: Path, autocast, count: int = 8) -> Path:
    """A grid of images with their confident predicted boxes and class names."""
    from torchvision.utils import draw_bounding_boxes, make_grid, save_image

    model.eval()
    images = [data[i][0] for i in range(count)]
    with autocast:
        predictions = model(images)
    drawn = []
    for image, prediction in zip(images, predictions):
        keep = prediction["scores"] > 0.5
        names = [f"{SHAPE_CLASSES[int(label) - 1]} {float(score):.2f}" for label, score in
                 zip(prediction["labels"][keep], prediction["scores"][keep])]  # fmt: skip
        pixels = (image * 255).to(torch.uint8)
        if keep.any():
            pixels = draw_bounding_boxes(pixels, prediction["boxes"][keep].float(), names, colors="yellow")
        drawn.append(pixels.float() / 255)
    save_image(make_grid(drawn, nrow=4, padding=4), path)
    return path


@torch.no_grad()
def draw_feature_maps(model: nn.Module, image: torch.Tensor, path: Path) -> Path:
    """Each FPN level's mean activation for one image, side by side with the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    features = model.backbone(model.transform([image])[0].tensors)
    figure, axes = plt.subplots(1, len(features) + 1, figsize=(3 * (len(features) + 1), 3))
    axes[0].imshow(image.permute(1, 2, 0).numpy())
    axes[0].set_title("input")
    for axis, (name, feature) in zip(axes[1:], features.items()):
        axis.imshow(feature[0].float().mean(0).numpy(), cmap="viridis")
        axis.set_title(f"FPN level {name}: {tuple(feature.shape[-2:])}")
    for axis in axes:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
