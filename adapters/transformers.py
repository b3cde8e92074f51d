"""transformers adapter: this backbone inside transformers' detection, segmentation and depth models.

Importing this module registers ``TransformersResNetConfig`` with ``AutoConfig`` and
``TransformersResNetBackbone`` with ``AutoBackbone`` under ``model_type="resnet_backbone"``, so every model
that builds its backbone with ``load_backbone(config)`` (DETR, Mask2Former, UperNet, DPT, ...) accepts
``backbone_config=backbone_config("resnext50_32x4d", out_features=[...])``. It also imports the timm adapter,
so transformers' timm route (``TimmBackboneConfig(backbone="rb_resnet50")``) finds the ``rb_*`` models.

The backbone's parameters are named exactly as in transformers' ``ResNetBackbone`` (``embedder.embedder...``,
``encoder.stages.N.layers.M...``): a model built on either loads the other's checkpoint strictly, and
transformers' name-based steps (DETR's stage freezing) treat both alike.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn
from transformers import AutoBackbone, AutoConfig, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.backbone_utils import BackboneConfigMixin, BackboneMixin
from transformers.modeling_outputs import BackboneOutput
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from resnet_backbone import FrozenBatchNorm2d, ResNetBackbone, ResNetConfig, optimize_for_inference
from resnet_backbone.adapter_api import NORM_TYPES, align_out_features
from resnet_backbone.weights import resolve_source

from . import timm as _timm_adapter  # noqa: F401  (registers the rb_* models for transformers' timm route)

__all__ = [
    "MODEL_TYPE",
    "TransformersResNetBackbone",
    "TransformersResNetConfig",
    "backbone_config",
    "find_backbone",
    "optimize_backbone_for_inference",
]

MODEL_TYPE = "resnet_backbone"


def _fields_transformers_lacks() -> list[tuple[str, Any, Any]]:
    """The ``ResNetConfig`` fields that transformers' configs do not already have (the architecture; its
    ``id2label``, ``out_features`` and the other generic ones come from ``PreTrainedConfig`` and
    ``BackboneConfigMixin``), with their types and defaults: read from ``ResNetConfig`` itself, so a field
    added there is a field here too."""
    return [
        (field.name, field.type, dataclasses.field(default=field.default, default_factory=field.default_factory))
        for field in dataclasses.fields(ResNetConfig)
        if not any(hasattr(base, field.name) for base in (PreTrainedConfig, BackboneConfigMixin))
    ]


# A base whose dataclass fields TransformersResNetConfig inherits (PreTrainedConfig makes every subclass a
# dataclass, which collects the fields of its dataclass bases).
_ResNetConfigFields = dataclasses.make_dataclass("_ResNetConfigFields", _fields_transformers_lacks(), kw_only=True)


class TransformersResNetConfig(BackboneConfigMixin, PreTrainedConfig, _ResNetConfigFields):
    """``ResNetConfig`` as a transformers backbone config: the same fields, plus ``pretrained_weights``.

    ``pretrained_weights`` is where the backbone's weights come from (anything ``ResNetBackbone.from_pretrained``
    accepts): they are loaded whenever the backbone is built from this config, because transformers ignores
    ``use_pretrained_backbone``. A model restored by transformers' ``from_pretrained`` takes its own checkpoint's
    weights instead (it builds on the meta device, where nothing is loaded). Build it with
    :func:`backbone_config`, which checks the weights first.

    Args:
        pretrained_weights: where the weights come from (default: none, random weights).
        kwargs: every ``ResNetConfig`` field and transformers' generic config arguments.

    Raises:
        ValueError: an invalid field, with ``ResNetConfig``'s message.
    """

    model_type = MODEL_TYPE

    pretrained_weights: str | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        self.hidden_sizes, self.depths = list(self.hidden_sizes), list(self.depths)
        self.stage_names = ["stem"] + [f"stage{index}" for index in range(1, len(self.depths) + 1)]
        # Our resolution first: its errors list the valid stage names and suggest a close match.
        out_features, out_indices = align_out_features(
            self.stage_names, kwargs.pop("out_features", None), kwargs.pop("out_indices", None)
        )
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        super().__post_init__(**kwargs)
        self.to_resnet_config()  # validates every field, with ResNetConfig's errors

    @classmethod
    def from_resnet_config(
        cls, config: ResNetConfig, *, pretrained_weights: str | None = None
    ) -> TransformersResNetConfig:
        """The transformers config of the same network.

        Args:
            config: this project's config.
            pretrained_weights: as the class's.

        Returns:
            The config.
        """
        fields = config.to_dict()
        for name in ("model_type", "stage_names", "num_labels"):
            fields.pop(name, None)
        return cls(**fields, pretrained_weights=pretrained_weights)

    def to_resnet_config(self) -> ResNetConfig:
        """The same network as this project's config (``pretrained_weights`` is not part of it)."""
        return ResNetConfig(**{field.name: getattr(self, field.name) for field in dataclasses.fields(ResNetConfig)})


