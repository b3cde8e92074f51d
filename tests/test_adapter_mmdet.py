"""The OpenMMLab adapter with mmengine alone (CI): registration, mmdet's arguments and errors, mmdet's keys,
init_cfg. Parity with mmdet's and mmseg's own ResNet lives in test_adapter_mmdet_frameworks.py."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torchvision
from helpers import max_abs_diff, randomize_norms
from mmengine.config import Config
from mmengine.registry import MODELS
from torch import nn

import resnet_backbone.adapters.mmdet as mmdet_adapter
from resnet_backbone import CheckpointMismatchError, ResNetBackbone
from resnet_backbone.adapters.mmdet import RBResNet

# mmdet's architectures at a quarter of their widths: the same keys and structure, a fraction of the time.
NARROW = dict(base_channels=16)


@pytest.fixture
def small_images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))


class Detector(nn.Module):
    """The shape of an mmdet detector's state dict: ``backbone.*`` next to other parts."""

    def __init__(self, **backbone: object) -> None:
        super().__init__()
        self.backbone = MODELS.build(dict(type="RBResNet", **backbone))
        self.neck = nn.Conv2d(3, 4, 1)


def test_the_issues_config_builds_with_mmdets_channels_strides_and_frozen_parameters(small_images):
    backbone = MODELS.build(dict(type="RBResNet", depth=50, out_indices=(0, 1, 2, 3), frozen_stages=1, norm_eval=True))
    backbone.train()
    features = backbone(small_images)
    assert [f.shape[1] for f in features] == [256, 512, 1024, 2048] == backbone.channels
    assert [32 // f.shape[2] for f in features] == [4, 8, 16, 32] == backbone.strides
    # mmdet's frozen_stages=1: the stem (conv1, bn1) and layer1, under the names of mmdet's checkpoints.
    parameters = {k: v for k, v in backbone.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)}
    frozen = {key for key, parameter in parameters.items() if not parameter.requires_grad}
    assert frozen == {key for key in parameters if key.startswith(("conv1.", "bn1.", "layer1."))}
    # norm_eval: every BatchNorm stays in eval mode while training.
    assert not any(m.training for m in backbone.modules() if isinstance(m, nn.BatchNorm2d))


def test_custom_imports_in_a_config_registers_it(tmp_path, monkeypatch):
    """A fresh import (as mmengine's ``custom_imports`` does it) registers RBResNet, and importing again is fine."""
    monkeypatch.delitem(MODELS._module_dict, "RBResNet")
    monkeypatch.delitem(sys.modules, "resnet_backbone.adapters.mmdet")
    config_file = tmp_path / "config.py"
    config_file.write_text(
        'custom_imports = dict(imports=["resnet_backbone.adapters.mmdet"], allow_failed_imports=False)\n'
        'model = dict(type="RBResNet", depth=18, out_indices=(1, 3))\n'
    )
    backbone = MODELS.build(Config.fromfile(str(config_file)).model)
    assert type(backbone).__name__ == "RBResNet" and backbone.channels == [128, 512]
    importlib.reload(sys.modules["resnet_backbone.adapters.mmdet"])
    assert MODELS.get("RBResNet") is sys.modules["resnet_backbone.adapters.mmdet"].RBResNet


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        (dict(depth=42), ValueError, "depth must be one of 18, 34, 50, 101, 152"),
        (dict(depth=50, style="caffe"), ValueError, "stride in the 3x3 conv"),
        (dict(depth=50, dcn=dict(type="DCNv2", deform_groups=1)), ValueError, "deformable convolutions"),
        (dict(depth=50, plugins=[dict(cfg=dict(type="ContextBlock"))]), ValueError, "plugins"),
        (dict(depth=50, out_indices=(0, 4)), ValueError, "from 0 to 3"),
        (dict(depth=50, num_stages=3, out_indices=(0, 1, 2, 3)), ValueError, r"from 0 to 2 \(num_stages=3"),
        (dict(depth=50, frozen_stages=5), ValueError, "frozen_stages must be between -1"),
        (dict(depth=50, norm_cfg=dict(type="LN")), ValueError, "norm_cfg type must be one of BN"),
        (dict(depth=50, norm_cfg=dict(type="GN", num_groups=16)), ValueError, "num_groups=32"),
        (dict(depth=50, strides=(1, 2, 2, 1), dilations=(1, 1, 2, 2)), ValueError, "cannot be built"),
        (dict(depth=18, groups=32), ValueError, "needs a bottleneck depth"),
        (dict(depth=50, preset="resnet50d"), ValueError, "not both"),
        (dict(depth=50, init_cfg=dict(type="Kaiming")), ValueError, "type='Pretrained'"),
        (dict(depth=50, out_indice=(0,)), TypeError, "Did you mean 'out_indices'"),
    ],
)
def test_bad_arguments_say_what_was_expected(arguments, error, message):
    with pytest.raises(error, match=message):
        MODELS.build(dict(type="RBResNet", **arguments))


