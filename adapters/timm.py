"""timm adapter: every preset as a timm model named ``rb_<preset>``, registered when this module is imported.

timm's own machinery does the work: ``build_model_with_cfg`` (pretrained loading, ``in_chans`` adaptation of
the first conv, ``features_only`` through ``forward_intermediates``), ``create_classifier`` and
``feature_take_indices``. So everything that reaches backbones through timm's registry works, e.g.
segmentation_models_pytorch's ``"tu-rb_resnet50"`` encoders.

The model is this project's trunk with timm's head: its state-dict keys are this project's own
(``embedder.*``, ``encoder.*``, ``classifier.1.*``), so checkpoints move to and from ``ResNetBackbone`` and
``ResNetForImageClassification`` without renaming.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_classifier, get_device_dtype
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from torch import nn

from resnet_backbone import PRESETS, ResNetConfig, register_dense_parts
from resnet_backbone.adapter_api import ResNetTrunk
from resnet_backbone.weights import describe, infer_config, same_architecture, to_canonical

__all__ = ["MODEL_NAMES", "TimmResNet"]

MODEL_NAMES = [f"rb_{preset}" for preset in PRESETS]


class TimmResNet(ResNetTrunk):
    """The stem and all stages, with timm's pooling-dropout-linear head and timm's model API.

    ``feature_info`` lists the stem's activation before the max-pool (reduction 2, as timm's ResNets) and
    then each stage, with channels and reductions from the stage specs.

    Example::

        >>> import timm
        >>> import resnet_backbone.adapters.timm  # registers the rb_ models
        >>> features = timm.create_model("rb_resnet18", depths=[1, 1, 1, 1], features_only=True, out_indices=(1, 4))
        >>> features.feature_info.channels(), features.feature_info.reduction()
        ([64, 512], [4, 32])
    """

    def __init__(
        self,
        config: ResNetConfig,
        *,
        num_classes: int | None = None,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        """Build through timm (``timm.create_model("rb_<preset>", ...)``) rather than directly: timm's builder
        adds pretrained loading, ``in_chans`` adaptation and ``features_only``.

        Args:
            config: the architecture.
            num_classes: the head's classes (0: none); default ``config.num_labels``, so the inherited
                ``from_pretrained`` and ``from_timm`` build the checkpoint's head.
            global_pool: timm's pooling type (``"avg"``, ``"max"``, ``"avgmax"``, ``""`` for none).
            drop_rate: dropout before the classifier.
        """
        super().__init__(config)
        # timm's features: the stem before its max-pool (as timm's ResNets), then each stage.
        module_names = ["embedder.embedder", *(f"encoder.stages.{index}" for index in range(self.num_built_stages))]
        self.feature_info = [
            dict(num_chs=spec.channels, reduction=spec.stride, module=module)
            for spec, module in zip([self.feature_specs[0], *self.stage_specs[1:]], module_names)
        ]
        self.num_features = self.stage_specs[-1].channels
        self.drop_rate = drop_rate
        self.reset_classifier(self.config.num_labels if num_classes is None else num_classes, global_pool)

    @property
    def in_chans(self) -> int:
        return self.config.num_channels

    @property
    def num_classes(self) -> int:
        return self.config.num_labels

    def get_classifier(self) -> nn.Module:
        return self.classifier[1]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new, freshly initialised head of ``num_classes`` (0: none); ``global_pool=None`` keeps the pooling."""
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        self.config.num_labels = num_classes
        self.global_pool, dropout, linear = create_classifier(
            self.num_features, num_classes, pool_type=pool_type, drop_rate=self.drop_rate, **get_device_dtype(self)
        )
        # classifier.1 is the linear layer's key in transformers' and this project's checkpoints.
        self.classifier = nn.Sequential(dropout, linear).train(self.training)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_hidden_states(x, num_stages=self.num_built_stages)[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        dropout, linear = self.classifier
        x = dropout(self.global_pool(x))
        return x if pre_logits else linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The ``feature_info`` features at ``indices`` (None: all; an int n: the last n; negatives count from
        the end), and unless ``intermediates_only`` the last feature map computed. A ResNet has no final
        norm, so ``norm`` changes nothing."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' (a ResNet's feature maps), got {output_fmt!r}.")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        # Feature i is the stem before its pool (i = 0) or stage i; the stem after its pool is not a feature.
        last_index = max_index if stop_early else self.num_built_stages
        outputs = list(self.iter_stages(x, last_index=last_index, stem_conv=True))
        features = [output.hidden_state for output in outputs if output.name != "stem"]
        intermediates = [features[index] for index in take_indices]
        x = outputs[-1].hidden_state
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] | tuple[int, ...] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages past the deepest of ``indices`` (and the head): what ``features_only`` keeps."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        del self.encoder.stages[max_index:]
        pruned_end = max_index < len(self.feature_info) - 1
        if pruned_end:
            self.num_features = self.feature_info[max_index]["num_chs"]
        if prune_head or pruned_end:
            self.reset_classifier(0, "")
        return take_indices


