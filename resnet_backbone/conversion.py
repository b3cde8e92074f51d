"""Convert a checkpoint between transformers', torchvision's and timm's layouts (or to detectron2's), and prove it.

After writing, both sides run in their own library on the same random input: the source weights in the
source library's model, the written file in the destination library's model (for detectron2, which is not
on the package registry, this project's model reads the written file back through its detectron2 key table).
torchvision, timm and transformers are imported by the functions that build their models, never when this
module loads.

It sits above the models (it builds them) and beside the weights package, which the models use: inside
that package it would make an import cycle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .classification import ResNetForImageClassification, ResNetModel
from .config import ResNetConfig
from .presets import PRESETS
from .weights.architecture import describe
from .weights.export import export_problems
from .weights.files import CONFIG_NAME, WEIGHTS_NAMES, locate_checkpoint, read_state_dict, write_state_dict_file
from .weights.layouts import detect_layout, strip_known_prefixes
from .weights.loading import load_checkpoint
from .weights.sources import timm_checkpoint, torchvision_checkpoint

FORMATS = ("hf", "torchvision", "timm")
TARGET_FORMATS = (*FORMATS, "detectron2")
# What each library names its weights by, besides a file.
NAMED_SOURCES = {
    "torchvision": "a torchvision weights name (e.g. ResNet50_Weights.IMAGENET1K_V2)",
    "timm": "a timm model name (e.g. resnet50.a1_in1k)",
}


@dataclass(frozen=True)
class Conversion:
    """What ``convert_checkpoint`` wrote, and how far the two libraries' outputs are apart.

    Attributes:
        source_format, target_format: one of ``FORMATS`` each (the source's as detected, for ``"auto"``).
        destination: the folder or file written.
        architecture: the architecture's name (see :func:`~resnet_backbone.weights.describe`).
        max_abs_diff: the largest difference between the two libraries' outputs on one random input.
    """

    source_format: str
    target_format: str
    destination: Path
    architecture: str
    max_abs_diff: float


def convert_checkpoint(
    source: str, destination: str | os.PathLike, *, source_format: str = "auto", target_format: str = "hf"
) -> Conversion:
    """Load ``source``, write it in ``target_format`` to ``destination``, and compare both libraries' outputs.

    Args:
        source: a file, a folder, a Hub id, a torchvision weights name or a timm model name.
        destination: a folder for ``"hf"`` (``config.json`` and ``model.safetensors``), a file otherwise.
        source_format: ``"auto"`` (see ``detect_format``) or one of ``FORMATS``.
        target_format: one of ``TARGET_FORMATS``.

    Returns:
        The formats, the destination, the architecture's name and the largest difference between the source
        library's and the target library's outputs on one random input.

    Raises:
        ValueError: an unknown format, a source of the wrong kind for ``source_format``, or an architecture
            the target library cannot represent (nothing is written then).
    """
    if target_format not in TARGET_FORMATS:
        raise ValueError(f"target_format must be one of {TARGET_FORMATS}, got {target_format!r}.")
    source_format = detect_format(source) if source_format == "auto" else source_format
    model = _load(source, source_format)
    destination = Path(destination)
    if target_format == "hf":
        model.save_pretrained(destination)
    else:
        problems = export_problems(model.config, target_format)
        if problems:
            raise ValueError(f"{target_format} cannot represent {describe(model.config)}: {'; '.join(problems)}.")
        write_state_dict_file(destination, getattr(model, f"to_{target_format}_state_dict")())
    torch.manual_seed(0)
    pixel_values = torch.randn(2, model.config.num_channels, 224, 224)
    with torch.no_grad():
        expected = _peer_model(source_format, model, source)(pixel_values)
        actual = _peer_model(target_format, model, destination)(pixel_values)
    return Conversion(
        source_format, target_format, destination, describe(model.config), (expected - actual).abs().max().item()
    )


def check_source_kind(source: str, source_format: str, *, option: str = "source_format") -> None:
    """Refuse a folder for a format whose weights come as a name or a file, before any work.

    Args:
        source: what the user named.
        source_format: the format they gave for it.
        option: how the caller spells the format's option in the message (the command line's is ``--from``).

    Raises:
        ValueError: ``source`` is a folder and ``source_format`` is torchvision or timm.
    """
    if source_format in NAMED_SOURCES and Path(source).is_dir():
        raise ValueError(
            f"{option} {source_format} takes {NAMED_SOURCES[source_format]} or a checkpoint file, got {source}, a "
            f"folder; a folder with {CONFIG_NAME} and {' or '.join(WEIGHTS_NAMES)} is {option} hf (or auto)."
        )


def detect_format(source: str) -> str:
    """Which library ``source`` comes from: by what it is, then by its keys.

    Args:
        source: a folder (``"hf"``), a checkpoint file (by its keys), a torchvision weights name, a timm model
            name, or else a Hub id (``"hf"``).

    Returns:
        One of ``FORMATS``.

    Raises:
        ValueError: a file that is no readable checkpoint, or whose keys are in no known layout.
    """
    path = Path(source)
    if path.is_dir():
        return "hf"
    if path.is_file():
        layout = detect_layout(list(strip_known_prefixes(read_state_dict(path))))
        if layout is None:
            return "hf"
        if layout.naming == "detectron2":
            raise ValueError(
                f"{path} holds detectron2 keys (stem.conv1.*, res2.*): convert reads {', '.join(FORMATS)} checkpoints "
                "and writes detectron2's. Load it with ResNetModel.from_pretrained(path, downsample_in_bottleneck=...) "
                "(True for detectron2's STRIDE_IN_1X1 weights) instead."
            )
        return "torchvision" if layout.stem_type == "default" and not layout.avg_down else "timm"
    if "_Weights." in source:
        return "torchvision"
    import timm

    if timm.is_model(source):
        return "timm"
    return "hf"


def _load(source: str, source_format: str) -> ResNetModel | ResNetForImageClassification:
    if source_format == "hf":
        _, weights = locate_checkpoint(source)
        has_classifier = any(key.endswith("classifier.1.weight") for key in read_state_dict(weights))
        model_class = ResNetForImageClassification if has_classifier else ResNetModel
        return model_class.from_pretrained(source)
    if source_format not in FORMATS:
        raise ValueError(f"source_format must be auto or one of {FORMATS}, got {source_format!r}.")
    check_source_kind(source, source_format)
    checkpoint = (torchvision_checkpoint if source_format == "torchvision" else timm_checkpoint)(source)
    has_classifier = any(key.endswith("fc.weight") for key in checkpoint.state_dict)
    model_class = ResNetForImageClassification if has_classifier else ResNetModel
    return getattr(model_class, f"from_{source_format}")(checkpoint.state_dict, **checkpoint.config_fields)


class _Outputs(nn.Module):
    """Logits, or pooled features for a headless model, whatever the library."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        output = self.model(pixel_values)
        if isinstance(output, torch.Tensor):
            return output.flatten(1)
        return output.logits if hasattr(output, "logits") else output.pooler_output.flatten(1)