def test_unsupported_options_at_their_defaults_are_accepted():
    """mmdet's configs spell out dcn=None and the like; only a real request is refused."""
    MODELS.build(dict(type="RBResNet", depth=18, dcn=None, stage_with_dcn=(False,) * 4, plugins=None, conv_cfg=None))


@pytest.mark.parametrize(
    ("arguments", "keys"),
    [
        (
            dict(depth=18, **NARROW),
            ["conv1.weight", "bn1.running_var", "layer2.0.downsample.0.weight", "layer4.1.bn2.bias"],
        ),
        (
            dict(depth=50, deep_stem=True, avg_down=True, **NARROW),  # mmdet's ResNetV1d
            ["stem.0.weight", "stem.1.weight", "stem.3.weight", "stem.7.running_mean", "layer2.0.downsample.1.weight"],
        ),
        (
            dict(depth=50, base_channels=32, norm_cfg=dict(type="GN", num_groups=32)),
            ["gn1.weight", "layer1.0.gn3.bias"],
        ),
    ],
)
def test_state_dict_speaks_mmdets_keys_and_loads_them_strictly(arguments, keys, small_images):
    source = randomize_norms(Detector(**arguments)).eval()
    state_dict = source.state_dict()
    assert all(f"backbone.{key}" in state_dict for key in keys)
    assert not any(".trunk." in key or "embedder" in key for key in state_dict)
    target = Detector(**arguments).eval()
    target.load_state_dict(state_dict, strict=True)
    for expected, actual in zip(source.backbone(small_images), target.backbone(small_images)):
        assert max_abs_diff(expected, actual) == 0


def test_mmengines_load_checkpoint_reads_a_detector_checkpoint(tmp_path, small_images):
    from mmengine.runner.checkpoint import load_checkpoint  # mmengine's runner takes seconds to import

    source = randomize_norms(Detector(depth=18, **NARROW)).eval()
    path = tmp_path / "epoch_12.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": source.state_dict()}, path)
    target = Detector(depth=18, **NARROW).eval()
    load_checkpoint(target, str(path), map_location="cpu", strict=True)
    assert max_abs_diff(source.backbone(small_images)[-1], target.backbone(small_images)[-1]) == 0


def test_a_missing_key_is_reported_under_mmdets_name():
    state_dict = Detector(depth=18, **NARROW).state_dict()
    del state_dict["backbone.layer1.0.conv1.weight"]
    state_dict["backbone.layer9.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as raised:
        Detector(depth=18, **NARROW).load_state_dict(state_dict, strict=True)
    assert '"backbone.layer1.0.conv1.weight"' in str(raised.value)
    assert '"backbone.layer9.weight"' in str(raised.value) and "trunk" not in str(raised.value)


@pytest.mark.slow
def test_init_cfg_loads_torchvision_weights_from_torch_home(tmp_path, monkeypatch, small_images):
    """``torchvision://resnet18`` as mmdet reads it (mmengine's URL table, torch's hub cache), offline."""
    from mmengine.runner.checkpoint import get_torchvision_models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = randomize_norms(torchvision.models.resnet18()).eval()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / get_torchvision_models()["resnet18"].rsplit("/", 1)[1])
    backbone = MODELS.build(
        dict(type="RBResNet", depth=18, init_cfg=dict(type="Pretrained", checkpoint="torchvision://resnet18"))
    )
    backbone.init_weights()
    assert backbone.load_report.is_exact and len(backbone.load_report.dropped_classifier_keys) == 2  # fc
    backbone.eval()
    hidden_state = reference.maxpool(reference.relu(reference.bn1(reference.conv1(small_images))))
    for layer, feature in zip(
        [reference.layer1, reference.layer2, reference.layer3, reference.layer4], backbone(small_images)
    ):
        hidden_state = layer(hidden_state)
        assert max_abs_diff(hidden_state, feature) < 1e-5