def _build(
    preset: str,
    *,
    in_chans: int = 3,
    output_stride: int | None = None,
    num_classes: int = 1000,
    global_pool: str = "avg",
    drop_rate: float = 0.0,
    **config_overrides: Any,
) -> TimmResNet:
    """timm's model arguments mapped onto the preset's config; any other ``ResNetConfig`` field passes through."""
    config = ResNetConfig.from_preset(preset).with_overrides(
        num_channels=in_chans, output_stride=output_stride, **config_overrides
    )
    return TimmResNet(config, num_classes=num_classes, global_pool=global_pool, drop_rate=drop_rate)


def _canonical_checkpoint(state_dict: dict[str, torch.Tensor], model: TimmResNet) -> dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: any layout the weights package reads, under this model's keys.

    timm loads ``features_only`` models non-strictly, so a checkpoint of another architecture is refused
    here rather than leaving some stages randomly initialised. The input channels may differ: timm adapts
    the first conv afterwards.
    """
    found = infer_config(state_dict)
    if not same_architecture(found.with_overrides(num_channels=model.in_chans), model.config):
        raise ValueError(
            f"The checkpoint holds a {describe(found)}, but {model.pretrained_cfg['architecture']} is a "
            f"{describe(model.config)}: create the rb_ model of the checkpoint's architecture."
        )
    return to_canonical(state_dict)[0]


def _pretrained_cfg(preset: str) -> dict[str, Any]:
    deep_stem = ResNetConfig.from_preset(preset).stem_type == "deep"
    return dict(
        url="",
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        crop_pct=0.875,
        interpolation="bilinear",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="embedder.embedder.0.convolution" if deep_stem else "embedder.embedder.convolution",
        classifier="classifier.1",
    )


# register_model looks the pretrained configs up here, by model name.
default_cfgs = generate_default_cfgs({f"rb_{preset}": _pretrained_cfg(preset) for preset in PRESETS})


def _require_weights(model_name: str, pretrained_cfg: Any, pretrained_cfg_overlay: dict[str, Any] | None) -> None:
    """The rb_ models have nothing to download (smp asks for weights unless ``encoder_weights=None``)."""
    cfg = resolve_pretrained_cfg(model_name, pretrained_cfg, pretrained_cfg_overlay)
    if not (cfg.has_weights or cfg.state_dict is not None):
        raise ValueError(
            f"{model_name} has no weights to download. Pass a checkpoint of this project, transformers, torchvision "
            "or timm as pretrained_cfg_overlay=dict(file=PATH) (a save_pretrained directory: dict(source='local-dir', "
            "file=DIRECTORY)), or pretrained=False for random weights (segmentation_models_pytorch: "
            "encoder_weights=None)."
        )


def _entrypoint(preset: str) -> Callable[..., nn.Module]:
    def create(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            _require_weights(f"rb_{preset}", kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        return build_model_with_cfg(
            partial(_build, preset),
            f"rb_{preset}",
            pretrained,
            pretrained_filter_fn=_canonical_checkpoint,
            feature_cfg=dict(feature_cls="getter"),
            **kwargs,
        )

    create.__name__ = create.__qualname__ = f"rb_{preset}"
    create.__doc__ = f"""``ResNetConfig.from_preset({preset!r})`` as a timm model; call it through
    ``timm.create_model("rb_{preset}", ...)``.

    Args:
        pretrained: load ``pretrained_cfg_overlay=dict(file=...)``'s checkpoint (there is nothing to download).
        kwargs: timm's (``num_classes``, ``in_chans``, ``features_only``, ``out_indices``, ``output_stride``,
            ``global_pool``, ``drop_rate``, ...) and any ``ResNetConfig`` field.

    Returns:
        The :class:`TimmResNet`, or timm's feature wrapper of it with ``features_only=True``.

    Raises:
        ValueError: ``pretrained`` without a checkpoint, or a checkpoint of another architecture.
    """
    return create


def _register() -> None:
    for preset in PRESETS:
        entrypoint = _entrypoint(preset)
        # register_model lists the name in this module's __all__, so the module must have it.
        globals()[entrypoint.__name__] = entrypoint
        # A second import (a reload, or this file under another module name) must neither warn nor replace.
        if not timm.is_model(entrypoint.__name__):
            register_model(entrypoint)


_register()

# segmentation_models_pytorch's models, which take these models as "tu-rb_*" encoders: encoder, decoder and
# segmentation head are the dense parts that optimize_for_inference and compile_for_training run fast. Named by
# path: smp is optional, and this module does not import it.
register_dense_parts(
    "segmentation_models_pytorch.base.model.SegmentationModel", ("encoder", "decoder", "segmentation_head")
)
