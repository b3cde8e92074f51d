"""Weights from torchvision, timm and transformers give identical features, and what we export loads back.

Every peer model has random weights and randomised BatchNorm statistics.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
import transformers
from helpers import ALL_STAGES, TINY_BASIC, TINY_BOTTLENECK, max_abs_diff, randomize_norms, slow_param
from torchvision.models._utils import IntermediateLayerGetter

from resnet_backbone import PRESETS, ResNetBackbone, ResNetConfig, ResNetForImageClassification, ResNetModel
from resnet_backbone.weights import infer_config

STAGES = ALL_STAGES[1:]
TORCHVISION_LAYERS = {"layer1": "stage1", "layer2": "stage2", "layer3": "stage3", "layer4": "stage4"}


def torchvision_features(model: torch.nn.Module) -> IntermediateLayerGetter:
    return IntermediateLayerGetter(model, TORCHVISION_LAYERS).eval()


@pytest.mark.parametrize("name", ["resnet18", *map(slow_param, ["resnet50", "resnext50_32x4d", "wide_resnet50_2"])])
def test_torchvision_weights_give_identical_features(name, images):
    peer = randomize_norms(getattr(torchvision.models, name)().eval())
    with pytest.warns(UserWarning, match="Dropped the checkpoint's classifier"):
        backbone = ResNetBackbone.from_torchvision(peer, out_features=STAGES).eval()
    assert (
        backbone.load_report.is_exact
        and backbone.config.to_dict() == ResNetConfig.from_preset(name, out_features=STAGES, num_labels=1000).to_dict()
    )
    with torch.no_grad():
        expected = list(torchvision_features(peer)(images).values())
        actual = backbone(images).feature_maps
    for mine, reference in zip(actual, expected, strict=True):
        assert max_abs_diff(mine, reference) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "resnet50d"])
def test_timm_weights_give_identical_features(name, images):
    peer = randomize_norms(timm.create_model(name).eval())
    with pytest.warns(UserWarning, match="Dropped the checkpoint's classifier"):
        backbone = ResNetBackbone.from_timm(peer, out_features=STAGES).eval()
    assert backbone.load_report.is_exact and backbone.config.avg_down == name.endswith("d")
    features = timm.create_model(name, features_only=True, out_indices=(1, 2, 3, 4)).eval()
    features.load_state_dict(peer.state_dict(), strict=False)
    with torch.no_grad():
        for mine, reference in zip(backbone(images).feature_maps, features(images), strict=True):
            assert max_abs_diff(mine, reference) <= 1e-5


@pytest.mark.slow
def test_timm_resnet18_family_and_classifier_logits(images):
    peer = randomize_norms(timm.create_model("resnet18", num_classes=7).eval())
    classifier = ResNetForImageClassification.from_timm(peer).eval()
    assert classifier.config.num_labels == 7
    with torch.no_grad():
        assert max_abs_diff(classifier(images).logits, peer(images)) <= 1e-5


@pytest.mark.parametrize("name", list(PRESETS))
def test_the_architecture_of_every_peer_checkpoint_is_inferred(name):
    with torch.device("meta"):
        peer = getattr(torchvision.models, name)() if hasattr(torchvision.models, name) else timm.create_model(name)
    assert infer_config(peer.state_dict()) == ResNetConfig.from_preset(name, num_labels=1000)


def test_the_architecture_of_a_transformers_checkpoint_is_inferred():
    theirs = transformers.ResNetForImageClassification(transformers.ResNetConfig(**TINY_BASIC, num_labels=5))
    config = infer_config(theirs.state_dict())
    assert config == ResNetConfig(**TINY_BASIC, num_labels=5)


# ---------------------------------------------------------------- export back


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", slow_param("resnext50_32x4d")])
def test_torchvision_loads_our_export_strictly_and_agrees(name, images):
    ours = randomize_norms(ResNetForImageClassification.from_preset(name, num_labels=10).eval())
    peer = getattr(torchvision.models, name)(num_classes=10).eval()
    peer.load_state_dict(ours.to_torchvision_state_dict(), strict=True)
    backbone = randomize_norms(ResNetBackbone.from_preset(name, out_features=["stage1", "stage2"]).eval(), seed=3)
    features = IntermediateLayerGetter(getattr(torchvision.models, name)(), {"layer1": "1", "layer2": "2"}).eval()
    features.load_state_dict(backbone.to_torchvision_state_dict(), strict=True)
    with torch.no_grad():
        assert max_abs_diff(ours(images).logits, peer(images)) <= 1e-5
        for mine, reference in zip(backbone(images).feature_maps, features(images).values(), strict=True):
            assert max_abs_diff(mine, reference) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50d", "resnet18"])
def test_timm_loads_our_export_strictly_and_agrees(name, images):
    ours = randomize_norms(ResNetModel.from_preset(name).eval())
    peer = timm.create_model(name, num_classes=0).eval()
    peer.load_state_dict(ours.to_timm_state_dict(), strict=True)
    with torch.no_grad():
        assert max_abs_diff(ours(images).pooler_output.flatten(1), peer(images)) <= 1e-5


@pytest.mark.slow
def test_frozen_norms_export_with_the_keys_batch_norm_expects():
    frozen = ResNetBackbone.from_preset("resnet18", norm_layer="frozen_batch")
    torchvision_features(torchvision.models.resnet18()).load_state_dict(frozen.to_torchvision_state_dict())


@pytest.mark.parametrize(
    ("overrides", "library", "message"),
    [
        (dict(stem_type="deep"), "torchvision", "deep stem"),
        slow_param(dict(downsample_in_bottleneck=True), "timm", "downsample_in_bottleneck"),
        slow_param(dict(hidden_act="gelu"), "torchvision", "hidden_act"),
        slow_param(TINY_BOTTLENECK, "torchvision", "hidden_sizes"),
    ],
)
def test_export_refuses_what_the_peer_cannot_represent(overrides, library, message):
    with pytest.raises(ValueError, match=message):
        getattr(ResNetBackbone(**overrides), f"to_{library}_state_dict")()


# ---------------------------------------------------------------- transformers round trips


@pytest.mark.parametrize(
    ("ours_class", "theirs_class", "fields"),
    [
        (ResNetBackbone, transformers.ResNetBackbone, dict(TINY_BOTTLENECK, out_features=["stage1", "stage4"])),
        (ResNetModel, transformers.ResNetModel, TINY_BASIC),
        (ResNetForImageClassification, transformers.ResNetForImageClassification, dict(TINY_BASIC, num_labels=3)),
    ],
    ids=["backbone", "model", "classifier"],
)
def test_transformers_round_trip_both_ways(ours_class, theirs_class, fields, tmp_path, images):
    ours = randomize_norms(ours_class(**fields).eval())
    ours.save_pretrained(tmp_path / "ours")
    theirs_loaded = theirs_class.from_pretrained(tmp_path / "ours").eval()

    theirs = randomize_norms(theirs_class(transformers.ResNetConfig(**fields)).eval(), seed=5)
    theirs.save_pretrained(tmp_path / "theirs")
    ours_loaded = ours_class.from_pretrained(tmp_path / "theirs").eval()
    assert ours_loaded.load_report.is_exact
    with torch.no_grad():
        for mine, reference in [(ours(images), theirs_loaded(images)), (ours_loaded(images), theirs(images))]:
            for a, b in zip(mine.to_tuple(), reference.to_tuple(), strict=True):
                for x, y in zip(a if isinstance(a, tuple) else [a], b if isinstance(b, tuple) else [b], strict=True):
                    assert max_abs_diff(x, y) <= 1e-5


@pytest.mark.parametrize(
    "extension",
    [dict(groups=2, width_per_group=32), dict(stem_type="deep"), dict(avg_down=True), dict(output_stride=16),
     dict(norm_layer="group"), dict(hidden_act="selu")],
    ids=["groups", "deep-stem", "avg_down", "output_stride", "group-norm", "selu"],
)  # fmt: skip
def test_transformers_refuses_a_checkpoint_that_uses_our_extensions(extension, tmp_path):
    fields = dict(TINY_BOTTLENECK, embedding_size=64, hidden_sizes=[128, 256, 384, 512], **extension)
    ResNetBackbone(**fields).save_pretrained(tmp_path)
    with pytest.raises(Exception, match="layer_type"):
        transformers.ResNetBackbone.from_pretrained(tmp_path)
    reloaded = ResNetBackbone.from_pretrained(tmp_path)
    assert reloaded.config == ResNetConfig(**fields, architectures=["ResNetBackbone"])


def test_training_only_options_stay_loadable_in_transformers(tmp_path, images):
    ours = randomize_norms(ResNetModel(**TINY_BASIC, freeze_at=2, norm_eval=True, drop_path_rate=0.1).eval())
    ours.save_pretrained(tmp_path)
    theirs = transformers.ResNetModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert max_abs_diff(ours(images).last_hidden_state, theirs(images).last_hidden_state) <= 1e-5
