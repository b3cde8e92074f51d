"""The OpenMMLab adapter with mmengine alone (CI): registration, mmdet's arguments and errors, mmdet's keys,
init_cfg. Parity with mmdet's and mmseg's own ResNet lives in test_adapter_mmdet_frameworks.py."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import sys

import pytest
import torch
import torchvision
from helpers import max_abs_diff, randomize_norms
from mmengine.config import Config
from mmengine.registry import MODELS
from torch import nn

import resnet_backbone.adapters.mmdet as mmdet_adapter
from resnet_backbone import CheckpointMismatchError, ResNetBackbone, ResNetConfig, ResNetTrunk
from resnet_backbone.adapters.mmdet import RBResNet
from resnet_backbone.weights import from_canonical, peer_layout_of

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


def test_a_typical_mmdet_config_builds_with_mmdets_channels_strides_and_frozen_parameters(small_images):
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


# ---------------------------------------------------------------- mmdet's parameter names


@pytest.mark.parametrize(
    "arguments",
    [
        dict(depth=18, **NARROW),
        dict(depth=50, deep_stem=True, avg_down=True, **NARROW),  # mmdet's ResNetV1d
        dict(depth=50, base_channels=32, norm_cfg=dict(type="GN", num_groups=32)),
    ],
)
def test_parameter_and_module_names_are_mmdets(arguments):
    """The names an optimizer's paramwise_cfg sees are the state dict's (mmdet's), from the mmdet layout table."""
    backbone = RBResNet(**arguments)
    names = [name for name, _ in backbone.named_parameters()]
    state_dict = backbone.state_dict(keep_vars=True)
    assert names == [key for key, value in state_dict.items() if isinstance(value, nn.Parameter)]
    ours = dict.fromkeys(name for name, _ in ResNetTrunk(backbone.trunk.config).named_parameters())
    assert sorted(names) == sorted(from_canonical(ours, peer_layout_of(backbone.trunk.config, naming="mmdet")))
    modules = dict(backbone.named_modules())
    assert all(name.rpartition(".")[0] in modules for name in names)
    # mmdet's order: a block's shortcut (downsample) after its main branch, which optimizer state relies on.
    block = [name for name in names if name.startswith("layer2.0.")]
    assert block[-1].startswith("layer2.0.downsample.") and block[0] == "layer2.0.conv1.weight"


@pytest.mark.parametrize(
    ("arguments", "stem_key"),
    [
        (dict(depth=18, **NARROW), "backbone.bn1"),
        (dict(depth=50, deep_stem=True, avg_down=True, **NARROW), "backbone.stem"),
    ],
)
def test_paramwise_cfg_custom_keys_written_for_mmdets_resnet_reach_rbresnets_parameters(arguments, stem_key):
    from mmengine.optim import DefaultOptimWrapperConstructor

    model = Detector(**arguments)
    custom_keys = {
        "backbone.layer4": dict(lr_mult=0.1),
        "backbone.layer2.0.downsample": dict(lr_mult=0.5),
        stem_key: dict(decay_mult=0.0),
    }
    constructor = DefaultOptimWrapperConstructor(
        dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=1.0, weight_decay=1.0)),
        paramwise_cfg=dict(custom_keys=custom_keys),
    )
    groups = constructor(model).optimizer.param_groups
    settings = {id(group["params"][0]): (group["lr"], group["weight_decay"]) for group in groups}
    # The expected parameters come from the network that runs, not from names.
    trunk = model.backbone.trunk
    stem = trunk.embedder.embedder if stem_key == "backbone.stem" else trunk.embedder.embedder.normalization
    expected = {id(p): (1.0, 0.0) for p in stem.parameters()}
    expected.update({id(p): (0.5, 1.0) for p in trunk.encoder.stages[1].layers[0].shortcut.parameters()})
    expected.update({id(p): (0.1, 1.0) for p in trunk.encoder.stages[3].parameters()})
    parameters = dict(model.named_parameters())
    assert {name: settings[id(p)] for name, p in parameters.items()} == {
        name: expected.get(id(p), (1.0, 1.0)) for name, p in parameters.items()
    }


