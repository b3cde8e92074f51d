"""A fine-tuned detector or segmenter as a directory that ``resnet-backbone evaluate`` rebuilds.

``task.json`` says what to build (task, architecture, classes, label names, COCO category ids),
``task_model.pt`` holds the whole model's weights, and ``config.json`` with ``model.safetensors`` hold the
backbone alone (so ``ResNetBackbone.from_pretrained(directory)`` reads it, with the label names in its
``id2label``). A folder that ``resnet-backbone quantize`` wrote also holds ``int8/``, the int8 programs of
the model's dense parts (see ``quantized_model``), and loads as the int8 model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.torchvision import DETECTORS, build_detector
from ..backbone import ResNetBackbone
from ..config import ResNetConfig
from ..hints import close_match_hint
from ..inference import load_quantized
from ..presets import PRESETS
from ..trunk import ResNetTrunk
from ..weights import LoadReport, load_checkpoint, load_placed
from ..weights.architecture import describe
from ..weights.files import atomic_write
from .data.coco import Category
from .data.masks import IGNORE_INDEX

TASK_NAME = "task.json"
WEIGHTS_NAME = "task_model.pt"
CONFIG_NAME = "config.json"
INT8_DIR = "int8"
SEGMENTERS = {"unet": "Unet", "fpn": "FPN", "deeplabv3plus": "DeepLabV3Plus"}
# The segmenters with an image-pooling branch (each image pooled to 1x1, then BatchNorm), by that branch's
# name: in training, that BatchNorm sees one value per channel at one image per batch, which it cannot
# normalise. A test checks these against the real smp models.
IMAGE_POOLING_SEGMENTERS = {"deeplabv3plus": "ASPP image pooling"}


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
    """The model :func:`save_task_model` wrote to ``directory``, and its spec. Each file is checked against
    the others (an edited ``task.json`` or ``config.json``, weights of another model) and a mismatch is one
    error naming the file and what it expected; nothing is half-loaded. A folder with ``int8/`` gives the int8
    model (compiled, on the CPU), rebuilt from the float weights beside it with no calibration."""
    directory = Path(directory)
    missing = [name for name in (TASK_NAME, WEIGHTS_NAME, CONFIG_NAME) if not (directory / name).is_file()]
    if missing:
        raise ValueError(
            f"{directory} is not a fine-tuned model directory (such as train's OUTPUT_DIR/model or "
            f"OUTPUT_DIR/best): it lacks {', '.join(missing)}."
        )
    spec = read_task_spec(directory / TASK_NAME)
    config = _read_config(directory / CONFIG_NAME)
    backbone = describe(config)
    if spec.task == "segmentation" and backbone not in PRESETS:
        raise ValueError(
            f"{directory / CONFIG_NAME} describes a backbone with {backbone}, which no segmentation encoder "
            f"(tu-rb_<preset>) builds; expected one of the presets {', '.join(PRESETS)}."
        )
    try:
        model = build_task_model(spec, ResNetBackbone(config) if spec.task == "detection" else backbone)
    except ValueError as error:
        raise ValueError(f"{directory}: {TASK_NAME} and {CONFIG_NAME} describe no model that builds: {error}") from None
    _load_weights(model, directory / WEIGHTS_NAME, f"the {spec.architecture} with backbone {backbone}")
    if (directory / INT8_DIR).exists():
        model = load_quantized(model, directory / INT8_DIR, inplace=True)
    return model, spec


def read_task_spec(path: Path) -> TaskSpec:
    """``task.json`` as a :class:`TaskSpec`, every key checked, so an edited or foreign file is one error that
    names the key and what it should hold."""
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}."
        ) from None
    names = [field.name for field in dataclasses.fields(TaskSpec)]
    if not isinstance(fields, dict):
        raise ValueError(f"{path} must hold a JSON object with the keys {', '.join(names)}.")
    for key in fields:
        if key not in names:
            hint = close_match_hint(key, names)
            raise ValueError(f"{path}: unknown key {key!r}; a {TASK_NAME} holds {', '.join(names)}.{hint}")
    required = [field.name for field in dataclasses.fields(TaskSpec) if field.default is dataclasses.MISSING]
    for key in required:
        if key not in fields:
            raise ValueError(f"{path}: the key {key!r} is missing; a {TASK_NAME} holds {', '.join(names)}.")
    problems = _value_problems(fields)
    if problems:
        key, expected = problems[0]
        raise ValueError(f"{path}: {key} is {json.dumps(fields.get(key))[:80]}, expected {expected}.")
    return TaskSpec(**{**fields, "id2label": {int(key): name for key, name in fields["id2label"].items()}})


def _value_problems(fields: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, what it should hold) for each value of a ``task.json`` that no saved model has."""
    architectures = {"detection": DETECTORS, "segmentation": SEGMENTERS}
    task = fields["task"] if isinstance(fields["task"], str) and fields["task"] in architectures else None
    architecture = fields["architecture"]
    checks = {
        "task": (task is not None, " or ".join(map(json.dumps, architectures))),
        "architecture": (
            task is None or (isinstance(architecture, str) and architecture in architectures[task]),
            f"a {task} architecture: {', '.join(architectures.get(task, ()))}",
        ),
        "num_classes": (_is_positive_int(fields["num_classes"]), "a positive integer"),
        "image_size": (_is_positive_int(fields["image_size"]), "a positive integer"),
        "id2label": (
            isinstance(fields["id2label"], dict)
            and all(key.isdigit() and isinstance(name, str) for key, name in fields["id2label"].items()),
            'an object of class index to name, such as {"0": "background", "1": "cat"}',
        ),
        "category_ids": (_is_list_of(fields.get("category_ids"), int), "null or a list of COCO category ids"),
        "out_features": (_is_list_of(fields.get("out_features"), str), "null or a list of stage names"),
    }
    return [(key, expected) for key, (valid, expected) in checks.items() if not valid]


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_list_of(value: Any, kind: type) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(item, kind) for item in value))


def _read_config(path: Path) -> ResNetConfig:
    try:
        return ResNetConfig.from_json_file(path)
    except ValueError as error:
        message = str(error)
        raise ValueError(message if str(path) in message else f"{path}: {message}") from None


def _load_weights(model: nn.Module, path: Path, described: str) -> None:
    """``path``'s state dict into ``model``, all of it or nothing."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: pickle, zip and torch each raise their own
        reason = str(error).partition("\n")[0] or type(error).__name__
        raise ValueError(f"{path} is not a state dict torch.load can read ({reason}).") from None
    if not (isinstance(state_dict, dict) and all(isinstance(value, torch.Tensor) for value in state_dict.values())):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, expected a state dict (names to tensors).")
    report = load_placed(model, state_dict, LoadReport(source_layout=WEIGHTS_NAME), strict=False)
    if not report.is_exact:
        mismatch = str(report).split("\n", 1)[1].replace("\n", "; ")
        raise ValueError(
            f"{path} does not fit {described} that {TASK_NAME} and {CONFIG_NAME} describe ({mismatch}). "
            "Keep the files of one saved model together, unedited."
        )


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


def segmentation_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of a segmenter's logits against a batch of masks, ignored pixels (255) left out."""
    images, masks = batch
    return F.cross_entropy(model(images).float(), masks, ignore_index=IGNORE_INDEX)
