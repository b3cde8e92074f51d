"""RBResNet against mmdet's and mmseg's own ResNets and inside their detectors and segmenters.

These need mmdet and mmseg, which need mmcv's compiled ops; CI has neither (see the skip reason), so they
run in an environment built by the README's OpenMMLab recipe.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch
from helpers import randomize_norms
from torch import nn

RECIPE = (
    "needs mmdet 3.3 and mmseg 1.2 with mmcv 2.1's compiled ops, built as the README's OpenMMLab section says: "
    'pip install "torch==2.13.0,!=2.13.0+cpu" torchvision==0.28.0 mmengine==0.10.7; pip install "setuptools<70" '
    "wheel; MMCV_WITH_OPS=1 pip install --no-build-isolation mmcv==2.1.0; pip install mmdet==3.3.0 "
    "mmsegmentation==1.2.2"
)
try:
    import mmdet
    import mmseg
    from mmcv.ops import nms  # noqa: F401  (mmdet's detectors need the compiled ops)
except ImportError:
    pytest.skip(RECIPE, allow_module_level=True)

from mmcv.cnn import fuse_conv_bn  # noqa: E402
from mmdet.models.backbones import ResNet, ResNetV1d, ResNeXt  # noqa: E402
from mmdet.registry import MODELS as MMDET_MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.runner.checkpoint import load_checkpoint  # noqa: E402
from mmengine.structures import InstanceData, PixelData  # noqa: E402
from mmseg.models.backbones import ResNetV1c  # noqa: E402
from mmseg.models.backbones import ResNetV1d as SegResNetV1d  # noqa: E402
from mmseg.registry import MODELS as MMSEG_MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

from resnet_backbone.adapters.mmdet import RBResNet  # noqa: E402

MMDET_CONFIGS = Path(mmdet.__file__).parent / ".mim" / "configs"
MMSEG_CONFIGS = Path(mmseg.__file__).parent / ".mim" / "configs"
DILATED = dict(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))

# (their backbone, its arguments, RBResNet's arguments): mmdet's, then mmseg's dilated ones.
PARITY_CASES = {
    "r18": (ResNet, dict(depth=18), dict(depth=18)),
    "r50": (ResNet, dict(depth=50), dict(depth=50)),
    "r101": (ResNet, dict(depth=101), dict(depth=101)),
    "r50-v1d": (ResNetV1d, dict(depth=50), dict(depth=50, deep_stem=True, avg_down=True)),
    "x50-32x4d": (ResNeXt, dict(depth=50, groups=32, base_width=4), dict(depth=50, groups=32, base_width=4)),
    "r50-gn": (ResNet, *[dict(depth=50, norm_cfg=dict(type="GN", num_groups=32))] * 2),
    "r50-d8": (ResNet, *[dict(depth=50, **DILATED)] * 2),
    "r50-dc5": (ResNet, *[dict(depth=50, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2))] * 2),
    "r50-v1d-d8": (ResNetV1d, dict(depth=50, **DILATED), dict(depth=50, deep_stem=True, avg_down=True, **DILATED)),
    "seg-r50-v1c-d8": (
        ResNetV1c,
        dict(depth=50, contract_dilation=True, **DILATED),
        dict(depth=50, deep_stem=True, contract_dilation=True, **DILATED),
    ),
    "seg-r18-v1c-d8": (
        ResNetV1c,
        dict(depth=18, contract_dilation=True, **DILATED),
        dict(depth=18, deep_stem=True, contract_dilation=True, **DILATED),
    ),
    "seg-r50-v1d-d8": (
        SegResNetV1d,
        dict(depth=50, contract_dilation=True, **DILATED),
        dict(depth=50, deep_stem=True, avg_down=True, contract_dilation=True, **DILATED),
    ),
}


def _flag_by_key(model: nn.Module, flags: dict[int, bool]) -> dict[str, bool]:
    """``flags`` (by parameter identity) under the model's state-dict keys (mmdet's, for both models)."""
    return {key: flags[id(value)] for key, value in model.state_dict(keep_vars=True).items() if id(value) in flags}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_mmdets_backbone_checkpoint_loads_strictly_and_computes_the_same(case):
    their_class, their_arguments, our_arguments = PARITY_CASES[case]
    theirs = randomize_norms(their_class(**their_arguments))
    theirs.eval()  # mmdet's ResNet.train returns None
    ours = RBResNet(**our_arguments).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [name for name, _ in ours.named_parameters()] == [name for name, _ in theirs.named_parameters()]
    assert _modules_with_parameters(ours) == _modules_with_parameters(theirs)
    images = torch.randn(2, 3, 97, 130, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for expected, actual in zip(theirs(images), ours(images), strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def _modules_with_parameters(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]


class _WithBackbone(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone


@pytest.mark.parametrize("case", ["r50", "r50-v1d", "r50-gn", "x50-32x4d"])
def test_paramwise_cfg_gives_rbresnet_the_param_groups_it_gives_mmdets_resnet(case):
    their_class, their_arguments, our_arguments = PARITY_CASES[case]
    stem = "backbone.stem" if "v1d" in case else "backbone.conv1"
    paramwise_cfg = dict(
        custom_keys={
            "backbone.layer4": dict(lr_mult=0.1),
            "backbone.layer2.0.downsample": dict(decay_mult=0.5),
            stem: dict(lr_mult=0.0),
        },
        norm_decay_mult=0.0,
        bias_decay_mult=0.2,
    )
    param_groups = []
    for backbone in (their_class(**their_arguments, frozen_stages=1), RBResNet(**our_arguments, frozen_stages=1)):
        model = _WithBackbone(backbone)
        constructor = DefaultOptimWrapperConstructor(
            dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=1.0, weight_decay=1.0)), paramwise_cfg
        )
        names = {id(parameter): name for name, parameter in model.named_parameters()}
        groups = constructor(model).optimizer.param_groups
        param_groups.append([(names[id(g["params"][0])], g["lr"], g["weight_decay"]) for g in groups])
    assert param_groups[0] == param_groups[1]
    # The keys matched (the stem's is frozen by frozen_stages=1, which mmengine leaves at the base settings).
    assert any(lr == 0.1 for _, lr, _ in param_groups[1]) and any(decay == 0.5 for *_, decay in param_groups[1])


def test_mmcvs_conv_bn_fusion_fuses_the_network_that_runs():
    """mmdet's test script's --fuse-conv-bn replaces each norm by mmdet's name: the trunk runs the fused convs."""
    theirs = randomize_norms(ResNetV1d(depth=50))
    theirs.eval()
    ours = RBResNet(depth=50, deep_stem=True, avg_down=True).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(images)
        fused = fuse_conv_bn(ours)
        assert not any(isinstance(module, _BatchNorm) for module in ours.trunk.modules())
        for expected_map, actual_map in zip(expected, fused(images), strict=True):
            torch.testing.assert_close(actual_map, expected_map, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("their_class", [ResNet, ResNetV1d, ResNeXt, ResNetV1c, SegResNetV1d])
def test_every_argument_of_mmdets_and_mmsegs_resnets_is_taken(their_class):
    """RBResNet takes each argument of their ResNets, at least at its default (others are refused by name)."""
    ours = inspect.signature(RBResNet).parameters
    for cls in their_class.__mro__:
        if issubclass(cls, nn.Module) and cls is not nn.Module and "__init__" in vars(cls):
            for name, parameter in inspect.signature(cls.__init__).parameters.items():
                if name in ours or parameter.default is parameter.empty or parameter.kind is parameter.VAR_KEYWORD:
                    continue
                RBResNet(depth=50, **{name: parameter.default})


@pytest.mark.parametrize("frozen_stages", [-1, 0, 1, 2, 3, 4])
@pytest.mark.parametrize("norm_eval", [False, True])
@pytest.mark.parametrize("deep_stem", [False, True])
def test_train_mode_freezes_what_mmdets_freezes(frozen_stages, norm_eval, deep_stem):
    arguments = dict(depth=18, frozen_stages=frozen_stages, norm_eval=norm_eval, deep_stem=deep_stem)
    theirs, ours = ResNet(**arguments), RBResNet(**arguments)
    for model in (theirs, ours, theirs, ours):
        model.train()  # twice, as a runner may: freezing is not undone
    requires_grad = [
        _flag_by_key(model, {id(p): p.requires_grad for p in model.parameters()}) for model in (theirs, ours)
    ]
    assert requires_grad[0] == requires_grad[1]
    norms_training = [
        _flag_by_key(model, {id(m.weight): m.training for m in model.modules() if isinstance(m, _BatchNorm)})
        for model in (theirs, ours)
    ]
    assert norms_training[0] == norms_training[1]


def test_norm_cfg_requires_grad_false_freezes_as_mmdets():
    arguments = dict(depth=50, frozen_stages=1, norm_cfg=dict(type="BN", requires_grad=False), norm_eval=False)
    theirs, ours = ResNet(**arguments), RBResNet(**arguments).train()
    theirs.train()
    flags = [_flag_by_key(m, {id(p): p.requires_grad for p in m.parameters()}) for m in (theirs, ours)]
    assert flags[0] == flags[1]


def test_registered_in_mmdets_and_mmsegs_registries():
    assert MMDET_MODELS.get("RBResNet") is RBResNet and MMSEG_MODELS.get("RBResNet") is RBResNet


# ---------------------------------------------------------------- whole detectors and segmenters


def _swapped_models(registry, config: Config, our_backbone: dict) -> tuple[nn.Module, nn.Module]:
    """The config's model with its own backbone (random weights and norm statistics) and with RBResNet,
    which loads the first's whole state dict strictly."""
    theirs = registry.build(config.model)
    theirs.init_weights()
    randomize_norms(theirs)
    swapped = copy.deepcopy(config.model)
    swapped.backbone = dict(config.model.backbone, **our_backbone)
    ours = registry.build(swapped)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.eval()
    return theirs, ours.eval()


def _detection_config(name: str) -> Config:
    init_default_scope("mmdet")
    config = Config.fromfile(str(MMDET_CONFIGS / name))
    config.model.backbone.init_cfg = None
    return config


def _detection_batch(with_targets: bool) -> dict:
    image = torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    sample = DetDataSample(metainfo=dict(img_shape=(120, 160), ori_shape=(120, 160), scale_factor=(1.0, 1.0)))
    if with_targets:
        sample.gt_instances = InstanceData(
            bboxes=torch.tensor([[10.0, 20.0, 70.0, 100.0], [80.0, 10.0, 150.0, 60.0]]), labels=torch.tensor([3, 7])
        )
    return dict(inputs=[image], data_samples=[sample])


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", "retinanet/retinanet_r50_fpn_1x_coco.py"]
)
def test_a_detector_with_rbresnet_loads_mmdets_checkpoint_predicts_the_same_and_trains(name, tmp_path):
    config = _detection_config(name)
    theirs, ours = _swapped_models(MMDET_MODELS, config, dict(type="RBResNet"))
    with torch.no_grad():
        (expected,) = theirs.test_step(_detection_batch(with_targets=False))
        (actual,) = ours.test_step(_detection_batch(with_targets=False))
    assert len(expected.pred_instances) > 0
    torch.testing.assert_close(actual.pred_instances.bboxes, expected.pred_instances.bboxes, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(actual.pred_instances.scores, expected.pred_instances.scores, rtol=1e-4, atol=1e-5)
    assert torch.equal(actual.pred_instances.labels, expected.pred_instances.labels)

    # The same checkpoint through mmengine's load_checkpoint, and the backbone's part through init_cfg.
    path = tmp_path / "detector.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": theirs.state_dict()}, path)
    fresh = MMDET_MODELS.build(dict(config.model, backbone=dict(config.model.backbone, type="RBResNet")))
    load_checkpoint(fresh, str(path), map_location="cpu", strict=True)
    arguments = {key: value for key, value in config.model.backbone.items() if key != "type"}
    from_init_cfg = RBResNet(
        **dict(arguments, init_cfg=dict(type="Pretrained", checkpoint=str(path), prefix="backbone."))
    )
    from_init_cfg.init_weights()
    assert from_init_cfg.load_report.is_exact and from_init_cfg.load_report.source_layout == "torchvision/timm"
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for backbone in (fresh.backbone, from_init_cfg):
            for expected_map, actual_map in zip(theirs.backbone(images), backbone.eval()(images), strict=True):
                torch.testing.assert_close(actual_map, expected_map, rtol=1e-5, atol=1e-5)

    # One training step through mmdet's own data preprocessor and losses: finite, and only unfrozen stages move.
    ours.train()
    before = {key: value.clone() for key, value in ours.backbone.state_dict().items()}
    optimizer = OptimWrapper(torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.01))
    losses = ours.train_step(_detection_batch(with_targets=True), optimizer)
    assert all(torch.isfinite(value).all() for value in losses.values())
    after = ours.backbone.state_dict()
    assert torch.equal(after["layer1.0.conv1.weight"], before["layer1.0.conv1.weight"])  # frozen_stages=1
    assert not torch.equal(after["layer2.0.conv1.weight"], before["layer2.0.conv1.weight"])


