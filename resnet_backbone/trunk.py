"""What the backbone and the classification models share: config handling, the stem-and-stages trunk,
weight initialisation, and freezing that survives ``model.train()``."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from typing_extensions import Self

from .blocks import _ResidualLayer
from .config import ResNetConfig
from .hints import close_match_hint
from .layers import NORM_TYPES
from .presets import PRESETS
from .stages import Embeddings, Encoder, StageSpec, stage_specs
from .weights.architecture import infer_config
from .weights.export import peer_state_dict
from .weights.files import locate_checkpoint, read_state_dict, write_checkpoint
from .weights.loading import LoadReport, load_checkpoint
from .weights.sources import Checkpoint, timm_checkpoint, torchvision_checkpoint


class ResNetPreTrainedModel(nn.Module):
    """Base of every model here: owns a validated copy of its config (the caller's is never mutated),
    and reads and writes checkpoints of transformers, torchvision and timm."""

    def __init__(self, config: ResNetConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is not None and not isinstance(config, ResNetConfig):
            raise TypeError(f"config must be a ResNetConfig or None, got {type(config).__name__}.")
        self.config = (config or ResNetConfig()).with_overrides(**overrides)
        self.load_report: LoadReport | None = None

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Self:
        """A randomly initialised model of a named architecture, e.g. ``from_preset("resnet50")``."""
        return cls(ResNetConfig.from_preset(name, **overrides))

    @classmethod
    def load(cls, source: str | os.PathLike, **overrides: Any) -> Self:
        """A preset name (random weights) or anything :meth:`from_pretrained` accepts (with weights)."""
        if isinstance(source, str) and source in PRESETS:
            return cls.from_preset(source, **overrides)
        if isinstance(source, str) and not os.path.exists(source) and "/" not in source:
            raise ValueError(
                f"{source!r} is neither a preset{close_match_hint(source, PRESETS)} nor an existing path or Hub "
                f"repo id. Presets: {', '.join(PRESETS)}."
            )
        return cls.from_pretrained(source, **overrides)

    # ---------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        strict: bool = True,
        **overrides: Any,
    ) -> Self:
        """Load a directory (config.json + weights), a weights file, or a Hugging Face Hub repo id.

        Accepts transformers' ResNetModel / ResNetForImageClassification / ResNetBackbone checkpoints
        (e.g. ``microsoft/resnet-50``) and torchvision / timm state dicts; ``overrides`` (such as
        ``out_features``) apply on top of the stored config. See :func:`load_checkpoint` for ``strict``.
        """
        config_path, weights_path = locate_checkpoint(
            path_or_repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
        )
        state_dict = read_state_dict(weights_path)
        if config_path is None:
            config = infer_config(state_dict, **overrides)
        else:
            config = ResNetConfig.from_json_file(config_path, **overrides)
        return cls._from_checkpoint(config, Checkpoint(state_dict), strict)

    @classmethod
    def from_torchvision(cls, source: Any, *, strict: bool = True, **overrides: Any) -> Self:
        """Load torchvision weights: a model, a state dict, a checkpoint path, or a weights enum or its name
        (``"ResNet50_Weights.IMAGENET1K_V2"``, downloaded through torchvision's own loader and cache)."""
        checkpoint = torchvision_checkpoint(source)
        config = infer_config(checkpoint.state_dict, **{**checkpoint.config_fields, **overrides})
        return cls._from_checkpoint(config, checkpoint, strict)

    @classmethod
    def from_timm(cls, source: Any, *, strict: bool = True, **overrides: Any) -> Self:
        """Load timm weights: a model, a state dict, a checkpoint path, or a timm name with a pretrained tag
        (``"resnet50.a1_in1k"``, downloaded through timm's own pretrained loading)."""
        checkpoint = timm_checkpoint(source)
        config = infer_config(checkpoint.state_dict, **{**checkpoint.config_fields, **overrides})
        return cls._from_checkpoint(config, checkpoint, strict)

    @classmethod
    def _from_checkpoint(cls, config: ResNetConfig, checkpoint: Checkpoint, strict: bool) -> Self:
        model = cls(config)
        model.load_report = load_checkpoint(model, checkpoint.state_dict, strict=strict, norm_eps=checkpoint.norm_eps)
        if model.load_report.dropped_classifier_keys:
            warnings.warn(
                f"Dropped the checkpoint's classifier ({', '.join(model.load_report.dropped_classifier_keys)}): "
                f"{cls.__name__} has no classification head.",
                stacklevel=3,
            )
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (transformers' layout), atomically."""
        config = self.config.with_overrides(architectures=[type(self).__name__])
        return write_checkpoint(directory, config.to_json_string(), self.state_dict())

    def to_torchvision_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under torchvision's keys; torchvision's model loads them with ``strict=True``."""
        return peer_state_dict(self, "torchvision")

    def to_timm_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under timm's keys; timm's model loads them with ``strict=True``."""
        return peer_state_dict(self, "timm")


class ResNetTrunk(ResNetPreTrainedModel):
    """The stem (``embedder``) and the first ``num_stages`` stages (``encoder.stages``)."""

    def _build_trunk(self, num_stages: int) -> None:
        self.grad_checkpointing = False
        self.stage_specs: list[StageSpec] = stage_specs(self.config)
        self.embedder = Embeddings(self.config)
        self.encoder = Encoder(self.config, num_stages)
        self._init_weights()
        self.freeze(self.config.freeze_at)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if self.config.zero_init_residual:
            for module in self.modules():
                if isinstance(module, _ResidualLayer):
                    nn.init.zeros_(module.last_norm().weight)

    def stage_modules(self) -> list[nn.Module]:
        """The built modules of ``stage_names``, in order: the stem, then each built stage."""
        return [self.embedder, *self.encoder.stages]

    def frozen_modules(self) -> list[nn.Module]:
        """The modules of ``stage_names[:freeze_at]`` (those that are built)."""
        return self.stage_modules()[: self.config.freeze_at]

    def freeze(self, freeze_at: int) -> None:
        """Freeze ``stage_names[:freeze_at]`` and unfreeze the rest (``config.freeze_at`` follows)."""
        self.config = self.config.with_overrides(freeze_at=freeze_at)
        for index, module in enumerate(self.stage_modules()):
            module.requires_grad_(index >= freeze_at)
        self.train(self.training)

    def train(self, mode: bool = True) -> ResNetTrunk:
        """Set train mode, except for norms that ``freeze_at`` or ``norm_eval`` keep in eval mode."""
        super().train(mode)
        if mode:
            kept_in_eval = [self] if self.config.norm_eval else self.frozen_modules()
            for module in kept_in_eval:
                for norm in module.modules():
                    if isinstance(norm, NORM_TYPES):
                        norm.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each trainable stage in the backward pass instead of storing its activations
        (non-reentrant ``torch.utils.checkpoint``; timm's name). Frozen stages and eval mode skip it."""
        self.grad_checkpointing = enable

    def _output_options(self, output_hidden_states: bool | None, return_dict: bool | None) -> tuple[bool, bool]:
        """Per-call options, defaulting to the config's (transformers' convention)."""
        return (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states,
            self.config.return_dict if return_dict is None else return_dict,
        )

    def forward_hidden_states(self, pixel_values: torch.Tensor, num_stages: int) -> list[torch.Tensor]:
        """The stem output, then the output of each of the first ``num_stages`` stages."""
        if not torch.jit.is_scripting():
            check_pixel_values(pixel_values, self.config.num_channels)
        hidden_state, hidden_states = pixel_values, []
        for index, stage in enumerate(self.stage_modules()[: num_stages + 1]):
            hidden_state = self.forward_stage(index, stage, hidden_state)
            hidden_states.append(hidden_state)
        return hidden_states

    def forward_stage(self, index: int, stage: nn.Module, hidden_state: torch.Tensor) -> torch.Tensor:
        """Run ``stage`` (``stage_names[index]`` or a part of it, such as the stem before its max-pool),
        recomputed in the backward pass under gradient checkpointing unless it is frozen."""
        checkpointed = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointed and index >= self.config.freeze_at and not torch.jit.is_scripting():
            return _checkpointed(stage, hidden_state)
        return stage(hidden_state)


def _checkpointed(stage: nn.Module, hidden_state: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        # Compiled graphs are functional: their recomputation never touches the running statistics.
        return checkpoint(stage, hidden_state, use_reentrant=False)
    contexts = partial(_checkpoint_contexts, stage)
    return checkpoint(stage, hidden_state, use_reentrant=False, context_fn=contexts)


def _checkpoint_contexts(stage: nn.Module) -> tuple[AbstractContextManager, AbstractContextManager]:
    return nullcontext(), _running_stats_restored(stage)


@contextmanager
def _running_stats_restored(module: nn.Module) -> Iterator[None]:
    """Undo the running-statistics update of a checkpointed stage's recomputation, so BatchNorm sees each
    batch once, as without checkpointing."""
    buffers = [b for n in module.modules() if isinstance(n, NORM_TYPES) for b in n.buffers()]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:  # recomputation may stop early, by raising
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


def check_pixel_values(pixel_values: Any, num_channels: int) -> None:
    """Reject input that is not a (batch, channels, height, width) float tensor, saying how to fix it."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}.")
    shape = tuple(pixel_values.shape)
    if pixel_values.ndim != 4:
        hint = " For a single image, add the batch dimension with pixel_values[None]." if pixel_values.ndim == 3 else ""
        raise ValueError(
            f"pixel_values must be 4-D (batch, {num_channels}, height, width), got {pixel_values.ndim}-D shape "
            f"{shape}.{hint}"
        )
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values must be a floating point tensor, got dtype {pixel_values.dtype}. Convert and normalise "
            "it first, e.g. pixel_values.float() / 255 followed by the mean/std normalisation of the weights."
        )
    if shape[1] != num_channels:
        hint = (
            f" It looks channels-last (batch, height, width, {num_channels}): use pixel_values.permute(0, 3, 1, 2)."
            if shape[3] == num_channels
            else ""
        )
        raise ValueError(
            f"pixel_values must have {num_channels} channels in dimension 1 (batch, {num_channels}, height, width), "
            f"got shape {shape}.{hint}"
        )
