"""``resnet-backbone train`` (also ``python -m resnet_backbone.cli train``): fine-tune a detector or a segmenter on
this backbone, in one process or many under ``torchrun --nproc_per_node=N``.

Detection: a torchvision detector (FCOS, Faster R-CNN, RetinaNet) on the synthetic shapes, or on a COCO
folder (``--data DIR`` with ``annotations.json`` and ``images/``). Segmentation: a
segmentation_models_pytorch model with this backbone as its ``tu-rb_<preset>`` encoder, on the synthetic
shapes' masks.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..adapters.torchvision import build_detector, detection_loss
from ..backbone import ResNetBackbone
from ..presets import PRESETS
from ..trunk import ResNetTrunk
from ..weights import load_checkpoint
from ..weights.architecture import describe
from .arguments import existing_directory, non_negative_int, output_directory, positive_float, positive_int
from .synthetic import SHAPE_CLASSES, SyntheticDetection, SyntheticSegmentation, collate_detection
from .training import PRECISIONS, TrainingOptions, distributed_world, fit

DETECTORS = ("fcos", "fasterrcnn", "retinanet")
SEGMENTERS = {"unet": "Unet", "fpn": "FPN", "deeplabv3plus": "DeepLabV3Plus"}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--task", choices=("detection", "segmentation"), default="detection")
    parser.add_argument("--detector", choices=DETECTORS, default="fcos")
    parser.add_argument("--segmenter", choices=SEGMENTERS, default="unet")
    parser.add_argument("--preset", choices=PRESETS, default="resnet18", metavar="PRESET")
    parser.add_argument("--weights", help="backbone checkpoint to start from: anything from_pretrained accepts")
    parser.add_argument("--out-features", nargs="+", metavar="NAME", help="detection: stages the FPN uses")
    parser.add_argument(
        "--trainable-layers", type=non_negative_int, help="stages trained, counted from the last (torchvision)"
    )
    parser.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (frozen stages stay)")
    parser.add_argument("--data", type=existing_directory, help="COCO folder: annotations.json and images/ (detection)")
    parser.add_argument("--image-size", type=positive_int, default=128, metavar="PIXELS")
    parser.add_argument("--train-images", type=positive_int, default=640, metavar="N", help="size of the synthetic set")
    parser.add_argument("--steps", type=positive_int, default=400)
    parser.add_argument("--batch-size", type=positive_int, default=8, help="per process")
    parser.add_argument("--lr", type=positive_float, default=1e-3)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=output_directory, default="train-output", metavar="DIR")
    parser.add_argument("--checkpoint-every", type=non_negative_int, default=100, metavar="STEPS")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    parser.add_argument("--stop-at-step", type=positive_int, metavar="STEP", help="end this run early, checkpointed")
    return parser


def run(args: argparse.Namespace) -> list[float]:
    """Build the task's model and data from ``args`` and train; returns this process's losses."""
    with distributed_world() as world:
        torch.manual_seed(args.seed)  # every process builds the same initial model
        model, dataset, compute_loss, collate = _task(args)
        options = TrainingOptions(
            steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, precision=args.precision,
            seed=args.seed, output_dir=args.output_dir, checkpoint_every=args.checkpoint_every, resume=args.resume,
            stop_at_step=args.stop_at_step, sync_batchnorm=args.sync_bn,
        )  # fmt: skip
        losses = fit(model, dataset, compute_loss, options, world, collate_fn=collate)
        if world.is_main:
            _save_backbone(model, args.output_dir / "backbone")
    return losses


def _task(args: argparse.Namespace) -> tuple[nn.Module, Dataset, Callable[[nn.Module, Any], torch.Tensor], Any]:
    backbone = args.weights or args.preset
    if args.task == "detection":
        dataset, num_classes = _detection_data(args)
        model = build_detector(
            args.detector, backbone, num_classes=num_classes, trainable_layers=args.trainable_layers,
            out_features=args.out_features, min_size=args.image_size, max_size=args.image_size,
        )  # fmt: skip
        return model, dataset, detection_loss, collate_detection
    if args.data is not None:
        raise ValueError("--data reads COCO detection folders; segmentation trains on the synthetic masks.")
    model = _smp_model(args.segmenter, args.preset, args.weights)
    dataset = SyntheticSegmentation(args.train_images, size=args.image_size, seed=args.seed)
    return model, dataset, _segmentation_loss, None


def _detection_data(args: argparse.Namespace) -> tuple[Dataset, int]:
    if args.data is None:
        return SyntheticDetection(args.train_images, size=args.image_size, seed=args.seed), len(SHAPE_CLASSES) + 1
    from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
    from torchvision.transforms import v2

    annotations = args.data / "annotations.json"
    if not annotations.is_file() or not (args.data / "images").is_dir():
        raise ValueError(f"--data {args.data} must hold annotations.json and an images/ folder (COCO layout).")
    transforms = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    coco = CocoDetection(str(args.data / "images"), str(annotations), transforms=transforms)
    num_classes = max(coco.coco.getCatIds(), default=0) + 1
    return wrap_dataset_for_transforms_v2(coco, target_keys=("boxes", "labels")), num_classes


def _segmentation_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, masks = batch
    return F.cross_entropy(model(images).float(), masks)


def _smp_model(kind: str, preset: str, weights: str | None) -> nn.Module:
    """An smp model whose encoder is this backbone (``tu-rb_<preset>``), from ``weights`` when given."""
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise ValueError("--task segmentation needs segmentation_models_pytorch (pip install it).") from None
    from ..adapters import timm as _registers_rb_models  # noqa: F401

    pretrained = None if weights is None else ResNetBackbone.load(weights)
    if pretrained is not None:
        preset = describe(pretrained.config)
        if preset not in PRESETS:
            raise ValueError(f"--weights holds a {preset}, which is not a preset the tu-rb_ encoders cover.")
    model = getattr(smp, SEGMENTERS[kind])(f"tu-rb_{preset}", encoder_weights=None, classes=len(SHAPE_CLASSES) + 1)
    if pretrained is not None:
        encoder = next(m for m in model.encoder.modules() if isinstance(m, ResNetTrunk))
        load_checkpoint(encoder, pretrained.state_dict())
    return model


def _save_backbone(model: nn.Module, directory: Path) -> None:
    """Keep the fine-tuned backbone as a checkpoint that ``from_pretrained`` reads back."""
    trunk = next(m for m in model.modules() if isinstance(m, ResNetTrunk))
    trunk.save_pretrained(directory)
    print(f"saved the fine-tuned backbone to {directory}")