class TransformersResNetBackbone(BackboneMixin, PreTrainedModel):
    """This project's ``ResNetBackbone`` with transformers' backbone API, for ``AutoBackbone``.

    It holds the trunk's ``embedder`` and ``encoder`` directly, so its state-dict keys are transformers'
    ``ResNetBackbone`` keys. Like transformers' backbone it builds every stage (the keys stay identical
    whatever ``out_features`` selects). The trunk itself is kept outside the module tree, to run the stages
    and keep its freezing and ``norm_eval`` through ``train()``.

    Args:
        config: the backbone config; its ``pretrained_weights`` are loaded unless transformers builds the
            model on the meta device to fill it from its own checkpoint.

    Raises:
        ValueError: ``pretrained_weights`` cannot be loaded into this architecture.
    """

    config: TransformersResNetConfig
    config_class = TransformersResNetConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    has_attentions = False

    def __init__(self, config: TransformersResNetConfig) -> None:
        super().__init__(config)
        trunk = _build_trunk(config)
        self.embedder = trunk.embedder
        self.encoder = trunk.encoder
        self.__dict__["_trunk"] = trunk  # outside the module tree: shares the modules above, adds no keys
        self.num_features = [spec.channels for spec in trunk.stage_specs]
        if not _building_on_meta_device():
            # The trunk initialised (or loaded) them; transformers' init must not overwrite that.
            for module in self.modules():
                module._is_hf_initialized = True
        self.post_init()

    @property
    def trunk(self) -> ResNetBackbone:
        """The ``ResNetBackbone`` that runs the stages (for ``optimize_for_inference`` and friends)."""
        return self.__dict__["_trunk"]

    def _init_weights(self, module: nn.Module) -> None:
        """What the trunk's constructor does, for the modules transformers asks to (re)initialise. Norms that
        a parent model swapped in (DETR's frozen copies) keep the values copied from ours."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, NORM_TYPES):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)

    def train(self, mode: bool = True) -> TransformersResNetBackbone:
        super().train(mode)
        self.trunk.train(mode)  # norms of frozen stages (and all, with norm_eval) stay in eval mode
        return self

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BackboneOutput | tuple:
        """Feature maps of ``out_features``; ``hidden_states``: the stem, then every stage. A ResNet has no
        attentions, so ``output_attentions`` changes nothing."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        hidden_states = self.trunk(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        feature_maps = tuple(hidden_states[index] for index in self.out_indices)
        output = BackboneOutput(
            feature_maps=feature_maps, hidden_states=hidden_states if output_hidden_states else None
        )
        return output if return_dict else output.to_tuple()


def _build_trunk(config: TransformersResNetConfig) -> ResNetBackbone:
    """Every stage, with the weights of ``config.pretrained_weights`` unless transformers builds an empty
    model to fill from its own checkpoint."""
    resnet_config = config.to_resnet_config().with_overrides(out_indices=[-1])
    if config.pretrained_weights is None or _building_on_meta_device():
        return ResNetBackbone(resnet_config)
    fields = {name: value for name, value in vars(resnet_config).items() if not name.startswith("_")}
    return ResNetBackbone.from_pretrained(config.pretrained_weights, **fields)


def _building_on_meta_device() -> bool:
    return torch.empty(()).device.type == "meta"


