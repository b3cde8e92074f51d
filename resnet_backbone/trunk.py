"""The network the backbone and the classification models share: the stem-and-stages trunk with its one stage
loop and input check, weight initialisation, freezing that survives ``model.train()`` and gradient
checkpointing (:class:`ResNetTrunk`). Config handling and checkpoints are :class:`ResNetPreTrainedModel`'s."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from typing_extensions import Self

from .blocks import _ResidualLayer
from .config import ResNetConfig
from .layers import NORM_TYPES
from .pretrained import ResNetPreTrainedModel
from .specs import StageSpec, stage_specs, stem_conv_spec
from .stages import Embeddings, Encoder

# The input dtypes that torch.autocast casts to its own (it leaves float64 as it is).
AUTOCAST_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class StageOutput(NamedTuple):
    """One feature point of the trunk's forward: its name, stride and channels (from the stage specs) and
    the tensor computed there."""

    name: str
    stride: int
    channels: int
    hidden_state: torch.Tensor


class ResNetTrunk(ResNetPreTrainedModel):
    """The stem (``embedder``) and the first stages (``encoder.stages``), built in one pass from the config.

    Subclasses say how many stages they need (:meth:`num_stages_to_build`); the trunk owns the one stage loop
    (:meth:`iter_stages`), freezing, and gradient checkpointing, so every model and adapter shares them.
    """

    # TorchScript compiles only what scripted callers use (scripted_hidden_states); metadata stays Python.
    __jit_unused_properties__ = ["feature_specs", "num_built_stages", "size_divisibility", "stage_names"]

    def __init__(self, config: ResNetConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.grad_checkpointing = False
        self.stage_specs: list[StageSpec] = stage_specs(self.config)
        self.embedder = Embeddings(self.config)
        self.encoder = Encoder(self.config, self.num_stages_to_build(self.config))
        self._init_weights()
        self.freeze(self.config.freeze_at)

    @staticmethod
    def num_stages_to_build(config: ResNetConfig) -> int:
        """How many stages to build: all of them, unless a subclass needs fewer."""
        return len(config.depths)

    @property
    def size_divisibility(self) -> int:
        """The stride of the deepest stage the forward computes (detectron2's name): inputs divisible by it
        keep every feature map an exact fraction of the input."""
        return self.stage_specs[self.num_stages_to_build(self.config)].stride

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

    def train(self, mode: bool = True) -> Self:
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

    # ---------------------------------------------------------------- metadata

    @property
    def feature_specs(self) -> list[StageSpec]:
        """Every point :meth:`iter_stages` can yield, built or not: the stem before its max-pool, then
        ``stage_names``."""
        return [stem_conv_spec(self.config), *self.stage_specs]

    @property
    def num_built_stages(self) -> int:
        """The deepest ``stage_names`` index this trunk computes (0: the stem alone)."""
        return len(self.encoder.stages)

    # ---------------------------------------------------------------- forward

    def iter_stages(
        self, pixel_values: torch.Tensor, *, last_index: int | None = None, stem_conv: bool = False
    ) -> Iterator[StageOutput]:
        """The one stage loop: the input check, then each point of ``stage_names[:last_index + 1]`` in order
        (default: every built stage), preceded by the stem before its max-pool when ``stem_conv``.

        Each stage is recomputed in the backward pass under gradient checkpointing unless it is frozen.
        """
        check_pixel_values(pixel_values, self.config.num_channels, weights_dtype=next(self.embedder.parameters()).dtype)
        last_index = self.num_built_stages if last_index is None else last_index
        if last_index > self.num_built_stages:
            raise ValueError(
                f"{self.stage_names[last_index]!r} is not built: this trunk stops at "
                f"{self.stage_names[self.num_built_stages]!r}."
            )
        hidden_state = pixel_values
        stem, *stages = self.stage_modules()[: last_index + 1]
        if stem_conv:
            hidden_state = self._run(0, stem.embedder, hidden_state)
            yield _output(stem_conv_spec(self.config), hidden_state)
            hidden_state = stem.pooler(hidden_state)
        else:
            hidden_state = self._run(0, stem, hidden_state)
        yield _output(self.stage_specs[0], hidden_state)
        for index, stage in enumerate(stages, start=1):
            hidden_state = self._run(index, stage, hidden_state)
            yield _output(self.stage_specs[index], hidden_state)

    def forward_hidden_states(self, pixel_values: torch.Tensor, num_stages: int) -> list[torch.Tensor]:
        """The stem output, then the output of each of the first ``num_stages`` stages."""
        return [output.hidden_state for output in self.iter_stages(pixel_values, last_index=num_stages)]

    def scripted_hidden_states(self, pixel_values: torch.Tensor, num_stages: int) -> list[torch.Tensor]:
        """:meth:`forward_hidden_states` in the subset of Python that TorchScript compiles (no generator, no
        input check, no checkpointing): only TorchScript-scripted callers use it, and a test keeps it equal."""
        hidden_state = self.embedder(pixel_values)
        hidden_states = [hidden_state]
        for index, stage in enumerate(self.encoder.stages):
            if index < num_stages:
                hidden_state = stage(hidden_state)
                hidden_states.append(hidden_state)
        return hidden_states

    def _run(self, index: int, stage: nn.Module, hidden_state: torch.Tensor) -> torch.Tensor:
        checkpointed = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointed and index >= self.config.freeze_at:
            return _checkpointed(stage, hidden_state)
        return stage(hidden_state)

    def _output_options(self, output_hidden_states: bool | None, return_dict: bool | None) -> tuple[bool, bool]:
        """Per-call options, defaulting to the config's (transformers' convention)."""
        return (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states,
            self.config.return_dict if return_dict is None else return_dict,
        )

    @property
    def stage_names(self) -> list[str]:
        return self.config.stage_names


def _output(spec: StageSpec, hidden_state: torch.Tensor) -> StageOutput:
    return StageOutput(spec.name, spec.stride, spec.channels, hidden_state)


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


def check_pixel_values(pixel_values: Any, num_channels: int, *, weights_dtype: torch.dtype | None = None) -> None:
    """Reject input that is not a (batch, channels, height, width) float tensor, saying how to fix it.

    Args:
        pixel_values: the model's input.
        num_channels: the channels the model expects (``config.num_channels``).
        weights_dtype: the dtype of the model's weights, which the input must have (convolutions take one
            dtype), except that under ``torch.autocast`` any dtype it casts will do; ``None``: any float dtype.
    """
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
    if weights_dtype is not None:
        _check_dtype(pixel_values, weights_dtype)
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


def _check_dtype(pixel_values: torch.Tensor, weights_dtype: torch.dtype) -> None:
    if pixel_values.dtype == weights_dtype:
        return
    device_type = pixel_values.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    if autocast and pixel_values.dtype in AUTOCAST_INPUT_DTYPES:
        return
    raise TypeError(
        f"pixel_values must have the dtype of the model's weights, {weights_dtype}"
        f"{' (or, under the enabled torch.autocast, float32, bfloat16 or float16)' if autocast else ''}, got "
        f"{pixel_values.dtype}. Cast it with pixel_values.to({weights_dtype})."
    )
