"""Named model outputs, as transformers defines them, registered with torch's pytree.

Registration lets ``torch.export`` and ``torch.compile`` return them. Like transformers'
``ModelOutput``, they also index by position (over the fields that are not ``None``) or by name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass
class ModelOutput:
    def to_tuple(self) -> tuple[Any, ...]:
        """The fields that are not ``None``, in order (transformers' ``return_dict=False`` layout)."""
        return tuple(value for value in (getattr(self, f.name) for f in fields(self)) if value is not None)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


@dataclass
class BackboneOutput(ModelOutput):
    """What a backbone returns (transformers' ``BackboneOutput``).

    Attributes:
        feature_maps: one tensor per ``out_features`` entry, in that order.
        hidden_states: when asked, the stem's output, then each computed stage's.
        attentions: always ``None`` (a ResNet has none); transformers' models read the field.
    """

    feature_maps: tuple[torch.Tensor, ...]
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: None = None


@dataclass
class BaseModelOutputWithPoolingAndNoAttention(ModelOutput):
    """What ``ResNetModel`` returns (transformers' class of that name).

    Attributes:
        last_hidden_state: the last stage's feature map.
        pooler_output: its global average, of shape (batch, channels, 1, 1).
        hidden_states: when asked, the stem's output, then each stage's.
    """

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class ImageClassifierOutputWithNoAttention(ModelOutput):
    """What ``ResNetForImageClassification`` returns (transformers' class of that name).

    Attributes:
        loss: the loss, when labels were given.
        logits: one score per label, of shape (batch, num_labels).
        hidden_states: when asked, the stem's output, then each stage's.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


for _output_class in (BackboneOutput, BaseModelOutputWithPoolingAndNoAttention, ImageClassifierOutputWithNoAttention):
    torch.export.register_dataclass(_output_class, serialized_type_name=f"resnet_backbone.{_output_class.__name__}")
