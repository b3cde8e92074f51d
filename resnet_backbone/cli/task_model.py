"""A fine-tuned detector or segmenter as a directory that ``resnet-backbone evaluate`` rebuilds.

``task.json`` says what to build (task, architecture, classes, label names, COCO category ids),
``task_model.pt`` holds the whole model's weights, and ``config.json`` with ``model.safetensors`` hold the
backbone alone (so ``ResNetBackbone.from_pretrained(directory)`` reads it, with the label names in its
``id2label``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters.torchvision import build_detector
from ..backbone import ResNetBackbone
from ..config import ResNetConfig
from ..presets import PRESETS
from ..trunk import ResNetTrunk
from ..weights import load_checkpoint
from ..weights.architecture import describe
from ..weights.files import atomic_write
from .coco import Category

TASK_NAME = "task.json"
WEIGHTS_NAME = "task_model.pt"
SEGMENTERS = {"unet": "Unet", "fpn": "FPN", "deeplabv3plus": "DeepLabV3Plus"}


@dataclass(frozen=True)
class TaskSpec:
    task: str  # "detection" or "segmentation"
    architecture: str  # a detector (build_detector's kinds) or a segmenter (SEGMENTERS)
    num_classes: int  # detection: with the background (label 0)
    image_size: int
    id2label: dict[int, str]
    category_ids: list[int] | None = None  # COCO category id of labels 1..K; None for synthetic data
    out_features: list[str] | None = None  # detection: the FPN levels (None: the detector's defaults)

    @property
    def categories(self) -> list[Category]:
        return [Category(id, self.id2label[label]) for label, id in enumerate(self.category_ids or (), 1)]


def build_task_model(
    spec: TaskSpec, backbone: str | ResNetBackbone, *, trainable_layers: int | None = None
) -> nn.Module:
    """The detector or segmenter ``spec`` describes, on ``backbone`` (a preset, a checkpoint or a model);
    its backbone's config carries the label names."""
    if spec.task == "detection":
        model = build_detector(
            spec.architecture, backbone, num_classes=spec.num_classes, trainable_layers=trainable_layers,
            out_features=spec.out_features, min_size=spec.image_size, max_size=spec.image_size,
        )  # fmt: skip
    else:
        model = _smp_model(spec.architecture, backbone, spec.num_classes)
    trunk = backbone_of(model)
    label2id = {label: index for index, label in spec.id2label.items()}
    trunk.config = trunk.config.with_overrides(num_labels=len(spec.id2label), id2label=spec.id2label, label2id=label2id)
    return model


def backbone_of(model: nn.Module) -> ResNetTrunk:
    return next(module for module in model.modules() if isinstance(module, ResNetTrunk))


def save_task_model(model: nn.Module, directory: Path, spec: TaskSpec) -> None:
    """Write ``directory`` so that :func:`load_task_model` rebuilds ``model`` (each file atomically)."""
    backbone_of(model).save_pretrained(directory)
    atomic_write(directory / TASK_NAME, lambda path: path.write_text(json.dumps(asdict(spec), indent=2)))
    atomic_write(directory / WEIGHTS_NAME, lambda path: torch.save(model.state_dict(), path))


def load_task_model(directory: str | Path) -> tuple[nn.Module, TaskSpec]:
    directory = Path(directory)
    missing = [name for name in (TASK_NAME, WEIGHTS_NAME, "config.json") if not (directory / name).is_file()]
    if missing:
        raise ValueError(
            f"{directory} is not a fine-tuned model directory (such as train's OUTPUT_DIR/model or "
            f"OUTPUT_DIR/best): it lacks {', '.join(missing)}."
        )
    fields = json.loads((directory / TASK_NAME).read_text(encoding="utf-8"))
    spec = TaskSpec(**{**fields, "id2label": {int(key): name for key, name in fields["id2label"].items()}})
    config = ResNetConfig.from_json_file(directory / "config.json")
    model = build_task_model(spec, ResNetBackbone(config) if spec.task == "detection" else describe(config))
    model.load_state_dict(torch.load(directory / WEIGHTS_NAME, map_location="cpu", weights_only=True))
    return model, spec


def _smp_model(kind: str, backbone: str | ResNetBackbone, num_classes: int) -> nn.Module:
    """An smp model whose encoder is this backbone (``tu-rb_<preset>``), with ``backbone``'s weights when it
    is a checkpoint rather than a preset name."""
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise ValueError("--task segmentation needs segmentation_models_pytorch (pip install it).") from None
    from ..adapters import timm as _registers_rb_models  # noqa: F401

    pretrained = ResNetBackbone.load(backbone) if isinstance(backbone, str) and backbone not in PRESETS else None
    preset = backbone if pretrained is None else describe(pretrained.config)
    if preset not in PRESETS:
        raise ValueError(f"--weights holds a {preset}, which is not a preset the tu-rb_ encoders cover.")
    model = getattr(smp, SEGMENTERS[kind])(f"tu-rb_{preset}", encoder_weights=None, classes=num_classes)
    if pretrained is not None:
        load_checkpoint(backbone_of(model), pretrained.state_dict())
    return model
