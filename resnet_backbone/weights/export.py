"""State dicts for torchvision's, timm's and detectron2's own models, refusing what those models cannot hold."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ResNetConfig
from ..specs import stage_specs
from .architecture import peer_layout_of
from .files import refuse_optimized_for_inference
from .layouts import from_canonical, strip_known_prefixes

PEER_LIBRARIES = ("torchvision", "timm", "detectron2")


def peer_state_dict(model: nn.Module, library: str) -> dict[str, torch.Tensor]:
    """``model``'s weights under ``library``'s keys; its ResNet (or features model) loads them strictly.

    A backbone or ``ResNetModel`` has no ``fc``: load it into a headless peer (timm ``num_classes=0`` or
    ``features_only``; torchvision ``IntermediateLayerGetter``). Frozen norms gain ``num_batches_tracked``
    so that torchvision's and timm's BatchNorm find every key (detectron2's frozen norms have none).

    Args:
        model: one of this project's models.
        library: ``"torchvision"``, ``"timm"`` or ``"detectron2"``.

    Returns:
        ``{peer key: tensor}``.

    Raises:
        ValueError: an unknown library, an architecture it cannot represent (see :func:`export_problems`), or a
            model that went through ``optimize_for_inference``.
    """
    refuse_optimized_for_inference(model)
    problems = export_problems(model.config, library)
    if problems:
        raise ValueError(f"{library} cannot represent this model: {'; '.join(problems)}.")
    canonical = strip_known_prefixes(model.state_dict())
    if library != "detectron2":  # whose FrozenBatchNorm2d has no num_batches_tracked either
        for key in [k for k in canonical if k.endswith(".running_var")]:
            canonical.setdefault(key.replace("running_var", "num_batches_tracked"), torch.tensor(0))
    naming = "detectron2" if library == "detectron2" else "torchvision"
    return from_canonical(canonical, peer_layout_of(model.config, naming=naming))


def export_problems(config: ResNetConfig, library: str) -> list[str]:
    """Why ``library``'s ResNet cannot hold a model of ``config``.

    Args:
        config: the architecture.
        library: ``"torchvision"`` or ``"timm"``.

    Returns:
        One reason per field the library's ResNet lacks; empty when it can hold the model.

    Raises:
        ValueError: an unknown library.

    Example::

        >>> from resnet_backbone import ResNetConfig
        >>> from resnet_backbone.weights import export_problems
        >>> export_problems(ResNetConfig.from_preset("resnet50d"), "timm")
        []
    """
    if library not in PEER_LIBRARIES:
        raise ValueError(f"library must be one of {PEER_LIBRARIES}, got {library!r}.")
    if library == "detectron2":
        return _detectron2_problems(config)
    problems = []
    if config.downsample_in_bottleneck:
        problems.append("downsample_in_bottleneck=True (ResNet v1) has the stride in the 1x1 conv")
    if config.downsample_in_first_stage:
        problems.append("downsample_in_first_stage=True")
    if config.stem_type == "default" and config.embedding_size != 64:
        problems.append(f"embedding_size={config.embedding_size} (the default stem is 64 wide)")
    if library == "torchvision":
        expansion = 4 if config.layer_type == "bottleneck" else 1
        standard = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
        if config.hidden_sizes != standard:
            problems.append(f"hidden_sizes={config.hidden_sizes} (torchvision's are {standard})")
        if config.num_channels != 3:
            problems.append(f"num_channels={config.num_channels}")
        if config.stem_type != "default" or config.avg_down:
            problems.append("the deep stem and avg_down (ResNet-D; use timm)")
        if config.hidden_act != "relu":
            problems.append(f"hidden_act={config.hidden_act!r}")
        if config.norm_layer == "group":
            problems.append("norm_layer='group'")
    return problems


def _detectron2_problems(config: ResNetConfig) -> list[str]:
    """What detectron2's ``ResNet`` (its ``BasicStem``, ``BasicBlock`` and ``BottleneckBlock`` in stages of any
    depth and width) cannot hold."""
    problems = []
    if config.stem_type != "default" or config.avg_down:
        problems.append("the deep stem and avg_down (ResNet-C/D)")
    if config.hidden_act != "relu":
        problems.append(f"hidden_act={config.hidden_act!r}")
    if config.layer_type == "basic" and any(spec.dilation > 1 for spec in stage_specs(config)):
        problems.append(f"output_stride={config.output_stride} (detectron2's BasicBlock has no dilation)")
    return problems