def backbone_config(
    preset_or_config_or_path: str | os.PathLike | ResNetConfig, **overrides: Any
) -> TransformersResNetConfig:
    """The ``backbone_config`` for any transformers model that calls ``load_backbone``.

    A preset name or a ``ResNetConfig`` gives random weights; anything else is loaded with
    ``ResNetBackbone.from_pretrained`` (a directory, a weights file, a Hub repo id or a URL, of this project,
    transformers, torchvision or timm), here to check it, and again with the model, whose backbone then holds
    these weights.

    Args:
        preset_or_config_or_path: a preset name, a ``ResNetConfig``, or anything ``from_pretrained`` accepts.
        overrides: ``ResNetConfig`` fields, e.g. ``out_features``, ``output_stride``.

    Returns:
        The :class:`TransformersResNetConfig`, with ``pretrained_weights`` set for a checkpoint.

    Raises:
        ValueError: an unknown source (with a close preset name) or field, or weights that do not fit.

    Example::

        >>> from transformers import UperNetConfig, UperNetForSemanticSegmentation
        >>> from resnet_backbone.adapters.transformers import backbone_config
        >>> config = backbone_config("resnet18", depths=[1, 1, 1, 1], out_indices=[1, 2, 3, 4])
        >>> model = UperNetForSemanticSegmentation(
        ...     UperNetConfig(backbone_config=config, hidden_size=32, auxiliary_channels=16, num_labels=3)
        ... )
        >>> type(model.backbone).__name__
        'TransformersResNetBackbone'
    """
    if isinstance(preset_or_config_or_path, ResNetConfig):
        return TransformersResNetConfig.from_resnet_config(preset_or_config_or_path.with_overrides(**overrides))
    source = resolve_source(preset_or_config_or_path)
    if source.kind == "preset":
        return TransformersResNetConfig.from_resnet_config(ResNetConfig.from_preset(source.value, **overrides))
    loaded = ResNetBackbone.from_pretrained(source, **overrides)
    return TransformersResNetConfig.from_resnet_config(loaded.config, pretrained_weights=source.value)


def find_backbone(model: nn.Module) -> TransformersResNetBackbone:
    """The backbone inside a transformers model built on ``backbone_config``, wherever the model keeps it
    (DETR at ``model.model.backbone.model``, UperNet at ``model.backbone``, ...).

    Args:
        model: the transformers model.

    Returns:
        Its one :class:`TransformersResNetBackbone`.

    Raises:
        ValueError: the model holds none, or more than one.
    """
    backbones = [module for module in model.modules() if isinstance(module, TransformersResNetBackbone)]
    if len(backbones) != 1:
        raise ValueError(
            f"Expected one TransformersResNetBackbone inside {type(model).__name__}, found {len(backbones)}. "
            "Build the model with backbone_config=resnet_backbone.adapters.transformers.backbone_config(...)."
        )
    return backbones[0]


def optimize_backbone_for_inference(model: nn.Module, **options: Any) -> TransformersResNetBackbone:
    """Apply ``optimize_for_inference`` (BatchNorm folding, channels_last, ``compile``; see its options) in
    place to the backbone of a transformers model, which keeps running in its own format: keep ``dtype`` at
    float32 unless the whole model runs in that dtype. Its state dict is no longer a checkpoint (folded norms),
    so save before optimising.

    Args:
        model: a transformers model built on ``backbone_config``.
        options: ``optimize_for_inference``'s keyword arguments (``dtype``, ``channels_last``, ``compile``).

    Returns:
        The backbone, optimised and in eval mode.

    Raises:
        ValueError: the model holds no such backbone, or an option is invalid.
    """
    backbone = find_backbone(model)
    _adopt_frozen_norms(backbone)
    optimize_for_inference(backbone.trunk, inplace=True, **options)
    backbone.eval()
    return backbone


def _adopt_frozen_norms(backbone: nn.Module) -> None:
    """Replace the frozen BatchNorm copies that DETR-style models swap in (``DetrFrozenBatchNorm2d`` and its
    twins: same buffers, eps 1e-5) by this project's ``FrozenBatchNorm2d``, which the fast path folds."""
    for parent in list(backbone.modules()):
        for name, child in parent.named_children():
            foreign = type(child).__name__.endswith("FrozenBatchNorm2d") and not isinstance(child, FrozenBatchNorm2d)
            if foreign and hasattr(child, "running_var"):
                norm = FrozenBatchNorm2d(child.running_var.numel(), eps=1e-5).to(child.running_var.device)
                norm.load_state_dict(child.state_dict())
                setattr(parent, name, norm)


def _register() -> None:
    """Register with transformers once. A second import (a reload, or this file under another module name)
    registers nothing and warns nothing: it adopts the registered classes, so its configs still build."""
    if MODEL_TYPE in CONFIG_MAPPING:
        config_class = CONFIG_MAPPING[MODEL_TYPE]
        globals().update(
            TransformersResNetConfig=config_class, TransformersResNetBackbone=AutoBackbone._model_mapping[config_class]
        )
    else:
        AutoConfig.register(MODEL_TYPE, TransformersResNetConfig)
        AutoBackbone.register(TransformersResNetConfig, TransformersResNetBackbone)


_register()
