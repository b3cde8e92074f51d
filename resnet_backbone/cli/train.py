"""``resnet-backbone train`` (also ``python -m resnet_backbone.cli train``): fine-tune a detector or a segmenter on
this backbone, in one process or many under ``torchrun --nproc_per_node=N``.

Detection: a torchvision detector (FCOS, Faster R-CNN, Mask R-CNN, RetinaNet) on the synthetic shapes, or on
a COCO folder (``--data DIR`` with ``annotations.json`` and ``images/``). Segmentation: a
segmentation_models_pytorch model with this backbone as its ``tu-rb_<preset>`` encoder, on the synthetic
shapes' masks or on a mask folder (``--data DIR`` with ``images/`` and ``masks/``). ``--val-data`` evaluates
during training (see ``evaluation``). One run per ``--output-dir`` (see ``run_folder``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from ..adapters.torchvision import detection_loss
from ..presets import PRESETS
from ..training.data.augmentation import detection_transforms, segmentation_transforms
from ..training.data.coco import BACKGROUND, CocoFolder
from ..training.data.masks import MaskFolder
from ..training.data.synthetic import SHAPE_CLASSES, SyntheticDetection, SyntheticSegmentation, collate_detection
from ..training.engine import CHECKPOINT_NAME, LOG_NAME, PRECISIONS, TrainingOptions, World, distributed_world, fit
from ..training.evaluation import BEST_DIR, METRICS_NAME, PeriodicEvaluation, evaluation_data
from ..training.run_folder import claimed_run_folder, refuse_to_mix_runs
from ..training.task_model import (
    IMAGE_POOLING_SEGMENTERS,
    SEGMENTERS,
    TaskSpec,
    backbone_of,
    build_task_model,
    save_task_model,
    segmentation_loss,
)
from ..weights.architecture import describe
from .arguments import existing_directory, non_negative_float, non_negative_int, output_directory, positive_int

HELP = "fine-tune a detector or segmenter, alone or under torchrun"
DETECTORS = ("fcos", "fasterrcnn", "maskrcnn", "retinanet")
MODEL_DIR = "model"
BACKBONE_DIR = "backbone"
RUN_FILES = (CHECKPOINT_NAME, LOG_NAME, METRICS_NAME, MODEL_DIR, BACKBONE_DIR, BEST_DIR)  # what a run writes
SYNTHETIC_LABELS = {0: BACKGROUND, **dict(enumerate(SHAPE_CLASSES, 1))}


@dataclass(frozen=True)
class _Task:
    model: nn.Module
    spec: TaskSpec
    dataset: Dataset
    compute_loss: Callable[[nn.Module, Any], torch.Tensor]
    collate: Callable | None
    val_dataset: Dataset | None


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
    parser.add_argument("--data", type=existing_directory, metavar="DIR",
                        help="COCO folder (annotations.json, images/); segmentation: images/, masks/")  # fmt: skip
    parser.add_argument("--val-data", type=existing_directory, metavar="DIR",
                        help="held-out folder of the same layout as --data")  # fmt: skip
    parser.add_argument("--eval-every", type=non_negative_int, default=100, metavar="STEPS",
                        help="and at the end; 0: only then")  # fmt: skip
    parser.add_argument("--num-classes", type=positive_int, metavar="N",
                        help="segmentation: classes (default: from the masks)")  # fmt: skip
    parser.add_argument("--no-augment", action="store_true", help="no flip and scale jitter of the training data")
    parser.add_argument("--image-size", type=positive_int, default=128, metavar="PIXELS")
    parser.add_argument("--train-images", type=positive_int, default=640, metavar="N", help="size of the synthetic set")
    parser.add_argument("--steps", type=positive_int, default=400)
    parser.add_argument("--batch-size", type=positive_int, default=8, help="per process")
    parser.add_argument("--lr", type=non_negative_float, default=1e-3, help="0 keeps the weights (a dry run)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--compile", action="store_true",
                        help="fast path: channels_last, dense parts compiled (fixed image size)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=output_directory, default="train-output", metavar="DIR")
    parser.add_argument("--checkpoint-every", type=non_negative_int, default=100, metavar="STEPS")
    earlier_run = parser.add_mutually_exclusive_group()
    earlier_run.add_argument("--resume", action="store_true", help="continue the run in DIR from its checkpoint.pt")
    earlier_run.add_argument("--overwrite", action="store_true", help="replace the run in DIR, if it holds one")
    parser.add_argument("--stop-at-step", type=positive_int, metavar="STEP", help="end this run early, checkpointed")
    return parser


def run(args: argparse.Namespace) -> list[float]:
    """Build the task's model and data from ``args`` and train.

    Args:
        args: every option of ``add_arguments``: the model (``task``, ``detector``, ``segmenter``, ``preset``,
            ``weights``, ``out_features``, ``trainable_layers``, ``sync_bn``), the data (``data``,
            ``val_data``, ``eval_every``, ``num_classes``, ``no_augment``, ``image_size``, ``train_images``),
            the schedule (``steps``, ``batch_size``, ``lr``, ``precision``, ``compile``, ``seed``) and the run
            folder (``output_dir``, ``checkpoint_every``, ``resume``, ``overwrite``, ``stop_at_step``).

    Returns:
        This process's loss at each step it ran.

    Raises:
        ValueError, OSError: bad data, weights that do not fit, or a run folder that holds another run (before
            any step); ``resnet-backbone`` shows it as one line and exits with 2.
    """
    with distributed_world() as world:
        if world.is_main:  # before the data is read, so a refusal is instant; checked again under the lock
            refuse_to_mix_runs(args.output_dir, RUN_FILES, resume=args.resume, overwrite=args.overwrite)
        torch.manual_seed(args.seed)  # every process builds the same initial model
        task = _task(args)
        if world.is_main and isinstance(task.dataset, CocoFolder):
            print(f"{task.dataset.annotations_path}: {task.dataset.report}")
        with claimed_run_folder(
            args.output_dir, RUN_FILES, is_main=world.is_main, resume=args.resume, overwrite=args.overwrite
        ):
            return _train(args, task, world)


def _train(args: argparse.Namespace, task: _Task, world: World) -> list[float]:
    options = TrainingOptions(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, precision=args.precision,
        seed=args.seed, output_dir=args.output_dir, checkpoint_every=args.checkpoint_every, resume=args.resume,
        stop_at_step=args.stop_at_step, sync_batchnorm=args.sync_bn, compile=args.compile,
        model_spec={**asdict(task.spec), "backbone": describe(backbone_of(task.model).config)},
    )  # fmt: skip
    evaluation = None
    if task.val_dataset is not None:
        evaluation = PeriodicEvaluation(
            task.val_dataset, task.spec, args.eval_every, args.output_dir, world, resume=args.resume
        )
    losses = fit(
        task.model, task.dataset, task.compute_loss, options, world, collate_fn=task.collate, after_step=evaluation
    )
    if world.is_main:
        _save_backbone(task.model, args.output_dir / BACKBONE_DIR)
        save_task_model(task.model, args.output_dir / MODEL_DIR, task.spec)
    return losses


def _task(args: argparse.Namespace) -> _Task:
    """The model, data and loss ``args`` ask for; every folder is read and checked here, before training."""
    if args.val_data is not None and args.data is None:
        raise ValueError("--val-data needs --data: evaluation uses the label mapping of your own training folder.")
    if args.num_classes is not None and args.task != "segmentation":
        raise ValueError("--num-classes is for --task segmentation; detection reads its classes from the categories.")
    if args.task == "segmentation":
        _check_batch_norm_can_train(args)
    dataset, spec = _detection_data(args) if args.task == "detection" else _segmentation_data(args)
    val_dataset = None if args.val_data is None else evaluation_data(spec, args.val_data)
    backbone = args.weights or args.preset
    if args.task == "detection":
        model = build_task_model(spec, backbone, trainable_layers=args.trainable_layers)
        return _Task(model, spec, dataset, detection_loss, collate_detection, val_dataset)
    return _Task(build_task_model(spec, backbone), spec, dataset, segmentation_loss, None, val_dataset)


def _detection_data(args: argparse.Namespace) -> tuple[Dataset, TaskSpec]:
    masks = args.detector == "maskrcnn"
    common = dict(
        task="detection", architecture=args.detector, image_size=args.image_size, out_features=args.out_features
    )
    if args.data is None:
        if masks:
            raise ValueError("--detector maskrcnn trains on instance masks: give a COCO folder with --data.")
        dataset = SyntheticDetection(args.train_images, size=args.image_size, seed=args.seed)
        return dataset, TaskSpec(num_classes=len(SYNTHETIC_LABELS), id2label=SYNTHETIC_LABELS, **common)
    transforms = detection_transforms(args.image_size, augment=not args.no_augment)
    dataset = CocoFolder(args.data, masks=masks, transforms=transforms)
    category_ids = [category.id for category in dataset.categories]
    return dataset, TaskSpec(
        num_classes=dataset.num_classes, id2label=dataset.id2label, category_ids=category_ids, **common
    )


def _segmentation_data(args: argparse.Namespace) -> tuple[Dataset, TaskSpec]:
    common = dict(task="segmentation", architecture=args.segmenter, image_size=args.image_size)
    if args.data is None:
        dataset = SyntheticSegmentation(args.train_images, size=args.image_size, seed=args.seed)
        return dataset, TaskSpec(num_classes=len(SYNTHETIC_LABELS), id2label=SYNTHETIC_LABELS, **common)
    transforms = segmentation_transforms(args.image_size, augment=not args.no_augment)
    dataset = MaskFolder(args.data, num_classes=args.num_classes, transforms=transforms)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"{dataset.masks_dir}: {dataset.report}")
    return dataset, TaskSpec(num_classes=dataset.num_classes, id2label=dataset.id2label, **common)


def _check_batch_norm_can_train(args: argparse.Namespace) -> None:
    """Refuse a batch BatchNorm cannot train on: an image-pooling branch normalises one value per channel and
    image, so it needs two images per batch (or SyncBatchNorm over two or more processes). ``fit`` only
    makes full batches, so no smaller last batch comes later."""
    synced_over = dist.get_world_size() if args.sync_bn and dist.is_initialized() else 1
    if args.batch_size == 1 and synced_over == 1 and args.segmenter in IMAGE_POOLING_SEGMENTERS:
        raise ValueError(
            f"--batch-size 1: {args.segmenter}'s {IMAGE_POOLING_SEGMENTERS[args.segmenter]} uses BatchNorm on one "
            "value per channel, which cannot train; use --batch-size 2 or more (or --sync-bn over 2+ processes)."
        )


def _save_backbone(model: nn.Module, directory: Path) -> None:
    """Keep the fine-tuned backbone as a checkpoint that ``from_pretrained`` reads back."""
    backbone_of(model).save_pretrained(directory)
    print(f"saved the fine-tuned backbone to {directory}")
