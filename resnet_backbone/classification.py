"""``ResNetModel`` and ``ResNetForImageClassification``, as transformers defines them.

Same outputs and the same state-dict keys (``resnet.`` prefix, ``classifier.1.*``), so checkpoints move
between the two libraries without renaming.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ResNetConfig
from .outputs import BaseModelOutputWithPoolingAndNoAttention, ImageClassifierOutputWithNoAttention
from .pretrained import ResNetPreTrainedModel
from .trunk import ResNetTrunk


class ResNetModel(ResNetTrunk):
    """All stages, the last hidden state and its global average (``pooler_output``): transformers'
    ``ResNetModel``, with its state-dict keys.

    Args:
        config: the architecture (default: ``ResNetConfig()``, a ResNet-50); it is copied, never mutated.
        overrides: ``ResNetConfig`` fields on top of it.

    Raises:
        ValueError: an unknown field (with a close match) or an invalid value.
    """

    def __init__(self, config: ResNetConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.pooler = nn.AdaptiveAvgPool2d((1, 1))

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        output_hidden_states, return_dict = self._output_options(output_hidden_states, return_dict)
        hidden_states = self.forward_hidden_states(pixel_values, num_stages=self.num_built_stages)
        output = BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=hidden_states[-1],
            pooler_output=self.pooler(hidden_states[-1]),
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )
        return output if return_dict else output.to_tuple()


class ResNetForImageClassification(ResNetPreTrainedModel):
    """``ResNetModel`` (as ``resnet``) and a linear classifier on its pooled output: transformers'
    ``ResNetForImageClassification``, with its state-dict keys (``resnet.*``, ``classifier.1.*``).

    Args:
        config: the architecture and its labels (``num_labels``, ``id2label``; 0 labels: no classifier).
        overrides: ``ResNetConfig`` fields on top of it.

    Raises:
        ValueError: an unknown field (with a close match) or an invalid value.

    Example::

        >>> import torch
        >>> from resnet_backbone import ResNetForImageClassification
        >>> model = ResNetForImageClassification.from_preset("resnet18", depths=[1, 1, 1, 1], num_labels=3)
        >>> output = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 2]))
        >>> tuple(output.logits.shape), output.loss.ndim
        ((2, 3), 0)
    """

    def __init__(self, config: ResNetConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.resnet = ResNetModel(self.config)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(self.config.hidden_sizes[-1], self.num_labels) if self.num_labels > 0 else nn.Identity(),
        )

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutputWithNoAttention | tuple:
        """Logits, and the loss when ``labels`` are given (``problem_type`` as transformers infers it)."""
        if return_dict is None:
            return_dict = self.config.return_dict
        outputs = self.resnet(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = None if labels is None else self.loss(logits, labels)
        output = ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return output if return_dict else output.to_tuple()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """transformers' classification loss: MSE, cross-entropy or BCE by ``problem_type``."""
        labels = labels.to(logits.device)
        problem_type = self.config.problem_type or _infer_problem_type(self.num_labels, labels)
        if problem_type == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze())
            return F.mse_loss(logits, labels)
        if problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1), ignore_index=-100)
        return F.binary_cross_entropy_with_logits(logits, labels)


def _infer_problem_type(num_labels: int, labels: torch.Tensor) -> str:
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"
