"""Config handling and checkpoints for every model here (:class:`ResNetPreTrainedModel`): building from a
preset, loading the checkpoints of this project, transformers, torchvision and timm from a file, a folder, the
Hugging Face Hub or a URL, and saving in transformers' layout. The network itself is the trunk's."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from typing_extensions import Self

from .config import ResNetConfig, check_field_names
from .weights.architecture import infer_config
from .weights.export import peer_state_dict
from .weights.files import locate_checkpoint, read_state_dict, refuse_optimized_for_inference, write_checkpoint
from .weights.loading import LoadReport, load_checkpoint
from .weights.resolve import Source, resolve_source
from .weights.sources import Checkpoint, timm_checkpoint, torchvision_checkpoint


class ResNetPreTrainedModel(nn.Module):
    """Base of every model here: owns a validated copy of its config (the caller's is never mutated),
    and reads and writes checkpoints of transformers, torchvision and timm.

    Args:
        config: the architecture; ``None`` is ``ResNetConfig()`` (a ResNet-50).
        overrides: ``ResNetConfig`` fields replacing the config's, e.g. ``out_features=["stage4"]``.

    Raises:
        TypeError: ``config`` is not a ``ResNetConfig``.
        ValueError: an override is no config field (with a close match) or an invalid value.
    """

    def __init__(self, config: ResNetConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is not None and not isinstance(config, ResNetConfig):
            raise TypeError(f"config must be a ResNetConfig or None, got {type(config).__name__}.")
        self.config = (config or ResNetConfig()).with_overrides(**overrides)
        self.load_report: LoadReport | None = None

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Self:
        """A randomly initialised model of a named architecture.

        Args:
            name: a key of ``PRESETS``, e.g. ``"resnet50"``.
            overrides: ``ResNetConfig`` fields on top of the preset's.

        Returns:
            The model, with random weights.

        Raises:
            ValueError: an unknown preset (with a close match and the valid names) or override.

        Example::

            >>> from resnet_backbone import ResNetBackbone
            >>> ResNetBackbone.from_preset("resnet18", depths=[1, 1, 1, 1], out_features=["stage4"]).channels
            [512]
        """
        return cls(ResNetConfig.from_preset(name, **overrides))

    @classmethod
    def load(cls, source: str | os.PathLike | Source, **overrides: Any) -> Self:
        """A preset name (random weights) or anything :meth:`from_pretrained` accepts (with weights).

        Args:
            source: a preset name, a checkpoint file or folder, a Hub repo id (``namespace/name``) or a URL;
                :func:`~resnet_backbone.weights.resolve_source` says which.
            overrides: ``ResNetConfig`` fields, e.g. ``out_features``.

        Returns:
            The model: random weights for a preset, else the checkpoint's (see :meth:`from_pretrained`).

        Raises:
            ValueError: ``source`` is none of these (with a close preset name), or its checkpoint does not fit.
        """
        source = resolve_source(source)
        if source.kind == "preset":
            return cls.from_preset(source.value, **overrides)
        return cls.from_pretrained(source, **overrides)

    # ---------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike | Source,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        strict: bool = True,
        **overrides: Any,
    ) -> Self:
        """Load a directory (config.json + weights), a weights file, a Hugging Face Hub repo id, or a URL.

        Accepts transformers' ResNetModel / ResNetForImageClassification / ResNetBackbone checkpoints
        (e.g. ``microsoft/resnet-50``) and torchvision / timm state dicts. A URL's file is downloaded once, into
        torch's hub cache (``$TORCH_HOME/hub/checkpoints``).

        Args:
            path_or_repo_id: a folder with ``config.json`` (its weights then follow that config), a weights
                file (``.safetensors``, ``.bin``, ``.pth``: the architecture is read off its keys and shapes), a
                Hub repo id or a URL.
            revision, cache_dir, local_files_only: as in ``huggingface_hub.hf_hub_download``, for a Hub id.
            strict: every key must find its place with the right shape, else nothing is loaded (see
                :func:`~resnet_backbone.weights.load_checkpoint`); ``False`` loads what fits and reports the rest.
            overrides: ``ResNetConfig`` fields on top of the stored or inferred config, e.g. ``out_features``.

        Returns:
            The model; its ``load_report`` says what matched. A classifier a backbone has no place for is
            dropped, with a warning.

        Raises:
            ValueError: an unknown override, an unreadable or foreign checkpoint, or (strict) keys that do not
                fit (:class:`~resnet_backbone.weights.CheckpointMismatchError`, a ValueError).
            OSError: a file or folder that cannot be read, with its name.
        """
        check_field_names(overrides)
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
        """Load torchvision weights.

        Args:
            source: a torchvision ResNet, a state dict, a checkpoint path, or a weights enum or its name
                (``"ResNet50_Weights.IMAGENET1K_V2"``, downloaded through torchvision's own loader and cache).
            strict: as in :meth:`from_pretrained`.
            overrides: ``ResNetConfig`` fields on top of the architecture read off the weights.

        Returns:
            The model, with ``load_report``.

        Raises:
            ValueError: an unknown override or weights name, or (strict) keys that do not fit.
        """
        check_field_names(overrides)
        checkpoint = torchvision_checkpoint(source)
        config = infer_config(checkpoint.state_dict, **{**checkpoint.config_fields, **overrides})
        return cls._from_checkpoint(config, checkpoint, strict)

    @classmethod
    def from_timm(cls, source: Any, *, strict: bool = True, **overrides: Any) -> Self:
        """Load timm weights (ResNet-D and the other variants timm has and torchvision lacks included).

        Args:
            source: a timm ResNet, a state dict, a checkpoint path, or a timm name with a pretrained tag
                (``"resnet50.a1_in1k"``, downloaded through timm's own pretrained loading).
            strict, overrides: as in :meth:`from_torchvision`.

        Returns:
            The model, with ``load_report``.

        Raises:
            ValueError: as in :meth:`from_torchvision`, for a timm model name.
        """
        check_field_names(overrides)
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
        """Write ``config.json`` and ``model.safetensors`` (transformers' layout), atomically: both files
        appear complete or not at all.

        Args:
            directory: the folder to write (created if needed; existing files of these names are replaced).

        Returns:
            The folder.

        Raises:
            ValueError: the model went through ``optimize_for_inference`` (its folded weights are no
                checkpoint): save the original.
            OSError: the folder cannot be written, with its name.

        Example::

            >>> import tempfile
            >>> from resnet_backbone import ResNetBackbone
            >>> tiny = ResNetBackbone.from_preset("resnet18", depths=[1, 1, 1, 1], hidden_sizes=[8, 8, 8, 8])
            >>> folder = tiny.save_pretrained(tempfile.mkdtemp())
            >>> sorted(path.name for path in folder.iterdir())
            ['config.json', 'model.safetensors']
            >>> ResNetBackbone.from_pretrained(folder).load_report.is_exact
            True
        """
        refuse_optimized_for_inference(self)
        config = self.config.with_overrides(architectures=[type(self).__name__])
        return write_checkpoint(directory, config.to_json_string(), self.state_dict())

    def to_torchvision_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under torchvision's keys; torchvision's model loads them with ``strict=True``.

        Returns:
            ``{torchvision key: tensor}``.

        Raises:
            ValueError: torchvision has no such architecture (a deep stem, say), or the model was optimised
                for inference.
        """
        return peer_state_dict(self, "torchvision")

    def to_timm_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under timm's keys; timm's model loads them with ``strict=True``.

        Returns:
            ``{timm key: tensor}``.

        Raises:
            ValueError: timm has no such architecture, or the model was optimised for inference.
        """
        return peer_state_dict(self, "timm")

    def to_detectron2_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under the keys of detectron2's ``ResNet`` (``stem.conv1.*``, ``res2.0.conv1.norm.*``); its
        ``build_resnet_backbone`` loads them with ``strict=True`` (its ``STRIDE_IN_1X1`` must equal
        ``downsample_in_bottleneck``).

        Returns:
            ``{detectron2 key: tensor}``.

        Raises:
            ValueError: detectron2 has no such architecture (a deep stem, say), or the model was optimised for
                inference.
        """
        return peer_state_dict(self, "detectron2")
