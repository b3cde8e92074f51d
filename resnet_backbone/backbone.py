"""``ResNetBackbone``: multi-scale feature maps selected by stage name or index."""

from __future__ import annotations

import torch

from .config import ResNetConfig
from .outputs import BackboneOutput
from .trunk import ResNetTrunk


class ResNetBackbone(ResNetTrunk):
    """A ResNet v1.5 that returns the feature maps of ``out_features`` (transformers' conventions).

    Stages deeper than the deepest requested one are not built: they cost nothing and leave no unused
    parameters. Channels and strides are known before any forward pass. Checkpoints load through the
    inherited ``from_pretrained`` / ``from_torchvision`` / ``from_timm``.

    Args:
        config: the architecture (default: ``ResNetConfig()``, a ResNet-50); it is copied, never mutated.
        overrides: ``ResNetConfig`` fields on top of it, e.g. ``out_features=["stage2", "stage4"]``.

    Raises:
        ValueError: an unknown field (with a close match) or an invalid value.

    Example::

        >>> import torch
        >>> from resnet_backbone import ResNetBackbone
        >>> backbone = ResNetBackbone.from_preset("resnet18", depths=[1, 1, 1, 1], out_features=["stage2", "stage4"])
        >>> backbone.channels, backbone.strides
        ([128, 512], [8, 32])
        >>> [tuple(f.shape) for f in backbone(torch.randn(1, 3, 64, 96)).feature_maps]
        [(1, 128, 8, 12), (1, 512, 2, 3)]
    """

    # TorchScript compiles only what torchvision's scripted detectors call (the trunk's scripted stage loop);
    # the selection API and this forward stay Python.
    __jit_unused_properties__ = [
        *ResNetTrunk.__jit_unused_properties__, "out_features", "out_indices", "num_features",
        "out_feature_channels", "out_feature_strides", "channels", "strides",
    ]  # fmt: skip

    @staticmethod
    def num_stages_to_build(config: ResNetConfig) -> int:
        """Up to the deepest ``out_features``: later stages would cost memory and never run."""
        return max(config.out_indices, default=0)

    # ---------------------------------------------------------------- stage selection

    @property
    def out_features(self) -> list[str]:
        return self.config.out_features

    @out_features.setter
    def out_features(self, out_features: list[str]) -> None:
        self._select(self.config.with_overrides(out_features=out_features))

    @property
    def out_indices(self) -> list[int]:
        return self.config.out_indices

    @out_indices.setter
    def out_indices(self, out_indices: list[int]) -> None:
        self._select(self.config.with_overrides(out_indices=out_indices))

    def _select(self, config: ResNetConfig) -> None:
        """Adopt ``config``'s selection (resolved once, by the config) if this backbone built its stages."""
        num_built = self.num_built_stages
        if self.num_stages_to_build(config) > num_built:
            raise ValueError(
                f"Cannot select {config.out_features}: this backbone was built up to "
                f"{self.stage_names[num_built]!r} (its deepest out_feature then), so "
                f"{self.stage_names[num_built + 1 :]} do not exist. Build a new backbone with the deeper "
                "out_features, e.g. ResNetBackbone(config, out_features=[...])."
            )
        self.config = config

    # ---------------------------------------------------------------- metadata

    @property
    def num_features(self) -> list[int]:
        """Channels of every stage in ``stage_names``, built or not (transformers' ``num_features``)."""
        return [spec.channels for spec in self.stage_specs]

    @property
    def out_feature_channels(self) -> dict[str, int]:
        return {spec.name: spec.channels for spec in self.stage_specs}

    @property
    def out_feature_strides(self) -> dict[str, int]:
        return {spec.name: spec.stride for spec in self.stage_specs}

    @property
    def channels(self) -> list[int]:
        """Channels of each output feature map, in ``out_features`` order."""
        return [self.out_feature_channels[name] for name in self.out_features]

    @property
    def strides(self) -> list[int]:
        """Stride (input size / feature size) of each output feature map, in ``out_features`` order."""
        return [self.out_feature_strides[name] for name in self.out_features]

    # ---------------------------------------------------------------- forward

    @torch.jit.unused
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BackboneOutput | tuple:
        """Feature maps for ``pixel_values`` of shape (batch, num_channels, height, width).

        ``hidden_states`` (when asked) holds the stem output and the output of each stage computed.
        """
        output_hidden_states, return_dict = self._output_options(output_hidden_states, return_dict)
        hidden_states = self.forward_hidden_states(pixel_values, num_stages=max(self.out_indices, default=0))
        feature_maps = tuple(hidden_states[index] for index in self.out_indices)
        all_hidden_states = tuple(hidden_states) if output_hidden_states else None
        if not return_dict:
            return (feature_maps,) if all_hidden_states is None else (feature_maps, all_hidden_states)
        return BackboneOutput(feature_maps=feature_maps, hidden_states=all_hidden_states)