def _peer_model(library: str, model: nn.Module, weights: str | Path) -> _Outputs:
    """``library``'s own model of ``model``'s architecture, holding the weights found at ``weights``."""
    config: ResNetConfig = model.config
    has_classifier = isinstance(model, ResNetForImageClassification)
    if library == "hf":
        return _Outputs(_transformers_model(model, weights))
    if library == "detectron2":
        peer = type(model)(config)
        load_checkpoint(peer, read_state_dict(weights), strict=True)
        return _Outputs(peer)
    preset = describe(config)
    if preset not in PRESETS:  # an architecture the peer has no builder for: compare with ourselves
        return _Outputs(model)
    if library == "torchvision":
        import torchvision

        peer = getattr(torchvision.models, preset)(num_classes=config.num_labels if has_classifier else 1000)
        if not has_classifier:
            peer.fc = nn.Identity()
        state_dict = torchvision_checkpoint(str(weights) if Path(weights).exists() else weights).state_dict
    else:
        import timm

        peer = timm.create_model(preset, num_classes=config.num_labels if has_classifier else 0)
        state_dict = timm_checkpoint(str(weights) if Path(weights).exists() else weights).state_dict
    peer.load_state_dict(strip_known_prefixes(state_dict), strict=True)
    return _Outputs(peer)


def _transformers_model(model: nn.Module, weights: str | Path) -> nn.Module:
    """transformers' own model where it can load the checkpoint (it is optional at run time), else ours."""
    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is None or model.config.transformers_incompatibilities() or Path(weights).is_file():
        return type(model).from_pretrained(weights)
    return getattr(transformers, type(model).__name__).from_pretrained(weights)
