"""ResNetConfig: transformers' fields and JSON, the extensions, presets and validation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import safetensors.torch
import timm
import torch
import torchvision
import transformers
from helpers import TINY_BASIC, non_default_config_values, slow_param

from resnet_backbone import PRESETS, ResNetBackbone, ResNetConfig
from resnet_backbone.weights import infer_config

TRANSFORMERS_FIELDS = [
    "num_channels", "embedding_size", "hidden_sizes", "depths", "layer_type", "hidden_act",
    "downsample_in_first_stage", "downsample_in_bottleneck", "out_features", "out_indices", "stage_names",
    "id2label", "label2id", "problem_type", "num_labels", "output_hidden_states", "return_dict",
]  # fmt: skip


def _as_json(value):
    """transformers keeps some sequences as tuples; JSON makes them lists."""
    return json.loads(json.dumps(value))


def test_defaults_are_transformers_defaults():
    ours, theirs = ResNetConfig(), transformers.ResNetConfig()
    for name in TRANSFORMERS_FIELDS:
        assert _as_json(getattr(ours, name)) == _as_json(getattr(theirs, name)), name


def test_config_json_written_by_transformers_reads_as_the_same_config(tmp_path):
    theirs = transformers.ResNetConfig(
        layer_type="basic", depths=[2, 3, 1], hidden_sizes=[8, 16, 24], embedding_size=16, hidden_act="gelu",
        downsample_in_first_stage=True, out_features=["stage1", "stage3"], id2label={0: "cat", 1: "dog", 2: "eel"},
        label2id={"cat": 0, "dog": 1, "eel": 2},
    )  # fmt: skip
    theirs.save_pretrained(tmp_path)
    ours = ResNetConfig.from_json_file(tmp_path / "config.json")
    for name in TRANSFORMERS_FIELDS:
        assert _as_json(getattr(ours, name)) == _as_json(getattr(theirs, name)), name


def test_config_json_written_here_reads_in_transformers_as_the_same_config(tmp_path):
    ours = ResNetConfig(
        layer_type="basic", depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 24, 32], out_indices=[-1, ],
        downsample_in_bottleneck=True, num_labels=3, problem_type="multi_label_classification",
    )  # fmt: skip
    ours.to_json_file(tmp_path / "config.json")
    theirs = transformers.ResNetConfig.from_pretrained(tmp_path)
    assert theirs.model_type == "resnet"
    for name in TRANSFORMERS_FIELDS:
        assert _as_json(getattr(theirs, name)) == _as_json(getattr(ours, name)), name


def test_dict_and_json_round_trip_many_fields_together(tmp_path):
    config = ResNetConfig.from_preset(
        "resnext50_32x4d", stem_type="deep", avg_down=True, output_stride=16, norm_layer="group", freeze_at=2,
        norm_eval=True, zero_init_residual=True, drop_path_rate=0.1, out_features=["stage2", "stage3"],
        id2label={0: "a", 1: "b"}, dilation_rule="mmseg",
    )  # fmt: skip
    assert ResNetConfig.from_dict(config.to_dict()) == config
    config.to_json_file(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "resnet"
    assert ResNetConfig.from_json_file(tmp_path / "config.json") == config


@pytest.mark.parametrize(("name", "value"), non_default_config_values().items(), ids=str)
def test_every_field_round_trips_through_dict_and_json(name, value, tmp_path):
    config = ResNetConfig(**{name: value})
    assert ResNetConfig.from_dict(config.to_dict()) == config
    config.to_json_file(tmp_path / "config.json")
    assert ResNetConfig.from_json_file(tmp_path / "config.json") == config


def test_reading_bad_json_names_the_file_and_the_problem(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        ResNetConfig.from_json_file(path)
    path.write_text(json.dumps({"model_type": "vit", "hidden_size": 768}))
    with pytest.raises(ValueError, match="model of type 'vit'"):
        ResNetConfig.from_json_file(path)
    path.write_text(json.dumps({"depths": [1, 1], "hidden_sizes": [8, 8], "stage_names": ["stem", "stage1"]}))
    with pytest.raises(ValueError, match="stage_names"):
        ResNetConfig.from_json_file(path)


def test_unknown_json_fields_are_reported_not_silently_dropped():
    with pytest.warns(UserWarning, match="grups"):
        ResNetConfig.from_dict({"grups": 32})


def test_setting_num_labels_regenerates_the_label_maps_as_transformers():
    ours, theirs = ResNetConfig(), transformers.ResNetConfig()
    ours.num_labels = theirs.num_labels = 4
    assert (ours.id2label, ours.label2id) == (theirs.id2label, theirs.label2id)


# ---------------------------------------------------------------- presets

TORCHVISION_PRESETS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
    "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]  # fmt: skip


def _parameter_count(module: torch.nn.Module, skip_prefix: str) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if not name.startswith(skip_prefix))


@pytest.mark.parametrize("name", [name if name in ("resnet18", "resnet34") else slow_param(name) for name in PRESETS])
def test_presets_have_the_peer_architecture(name):
    """Same parameter count (without the classifier) and the same per-stage shapes as torchvision / timm."""
    with torch.device("meta"):
        peer = getattr(torchvision.models, name)() if name in TORCHVISION_PRESETS else timm.create_model(name)
        ours = ResNetBackbone.from_preset(name, out_features=["stage1", "stage2", "stage3", "stage4"])
        x = torch.empty(1, 3, 160, 224)
        peer_stages = []
        activation = peer.relu if name in TORCHVISION_PRESETS else peer.act1
        hidden = peer.maxpool(activation(peer.bn1(peer.conv1(x))))
        for layer in (peer.layer1, peer.layer2, peer.layer3, peer.layer4):
            hidden = layer(hidden)
            peer_stages.append(tuple(hidden.shape))
        ours_stages = [tuple(f.shape) for f in ours(x).feature_maps]
    assert _parameter_count(ours, "-") == _parameter_count(peer, "fc.")
    assert ours_stages == peer_stages


def test_unknown_preset_suggests_a_close_match_and_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Did you mean 'resnext50_32x4d'") as error:
        ResNetConfig.from_preset("resnext50_32x4")
    assert "wide_resnet101_2" in str(error.value)
    with pytest.raises(ValueError, match="Unknown preset"):
        ResNetBackbone.from_preset("vgg16")


def test_preset_overrides_apply_on_top():
    config = ResNetConfig.from_preset("resnet50d", out_features=["stage3"], output_stride=16)
    assert (config.stem_type, config.avg_down, config.output_stride, config.out_indices) == ("deep", True, 16, [3])


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(depths=[3, 0, 6, 3]), "depths"),
        (dict(depths=[]), "depths"),
        (dict(depths=[3, 4, 6]), "depths and hidden_sizes"),
        (dict(hidden_sizes=[256, -512, 1024, 2048]), "hidden_sizes"),
        (dict(layer_type="bottle"), "layer_type"),
        (dict(hidden_act="mish"), "hidden_act"),
        (dict(norm_layer="layer"), "norm_layer"),
        (dict(stem_type="tiered"), "stem_type"),
        (dict(output_stride=4), "output_stride"),
        (dict(output_stride=64), "output_stride"),
        (dict(num_channels=0), "num_channels"),
        (dict(embedding_size=2.5), "embedding_size"),
        (dict(groups=0), "groups"),
        (dict(layer_type="basic", groups=32, width_per_group=4), "layer_type='basic'"),
        (dict(norm_layer="group", embedding_size=48), "multiple of 32"),
        (dict(freeze_at=6), "freeze_at"),
        (dict(freeze_at=-1), "freeze_at"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(avg_down="yes"), "avg_down"),
        (dict(problem_type="ranking"), "problem_type"),
        (dict(num_labels=3, id2label={0: "a"}), "num_labels"),
        (dict(hidden_sizes=[2, 512, 1024, 2048]), "hidden_sizes"),
    ],
)
def test_bad_values_are_value_errors_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        ResNetConfig(**overrides)
    with pytest.raises(ValueError, match=field):
        ResNetBackbone(**overrides)


def test_unknown_override_names_the_closest_field():
    with pytest.raises(ValueError, match=r"Unknown ResNetConfig field 'grups' \(did you mean 'groups'\?\)"):
        ResNetBackbone(grups=32)
    with pytest.raises(ValueError, match=r"fields 'grups' \(did you mean 'groups'\?\), 'zzz'\. Valid fields: "):
        ResNetConfig().with_overrides(zzz=1, grups=32)


def test_an_unknown_override_is_the_same_clear_error_at_every_entry_point_before_any_work(tmp_path):
    model = ResNetBackbone(**TINY_BASIC)
    model.save_pretrained(tmp_path / "saved")
    safetensors.torch.save_file(model.state_dict(), tmp_path / "weights.safetensors")
    missing = tmp_path / "not-there"  # the typo is reported before any file is looked for
    typo = dict(out_featurs=["stage2"])
    entry_points = {
        "ResNetConfig.from_preset": lambda: ResNetConfig.from_preset("resnet18", **typo),
        "ResNetConfig.with_overrides": lambda: ResNetConfig().with_overrides(**typo),
        "ResNetConfig.from_dict": lambda: ResNetConfig.from_dict(ResNetConfig().to_dict(), **typo),
        "ResNetBackbone()": lambda: ResNetBackbone(**typo),
        "ResNetBackbone.from_preset": lambda: ResNetBackbone.from_preset("resnet18", **typo),
        "ResNetBackbone.load(preset)": lambda: ResNetBackbone.load("resnet18", **typo),
        "ResNetBackbone.load(directory)": lambda: ResNetBackbone.load(tmp_path / "saved", **typo),
        "from_pretrained(weights file)": lambda: ResNetBackbone.from_pretrained(
            tmp_path / "weights.safetensors", **typo
        ),
        "from_pretrained(missing)": lambda: ResNetBackbone.from_pretrained(missing, **typo),
        "from_torchvision": lambda: ResNetBackbone.from_torchvision(missing, **typo),
        "from_timm": lambda: ResNetBackbone.from_timm(missing, **typo),
        "infer_config": lambda: infer_config(model.state_dict(), **typo),
    }
    messages = {}
    for entry_point, call in entry_points.items():
        with pytest.raises(ValueError) as error:
            call()
        messages[entry_point] = str(error.value)
    expected = "Unknown ResNetConfig field 'out_featurs' (did you mean 'out_features'?). Valid fields: "
    assert all(message.startswith(expected) for message in messages.values()), messages
    assert len(set(messages.values())) == 1


@pytest.mark.slow
def test_fuzzed_configs_either_build_or_raise_value_error():
    # hypothesis is imported here, not at the top: collecting it costs each test process 2 s.
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    any_value = st.one_of(
        st.none(), st.booleans(), st.integers(-3, 80), st.floats(-1, 2), st.just(float("nan")), st.text(max_size=12),
        st.sampled_from(["relu", "gelu", "basic", "bottleneck", "deep", "group", "frozen_batch", "stage1"]),
        st.lists(st.integers(-2, 70), max_size=5), st.lists(st.text(max_size=6), max_size=3),
        st.dictionaries(st.integers(-1, 3), st.text(max_size=3), max_size=3),
    )  # fmt: skip

    field_names = [field.name for field in dataclasses.fields(ResNetConfig)]

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(st.dictionaries(st.sampled_from(field_names), any_value, max_size=5))
    def check(overrides: dict) -> None:
        try:
            config = ResNetConfig(**overrides)
        except ValueError:
            return
        # A config that validates must build: no TypeError, ZeroDivisionError or shape error later on.
        # The input is large enough for the deepest stride (4 * 2**5 with five stages all downsampling),
        # and a batch of 2 keeps training-mode BatchNorm defined on a 1x1 map.
        with torch.device("meta"):
            ResNetBackbone(config)(torch.empty(2, config.num_channels, 256, 256))

    check()
