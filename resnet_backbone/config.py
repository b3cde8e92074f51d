"""``ResNetConfig``: everything needed to rebuild the network, JSON-compatible with transformers.

The first fields are transformers' ``ResNetConfig`` field for field; the extensions after them default
to transformers' behaviour, so a transformers ``config.json`` loads unchanged and means the same network.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from os import PathLike
from pathlib import Path
from typing import Any

from .hints import close_match, close_match_hint
from .out_features import align_out_features
from .presets import preset_overrides
from .specs import stage_specs

# The fields that take one of a few values (output_stride and problem_type may also be None): validation and
# the tests that try every field read them here.
FIELD_CHOICES: dict[str, tuple] = {
    "layer_type": ("basic", "bottleneck"),
    "hidden_act": ("relu", "gelu", "gelu_new", "silu", "swish", "selu"),
    "stem_type": ("default", "deep"),
    "output_stride": (8, 16, 32),
    "dilation_rule": ("timm", "mmdet", "mmseg"),
    "norm_layer": ("batch", "frozen_batch", "sync_batch", "group"),
    "problem_type": ("regression", "single_label_classification", "multi_label_classification"),
}
TRANSFORMERS_ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu", "swish")
# Marks config.json files that transformers must not load: see ResNetConfig.to_json_string.
EXTENSION_MARKER = "resnet_backbone:"
GROUP_NORM_GROUPS = 32

# Keys that transformers writes into config.json but that do not change the network.
_IGNORED_TRANSFORMERS_KEYS = {
    "transformers_version", "dtype", "torch_dtype", "_name_or_path", "_commit_hash",
    "chunk_size_feed_forward", "is_encoder_decoder", "output_attentions", "use_return_dict",
}  # fmt: skip


@dataclass
class ResNetConfig:
    """Configuration of a ResNet v1.5 (stride 2 in the bottleneck's 3x3 convolution).

    Every field is validated when the config is built (an invalid value is a ValueError naming the field and
    its choices); ``stage_names`` are ``"stem"``, ``"stage1"``, ... one per ``depths`` entry.

    Args:
        num_channels, embedding_size, hidden_sizes, depths, layer_type, hidden_act, downsample_in_first_stage,
            downsample_in_bottleneck: transformers' ``ResNetConfig`` fields, with its meaning and defaults
            (a ResNet-50).
        out_features, out_indices: the stages a backbone returns, by name or index (index 0 is the stem); give
            one, the other follows. Default: the last stage.
        num_labels, id2label, label2id, problem_type, output_hidden_states, return_dict, architectures:
            transformers' generic fields that the models read.
        groups, width_per_group: ResNeXt / Wide ResNet; the bottleneck's inner width is
            ``hidden_size / 4 * width_per_group / 64 * groups``, as torchvision computes it.
        stem_type, avg_down: ResNet-C/D (``"deep"``: three 3x3 stem convs; avg-pool shortcuts), as timm.
        output_stride: 8, 16 or 32 replaces stride by dilation in the stages past that stride;
            ``None`` keeps the natural strides (transformers' behaviour).
        dilation_rule: how the dilated stages are built, as each framework builds them, so that its
            checkpoints compute the same function. ``"timm"`` (and torchvision): a stage's first block keeps
            the previous stage's dilation, a basic block dilates both its 3x3 convs, and an ``avg_down``
            shortcut at stride 1 averages 2x2 (timm's ``AvgPool2dSame``). ``"mmseg"`` (its
            ``contract_dilation=True``): the first block keeps the previous dilation, a basic block dilates
            only its first 3x3 conv, and a stride-1 shortcut does not pool. ``"mmdet"`` (mmdet's ``ResLayer``,
            mmseg's default): as ``"mmseg"``, but the first block already uses the stage's own dilation.
        norm_layer: ``"batch"``, ``"frozen_batch"``, ``"sync_batch"`` or ``"group"`` (32 groups).
        freeze_at: ``k`` freezes ``stage_names[:k]`` (no gradients, norms kept in eval mode).
        norm_eval: keep every norm layer in eval mode while training.
        zero_init_residual, drop_path_rate: as torchvision and timm.

    Raises:
        ValueError: a field with an invalid value, or fields that contradict each other.

    Example::

        >>> from resnet_backbone import ResNetConfig
        >>> config = ResNetConfig(layer_type="basic", hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])
        >>> config.stage_names
        ['stem', 'stage1', 'stage2', 'stage3', 'stage4']
        >>> config.out_features, config.out_indices
        (['stage4'], [4])
    """

    model_type = "resnet"

    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    depths: list[int] = field(default_factory=lambda: [3, 4, 6, 3])
    layer_type: str = "bottleneck"
    hidden_act: str = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    out_features: list[str] | None = None
    out_indices: list[int] | None = None

    groups: int = 1
    width_per_group: int = 64
    stem_type: str = "default"
    avg_down: bool = False
    output_stride: int | None = None
    dilation_rule: str = "timm"
    norm_layer: str = "batch"
    freeze_at: int = 0
    norm_eval: bool = False
    zero_init_residual: bool = False
    drop_path_rate: float = 0.0

    # transformers' generic config fields that these models read.
    num_labels: int | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    output_hidden_states: bool = False
    return_dict: bool = True
    architectures: list[str] | None = None

    def __post_init__(self) -> None:
        self._validate_architecture()
        self._validate_extensions()
        self._reconcile_labels()
        for name in ("output_hidden_states", "return_dict"):
            _require_bool(name, getattr(self, name))
        if self.architectures is not None and not (
            isinstance(self.architectures, (list, tuple)) and all(isinstance(a, str) for a in self.architectures)
        ):
            raise ValueError(f"architectures must be a list of class names, got {self.architectures!r}.")
        self.out_features, self.out_indices = align_out_features(self.stage_names, self.out_features, self.out_indices)
        object.__setattr__(self, "_initialized", True)

    def __setattr__(self, name: str, value: Any) -> None:
        # As in transformers, setting one of out_features / out_indices re-aligns the other, and
        # setting num_labels regenerates the label maps.
        if self.__dict__.get("_initialized"):
            if name == "out_features":
                value, indices = align_out_features(self.stage_names, value, None)
                object.__setattr__(self, "out_indices", indices)
            elif name == "out_indices":
                names, value = align_out_features(self.stage_names, None, value)
                object.__setattr__(self, "out_features", names)
            elif name == "num_labels" and value != self.num_labels:
                _require_int("num_labels", value, minimum=0)
                object.__setattr__(self, "id2label", {i: f"LABEL_{i}" for i in range(value)})
                object.__setattr__(self, "label2id", {f"LABEL_{i}": i for i in range(value)})
        object.__setattr__(self, name, value)

    @property
    def stage_names(self) -> list[str]:
        return ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ResNetConfig:
        """Config of a named architecture with overrides.

        Args:
            name: a key of ``PRESETS`` (``"resnet50"``, ``"resnext50_32x4d"``, ...).
            overrides: fields replacing the preset's.

        Returns:
            The validated config.

        Raises:
            ValueError: an unknown preset or field (each with a close match and the valid names), or an
                invalid value.

        Example::

            >>> from resnet_backbone import ResNetConfig
            >>> config = ResNetConfig.from_preset("resnet50", out_features=["stage2", "stage4"])
            >>> config.depths, config.out_indices
            ([3, 4, 6, 3], [2, 4])
        """
        fields_of_preset = preset_overrides(name)
        check_field_names(overrides)
        return cls(**{**fields_of_preset, **overrides})

    def with_overrides(self, **overrides: Any) -> ResNetConfig:
        """A validated copy with some fields replaced; this config is left as it is.

        Setting one of linked fields re-derives the others: ``out_features`` or ``out_indices``, and
        ``num_labels`` or ``id2label`` / ``label2id``.

        Args:
            overrides: field names and their new values.

        Returns:
            The new config.

        Raises:
            ValueError: an unknown field name (with a close match) or an invalid value.

        Example::

            >>> from resnet_backbone import ResNetConfig
            >>> ResNetConfig().with_overrides(out_indices=[1, 3]).out_features
            ['stage1', 'stage3']
        """
        check_field_names(overrides)
        for linked in _LINKED_FIELDS:
            if any(name in overrides for name in linked):
                # A new value given one way replaces the old one given another way.
                for name in linked:
                    overrides.setdefault(name, None)
        return replace(copy.deepcopy(self), **overrides)

    # ---------------------------------------------------------------- serialization

    def to_dict(self) -> dict[str, Any]:
        """The config.json fields, as transformers writes them (``id2label`` keys as strings)."""
        data: dict[str, Any] = {"model_type": self.model_type}
        for f in fields(self):
            if f.name != "num_labels":
                data[f.name] = copy.deepcopy(getattr(self, f.name))
        data["id2label"] = {str(index): label for index, label in self.id2label.items()}
        data["stage_names"] = self.stage_names
        return data

    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any], **overrides: Any) -> ResNetConfig:
        """Read a dict written by :meth:`to_dict` or by transformers' ``ResNetConfig.to_dict``.

        Args:
            config_dict: the fields; keys that transformers writes but that do not change the network are
                dropped, other unknown keys are dropped with a warning.
            overrides: fields replacing the dict's.

        Returns:
            The validated config.

        Raises:
            ValueError: not a JSON object, another ``model_type``, stored ``stage_names`` that disagree with
                ``depths``, or an invalid value.
        """
        if not isinstance(config_dict, Mapping):
            raise ValueError(f"A ResNet config must be a JSON object, got {type(config_dict).__name__}.")
        data = dict(config_dict)
        model_type = data.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(
                f"This config describes a model of type {model_type!r}, not a ResNet "
                f"(expected model_type {cls.model_type!r})."
            )
        stored_stage_names = data.pop("stage_names", None)
        if isinstance(data.get("layer_type"), str):
            data["layer_type"] = data["layer_type"].removeprefix(EXTENSION_MARKER)
        if isinstance(data.get("id2label"), Mapping):
            data["id2label"] = {_label_index(key): label for key, label in data["id2label"].items()}
        unknown = sorted(set(data) - _FIELD_NAMES - _IGNORED_TRANSFORMERS_KEYS)
        if unknown:
            warnings.warn(f"Ignoring config fields that ResNetConfig does not know: {unknown}.", stacklevel=2)
        config = cls(**{key: value for key, value in data.items() if key in _FIELD_NAMES})
        if stored_stage_names is not None and list(stored_stage_names) != config.stage_names:
            raise ValueError(
                f"The config's stage_names {stored_stage_names} do not match its depths "
                f"{config.depths} (which give {config.stage_names})."
            )
        return config.with_overrides(**overrides) if overrides else config

    def to_json_string(self) -> str:
        """config.json text. A config that transformers cannot build exactly gets ``layer_type``
        ``"resnet_backbone:<type>"``, which transformers rejects instead of loading a different network."""
        data = self.to_dict()
        if self.transformers_incompatibilities():
            data["layer_type"] = EXTENSION_MARKER + self.layer_type
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def transformers_incompatibilities(self) -> list[str]:
        """The fields that make transformers' ResNet a different network (training-only options are fine)."""
        differences = [
            f"{name}={getattr(self, name)!r}"
            for name, value in [
                ("groups", 1),
                ("width_per_group", 64),
                ("stem_type", "default"),
                ("avg_down", False),
                ("norm_layer", "batch"),
            ]  # fmt: skip
            if getattr(self, name) != value
        ]
        if self.hidden_act not in TRANSFORMERS_ACTIVATIONS:
            differences.append(f"hidden_act={self.hidden_act!r}")
        if any(spec.dilation > 1 for spec in stage_specs(self)):
            differences.append(f"output_stride={self.output_stride} (dilation)")
        return differences

    def to_json_file(self, path: str | PathLike) -> None:
        Path(path).write_text(self.to_json_string(), encoding="utf-8")

    @classmethod
    def from_json_file(cls, path: str | PathLike, **overrides: Any) -> ResNetConfig:
        """Read a ``config.json`` written by :meth:`to_json_file`, ``save_pretrained`` or transformers.

        Args:
            path: the file.
            overrides: fields replacing the file's.

        Returns:
            The validated config.

        Raises:
            ValueError: the file is not JSON or not a ResNet config (see :meth:`from_dict`).
            OSError: the file cannot be read.
        """
        text = Path(path).read_text(encoding="utf-8")
        try:
            config_dict = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); expected a ResNet config.json.") from None
        return cls.from_dict(config_dict, **overrides)

    # ---------------------------------------------------------------- validation

    def _validate_architecture(self) -> None:
        _require_int("num_channels", self.num_channels, minimum=1)
        _require_int("embedding_size", self.embedding_size, minimum=1)
        self.hidden_sizes = _require_int_list("hidden_sizes", self.hidden_sizes)
        self.depths = _require_int_list("depths", self.depths)
        if len(self.depths) != len(self.hidden_sizes):
            raise ValueError(
                f"depths and hidden_sizes must have one entry per stage, got {len(self.depths)} depths "
                f"{self.depths} and {len(self.hidden_sizes)} hidden_sizes {self.hidden_sizes}."
            )
        _require_choice("layer_type", self.layer_type)
        _require_choice("hidden_act", self.hidden_act)
        _require_bool("downsample_in_first_stage", self.downsample_in_first_stage)
        _require_bool("downsample_in_bottleneck", self.downsample_in_bottleneck)

    def _validate_extensions(self) -> None:
        _require_int("groups", self.groups, minimum=1)
        _require_int("width_per_group", self.width_per_group, minimum=1)
        if self.layer_type == "basic" and (self.groups, self.width_per_group) != (1, 64):
            raise ValueError(
                f"layer_type='basic' supports only groups=1 and width_per_group=64 (as torchvision), got "
                f"groups={self.groups}, width_per_group={self.width_per_group}; use layer_type='bottleneck'."
            )
        if self.layer_type == "bottleneck":
            for hidden_size in self.hidden_sizes:
                if self.bottleneck_width(hidden_size) < 1:
                    raise ValueError(
                        f"hidden_sizes entry {hidden_size} is too small for a bottleneck with groups="
                        f"{self.groups}, width_per_group={self.width_per_group}: its inner width would be 0."
                    )
        _require_choice("stem_type", self.stem_type)
        if self.stem_type == "deep" and self.embedding_size < 2:
            raise ValueError(f"stem_type='deep' needs embedding_size >= 2, got {self.embedding_size}.")
        _require_bool("avg_down", self.avg_down)
        if self.output_stride is not None:
            _require_choice("output_stride", self.output_stride, allow_none=True)
        _require_choice("dilation_rule", self.dilation_rule)
        _require_choice("norm_layer", self.norm_layer)
        if self.norm_layer == "group":
            uneven = [c for c in self.normalized_channels() if c % GROUP_NORM_GROUPS]
            if uneven:
                raise ValueError(
                    f"norm_layer='group' uses {GROUP_NORM_GROUPS} groups, so every normalized width must be a "
                    f"multiple of {GROUP_NORM_GROUPS}; these are not: {sorted(set(uneven))} (from "
                    f"embedding_size, hidden_sizes, groups and width_per_group)."
                )
        _require_int("freeze_at", self.freeze_at, minimum=0)
        if self.freeze_at > len(self.stage_names):
            raise ValueError(
                f"freeze_at must be between 0 and {len(self.stage_names)} (freezes stage_names[:freeze_at] of "
                f"{self.stage_names}), got {self.freeze_at}."
            )
        for name in ("norm_eval", "zero_init_residual"):
            _require_bool(name, getattr(self, name))
        if self.norm_layer == "sync_batch" and self.norm_eval:
            warnings.warn(
                "norm_layer='sync_batch' with norm_eval=True: norm_eval keeps every norm in eval mode, so the "
                "statistics are never synchronised (nor updated). Use one or the other.",
                stacklevel=3,
            )
        rate = self.drop_path_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_path_rate must be a number in [0, 1), got {rate!r}.")

    def _reconcile_labels(self) -> None:
        if self.id2label is None and self.label2id is not None:
            if not isinstance(self.label2id, Mapping):
                raise ValueError(f"label2id must map label names to indices, got {self.label2id!r}.")
            self.id2label = {index: label for label, index in self.label2id.items()}
        if self.id2label is None:
            num_labels = 2 if self.num_labels is None else self.num_labels
            _require_int("num_labels", num_labels, minimum=0)
            self.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        if not isinstance(self.id2label, Mapping) or not all(
            isinstance(k, int) and not isinstance(k, bool) and isinstance(v, str) for k, v in self.id2label.items()
        ):
            raise ValueError(f"id2label must map integer indices to label names, got {self.id2label!r}.")
        self.id2label = dict(self.id2label)
        if self.num_labels is not None and self.num_labels != len(self.id2label):
            raise ValueError(
                f"num_labels={self.num_labels} disagrees with id2label, which has {len(self.id2label)} labels."
            )
        self.num_labels = len(self.id2label)
        if self.label2id is None:
            self.label2id = {label: index for index, label in self.id2label.items()}
        if not isinstance(self.label2id, Mapping):
            raise ValueError(f"label2id must map label names to indices, got {self.label2id!r}.")
        self.label2id = dict(self.label2id)
        if self.problem_type is not None:
            _require_choice("problem_type", self.problem_type)

    # ---------------------------------------------------------------- derived widths

    def bottleneck_width(self, hidden_size: int) -> int:
        """Inner width of a bottleneck block whose output has ``hidden_size`` channels (torchvision's rule)."""
        return int(hidden_size // 4 * self.width_per_group / 64) * self.groups

    def deep_stem_width(self) -> int:
        """Width of the first two 3x3 convs of the deep stem (32 for timm's resnet50d)."""
        return self.embedding_size // 2

    def normalized_channels(self) -> list[int]:
        """Every channel count that a norm layer sees, for the norm's own constraints."""
        channels = [self.embedding_size, *self.hidden_sizes]
        if self.stem_type == "deep":
            channels.append(self.deep_stem_width())
        if self.layer_type == "bottleneck":
            channels += [self.bottleneck_width(h) for h in self.hidden_sizes]
        return channels


_FIELD_NAMES = {f.name for f in fields(ResNetConfig)}


def check_field_names(names: Iterable[str]) -> None:
    """Raise a ValueError naming each of ``names`` that is not a ``ResNetConfig`` field, with its close match
    and the valid fields: every entry point that takes config overrides calls it first, so a typo fails
    before any work, with the same message everywhere (not a bare TypeError from the constructor)."""
    unknown = sorted(set(names) - _FIELD_NAMES)
    if unknown:
        described = [
            f"{name!r} (did you mean {match!r}?)" if (match := close_match(name, _FIELD_NAMES)) else repr(name)
            for name in unknown
        ]
        raise ValueError(
            f"Unknown ResNetConfig field{'s' if len(unknown) > 1 else ''} {', '.join(described)}. "
            f"Valid fields: {', '.join(sorted(_FIELD_NAMES))}."
        )


# Fields that describe one thing together: overriding one of them re-derives the others.
_LINKED_FIELDS = (("out_features", "out_indices"), ("num_labels", "id2label", "label2id"))


def _label_index(key: Any) -> Any:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise ValueError(f"id2label keys must be integer indices, got {key!r}.") from None


def _require_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _require_int_list(name: str, value: Any) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name} must be a non-empty list of positive integers (one per stage), got {value!r}.")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or item < 1:
            raise ValueError(f"{name} must contain positive integers, got {item!r} in {list(value)}.")
    return list(value)


def _require_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")


def _require_choice(name: str, value: Any, *, allow_none: bool = False) -> None:
    choices = FIELD_CHOICES[name]
    if isinstance(value, bool) or value not in choices:
        valid = ", ".join(repr(c) for c in choices) + (", None" if allow_none else "")
        raise ValueError(f"{name} must be one of {valid}; got {value!r}.{close_match_hint(value, choices)}")
