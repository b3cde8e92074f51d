"""Turn what a user holds (a peer model, a state dict, a file, a URL, a weights enum, a timm name) into tensors.

Downloads go through the peer library's own loader and cache (torchvision: ``TORCH_HOME``; timm: the
Hugging Face Hub cache), so their progress bars, hash checks and offline settings apply.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .files import local_weights_file, read_state_dict
from .layouts import extract_state_dict
from .loading import norm_eps_of
from .resolve import resolve_source


@dataclass
class Checkpoint:
    """Tensors to load, plus what a source knows beyond them (norm epsilons, label names)."""

    state_dict: dict[str, torch.Tensor]
    norm_eps: dict[str, float] | None = None
    config_fields: dict[str, Any] = field(default_factory=dict)


def torchvision_checkpoint(source: Any) -> Checkpoint:
    """A torchvision ResNet model, a state dict, a checkpoint file or URL, or a weights enum (or its name)."""
    if isinstance(source, (str, os.PathLike)):
        resolved = resolve_source(source, names="torchvision")
        if resolved.kind != "torchvision_weights":
            return Checkpoint(read_state_dict(local_weights_file(resolved)))
        import torchvision  # only a weights name needs it

        source = torchvision.models.get_weight(resolved.value)
    # A weights enum can only exist once torchvision is imported.
    torchvision_models = sys.modules.get("torchvision.models")
    if torchvision_models is not None and isinstance(source, torchvision_models.WeightsEnum):
        state_dict = source.get_state_dict(progress=True, check_hash=True)
        categories = source.meta.get("categories")
        return Checkpoint(state_dict, config_fields=dict(id2label=dict(enumerate(categories))) if categories else {})
    return _generic_checkpoint(source, "a torchvision model, state dict, checkpoint path or weights enum")


def timm_checkpoint(source: Any) -> Checkpoint:
    """A timm ResNet model, a state dict, a checkpoint file or URL, or a timm name (``"resnet50.a1_in1k"``)."""
    if isinstance(source, (str, os.PathLike)):
        resolved = resolve_source(source, names="timm")
        if resolved.kind != "timm_name":
            return Checkpoint(read_state_dict(local_weights_file(resolved)))
        import timm  # only a model name needs it

        if not timm.is_model(resolved.value):
            raise ValueError(
                f"{resolved.value!r} is neither an existing file nor a timm model name (e.g. 'resnet50.a1_in1k'); "
                f"timm's ResNets: {', '.join(timm.list_models('resnet*')[:12])}, ..."
            )
        source = timm.create_model(resolved.value, pretrained=True)
    return _generic_checkpoint(source, "a timm model, state dict, checkpoint path or timm model name")


def _generic_checkpoint(source: Any, expected: str) -> Checkpoint:
    if isinstance(source, nn.Module):
        return Checkpoint(source.state_dict(), norm_eps=norm_eps_of(source))
    if isinstance(source, Mapping):
        return Checkpoint(extract_state_dict(source, source="The state dict"))
    raise TypeError(f"Expected {expected}, got {type(source).__name__}.")