def test_init_cfg_takes_a_detector_checkpoint_with_its_prefix(tmp_path, small_images):
    arguments = dict(depth=50, deep_stem=True, avg_down=True, num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1))
    arguments.update(out_indices=(2,), **NARROW)
    source = randomize_norms(Detector(**arguments))
    path = tmp_path / "detector.pth"
    torch.save({"meta": {}, "state_dict": source.state_dict()}, path)
    with pytest.raises(CheckpointMismatchError, match="neck.weight"):
        RBResNet(**arguments, init_cfg=dict(type="Pretrained", checkpoint=str(path))).init_weights()
    backbone = RBResNet(**arguments, init_cfg=dict(type="Pretrained", checkpoint=str(path), prefix="backbone."))
    backbone.init_weights()
    assert backbone.load_report.source_layout == "mmdet/mmseg" and backbone.load_report.is_exact
    expected, actual = source.backbone.eval()(small_images), backbone.eval()(small_images)
    assert max_abs_diff(expected[0], actual[0]) == 0


def test_pretrained_takes_what_from_pretrained_takes(tmp_path, small_images):
    saved = randomize_norms(ResNetBackbone.from_preset("resnet18", embedding_size=16, hidden_sizes=[16, 32, 64, 128]))
    saved.eval().save_pretrained(tmp_path / "checkpoint")
    backbone = RBResNet(depth=18, pretrained=str(tmp_path / "checkpoint"), out_indices=(3,), **NARROW)
    backbone.init_weights()
    assert backbone.load_report.source_layout == "transformers"
    assert max_abs_diff(saved(small_images).feature_maps[-1], backbone.eval()(small_images)[0]) == 0


def test_norm_cfg_requires_grad_false_with_cp_and_zero_init_residual(small_images):
    backbone = RBResNet(depth=50, norm_cfg=dict(type="BN", requires_grad=False), with_cp=True, **NARROW)
    parameters = {k: v for k, v in backbone.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)}
    norm_keys = {key for key in parameters if ".bn" in key or key.startswith("bn") or ".downsample.1." in key}
    assert {key for key, p in parameters.items() if not p.requires_grad} == norm_keys
    assert all(parameters[f"layer{s}.0.bn3.weight"].eq(0).all() for s in range(1, 5))  # mmdet's default
    assert not RBResNet(depth=50, zero_init_residual=False, **NARROW).state_dict()["layer1.0.bn3.weight"].eq(0).any()
    backbone.train()
    reference = RBResNet(depth=50, norm_cfg=dict(type="BN", requires_grad=False), **NARROW).train()
    reference.load_state_dict(backbone.state_dict())
    image = small_images.requires_grad_()
    expected = reference(image)[-1].sum()
    (gradient,) = torch.autograd.grad(backbone(image)[-1].sum(), image)
    (reference_gradient,) = torch.autograd.grad(expected, image)
    assert max_abs_diff(gradient, reference_gradient) < 1e-4  # checkpointing recomputes the same function


@pytest.mark.parametrize(
    ("arguments", "strides", "keys"),
    [
        (dict(preset="resnet50d"), [4, 8, 16, 32], ["stem.0.weight", "layer3.0.downsample.1.weight"]),
        (dict(depth=50, output_stride=8), [4, 8, 8, 8], ["conv1.weight"]),
        (dict(depth=50, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2)), [4, 8, 16, 16], ["conv1.weight"]),
        (dict(depth=50, groups=4, base_width=4), [4, 8, 16, 32], ["layer1.0.conv2.weight"]),
    ],
)
def test_presets_dilation_and_resnext(arguments, strides, keys):
    backbone = RBResNet(**arguments) if "preset" in arguments else RBResNet(**arguments, **NARROW)
    assert backbone.strides == strides and all(key in backbone.state_dict() for key in keys)


def test_syncbn_builds_sync_batch_norms():
    backbone = RBResNet(depth=18, norm_cfg=dict(type="SyncBN", requires_grad=True), norm_eval=False, **NARROW)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in backbone.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in backbone.modules())


def test_registered_in_mmengines_root_registry():
    assert MODELS.get("RBResNet") is mmdet_adapter.RBResNet