@pytest.mark.slow
def test_deeplabv3plus_with_rbresnet_loads_mmsegs_checkpoint_predicts_the_same_and_trains():
    init_default_scope("mmseg")
    config = Config.fromfile(
        str(MMSEG_CONFIGS / "deeplabv3plus" / "deeplabv3plus_r50-d8_4xb2-40k_cityscapes-512x1024.py")
    )
    config.model.pretrained = None
    config.model.data_preprocessor.size = (64, 96)  # pad to a small crop instead of 512x1024
    for part in ("backbone", "decode_head", "auxiliary_head"):
        config.model[part].norm_cfg = dict(type="BN", requires_grad=True)  # SyncBN needs a process group
    # mmseg's ResNetV1c is ResNet with the deep stem; its dilation arguments pass through unchanged.
    theirs, ours = _swapped_models(MMSEG_MODELS, config, dict(type="RBResNet", deep_stem=True))
    image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))

    def batch(with_targets: bool) -> dict:
        samples = [SegDataSample(metainfo=dict(img_shape=(64, 96), ori_shape=(64, 96))) for _ in range(2)]
        if with_targets:
            for seed, sample in enumerate(samples):
                labels = torch.randint(0, 19, (1, 64, 96), generator=torch.Generator().manual_seed(seed))
                sample.gt_sem_seg = PixelData(data=labels)
        return dict(inputs=[image, image.flip(-1)], data_samples=samples)  # two: the ASPP pool's BatchNorm

    with torch.no_grad():
        expected_samples = theirs.test_step(batch(with_targets=False))
        actual_samples = ours.test_step(batch(with_targets=False))
    for expected, actual in zip(expected_samples, actual_samples, strict=True):
        torch.testing.assert_close(actual.seg_logits.data, expected.seg_logits.data, rtol=1e-4, atol=1e-4)
        assert torch.equal(actual.pred_sem_seg.data, expected.pred_sem_seg.data)

    ours.train()
    before = ours.backbone.state_dict()["layer4.0.conv2.weight"].clone()
    optimizer = OptimWrapper(torch.optim.SGD(ours.parameters(), lr=0.01))
    losses = ours.train_step(batch(with_targets=True), optimizer)
    assert all(torch.isfinite(value).all() for value in losses.values())
    assert not torch.equal(ours.backbone.state_dict()["layer4.0.conv2.weight"], before)