def test_a_module_replaced_under_mmdets_name_is_replaced_in_the_network_that_runs(small_images):
    """mmengine reverts SyncBN in a run without a process group, and its EMA hook deep-copies the model: both go
    through mmdet's names and must reach the trunk, which runs the network."""
    from mmengine.model import revert_sync_batchnorm

    synced = randomize_norms(RBResNet(depth=18, norm_cfg=dict(type="SyncBN"), norm_eval=False, **NARROW)).eval()
    expected = synced(small_images)
    backbone = revert_sync_batchnorm(synced)
    assert not any(isinstance(module, nn.SyncBatchNorm) for module in backbone.trunk.modules())
    copied = copy.deepcopy(backbone)
    assert copied.trunk.embedder.embedder.normalization is copied.bn1 is not backbone.bn1
    for model in (backbone, copied):
        for expected_map, actual_map in zip(expected, model(small_images), strict=True):
            assert max_abs_diff(expected_map, actual_map) == 0
    with pytest.raises(TypeError, match="cannot be replaced"):
        backbone.layer1 = nn.Identity()
    with pytest.raises(TypeError, match="do not run"):
        backbone.layer1.register_forward_hook(lambda *_: None)
    with pytest.raises(TypeError, match="do not run"):
        backbone.layer1(small_images)


def test_norm_eval_keeps_the_norms_that_revert_sync_batchnorm_puts_in_eval_mode():
    """A run without a process group turns SyncBN into mmengine's _BatchNormXd, a BatchNorm of its own class;
    norm_eval must keep it in eval mode as it does mmdet's own norms."""
    from mmengine.model import revert_sync_batchnorm

    backbone = revert_sync_batchnorm(RBResNet(depth=18, norm_cfg=dict(type="SyncBN"), norm_eval=True, **NARROW))
    reverted = [module for module in backbone.modules() if type(module).__name__ == "_BatchNormXd"]
    backbone.train()
    assert reverted and not any(module.training for module in reverted)


# Every RBResNet argument (mmdet's argument table) at a value other than its default, alone or with the arguments it
# needs; the test below requires one for each argument, so a new argument is checked too.
ARGUMENT_PROBES = [
    dict(depth=18),
    dict(in_channels=4),
    dict(stem_channels=32),
    dict(base_channels=32),
    dict(num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1), out_indices=(0, 1, 2)),
    dict(strides=(2, 2, 2, 2)),
    dict(strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2), contract_dilation=True),
    dict(out_indices=(3,), style="pytorch", with_cp=True),  # "caffe" is refused
    dict(deep_stem=True),
    dict(avg_down=True),
    dict(frozen_stages=2),
    dict(base_channels=32, norm_cfg=dict(type="GN", num_groups=32)),
    dict(norm_eval=False),
    dict(zero_init_residual=False),
    dict(groups=4, base_width=4),
    dict(depth=None, base_channels=64, preset="resnet50d"),
    dict(output_stride=8),
    dict(pretrained="weights.pth"),
    dict(init_cfg=dict(type="Pretrained", checkpoint="weights.pth")),
]
# The ResNetConfig fields that no mmdet argument sets, and why.
NOT_MMDET_ARGUMENTS = {
    "hidden_act": "mmdet's ResNet is ReLU only",
    "downsample_in_bottleneck": "style='caffe' (the stride in the first 1x1 conv) is refused",
    "drop_path_rate": "mmdet's ResNet has no stochastic depth",
    **dict.fromkeys(["num_labels", "id2label", "label2id", "problem_type"], "no classifier"),
    **dict.fromkeys(["output_hidden_states", "return_dict", "architectures"], "transformers' outputs and files"),
}


def test_every_resnet_config_field_is_set_by_an_mmdet_argument_or_said_why_not():
    """A field added to ResNetConfig, or an argument added to RBResNet, fails here until it is mapped or listed."""
    parameters = inspect.signature(RBResNet).parameters.values()
    arguments = {parameter.name for parameter in parameters if parameter.kind is not parameter.VAR_KEYWORD}
    assert {name for probe in ARGUMENT_PROBES for name in probe} == arguments

    def fields_of(backbone: RBResNet) -> dict[str, object]:
        return {field.name: getattr(backbone.trunk.config, field.name) for field in dataclasses.fields(ResNetConfig)}

    base = dict(depth=50, **NARROW)
    default = fields_of(RBResNet(**base))
    set_by_arguments = set()
    for probe in ARGUMENT_PROBES:
        changed = fields_of(RBResNet(**{**base, **probe}))
        set_by_arguments |= {name for name, value in changed.items() if value != default[name]}
    assert not set_by_arguments & set(NOT_MMDET_ARGUMENTS)
    assert set_by_arguments | set(NOT_MMDET_ARGUMENTS) == set(default)
