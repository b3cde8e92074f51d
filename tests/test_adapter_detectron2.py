"""RBResNet against detectron2's own ResNet, and inside its detectors, configs and checkpoints.

detectron2 is not on the package registry and is built from source; CI does not build it (see the skip
reason), so these run in an environment built by the recipe of docs/detectron2.md.
"""

from __future__ import annotations

import itertools
import pickle
import re

import pytest
import torch
from helpers import randomize_norms, slow_param
from torch import nn

RECIPE = (
    "needs detectron2, built from source as docs/detectron2.md says: unpack its source, "
    'pip install "setuptools>=77,<81", then MAX_JOBS=2 pip install --no-build-isolation <detectron2 folder>'
)
try:
    import detectron2  # noqa: F401
except ImportError:
    pytest.skip(RECIPE, allow_module_level=True)

from detectron2 import model_zoo  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import LazyCall, LazyConfig, get_cfg, instantiate  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec  # noqa: E402
from detectron2.modeling import build_model, build_resnet_backbone  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

from resnet_backbone.adapters.detectron2 import RBResNet, add_rb_resnet_config, build_rb_resnet_backbone  # noqa: E402

ALL_FEATURES = ["stem", "res2", "res3", "res4", "res5"]
# detectron2's ResNet-50 at a quarter of its widths: its keys and structure, a fraction of the time.
NARROW_R50 = dict(STEM_OUT_CHANNELS=16, RES2_OUT_CHANNELS=64, WIDTH_PER_GROUP=16)


def resnets_cfg(freeze_at: int = 0, **resnets: object):
    cfg = get_cfg()
    add_rb_resnet_config(cfg)
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    cfg.MODEL.RESNETS.OUT_FEATURES = ALL_FEATURES
    for key, value in resnets.items():
        cfg.MODEL.RESNETS[key] = value
    return cfg


def both_backbones(cfg) -> tuple[nn.Module, RBResNet]:
    """detectron2's ResNet with random weights and norm statistics, and RBResNet holding its state dict."""
    theirs = randomize_norms(build_resnet_backbone(cfg, ShapeSpec(channels=3)))
    ours = build_rb_resnet_backbone(cfg, ShapeSpec(channels=3))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


PARITY_CASES = {
    "r18": dict(DEPTH=18, RES2_OUT_CHANNELS=64, STEM_OUT_CHANNELS=32),
    "r50-narrow": NARROW_R50,
    "r50-narrow-stride-in-3x3": dict(NARROW_R50, STRIDE_IN_1X1=False),
    "r50-narrow-res5-dilation": dict(NARROW_R50, RES5_DILATION=2),
    "r50-narrow-bn": dict(NARROW_R50, NORM="BN"),
    "r50-narrow-syncbn": dict(NARROW_R50, NORM="SyncBN"),
    "r50-gn": dict(STEM_OUT_CHANNELS=32, RES2_OUT_CHANNELS=128, WIDTH_PER_GROUP=32, NORM="GN"),  # 32 groups
}
FULL_SIZE_CASES = {
    "r50": dict(DEPTH=50),
    "r50-stride-in-3x3": dict(DEPTH=50, STRIDE_IN_1X1=False),
    "r101": dict(DEPTH=101),
    "x101-32x8d": dict(DEPTH=101, NUM_GROUPS=32, WIDTH_PER_GROUP=8),
    "r50-res5-dilation": dict(DEPTH=50, RES5_DILATION=2),
}


@pytest.mark.parametrize(
    "resnets",
    [
        *(pytest.param(case, id=name) for name, case in PARITY_CASES.items()),
        *(slow_param(case, id=name) for name, case in FULL_SIZE_CASES.items()),
    ],
)
def test_rbresnet_computes_detectron2s_resnet(resnets):
    theirs, ours = both_backbones(resnets_cfg(**resnets))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.output_shape() == theirs.output_shape()
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = theirs.eval()(images), ours.eval()(images)
    assert list(actual) == list(expected) == ALL_FEATURES
    for name in ALL_FEATURES:
        assert_parity(actual[name], expected[name])


def assert_parity(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_every_out_features_subset_is_detectron2s():
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for size in range(1, len(ALL_FEATURES) + 1):
        for subset in itertools.combinations(ALL_FEATURES, size):
            theirs, ours = both_backbones(resnets_cfg(**NARROW_R50, OUT_FEATURES=list(subset)))
            assert list(ours.state_dict()) == list(theirs.state_dict()), subset  # the same stages built
            assert ours.output_shape() == theirs.output_shape()
            assert ours.size_divisibility == ours.padding_constraints["size_divisibility"]
            assert ours.size_divisibility == max(shape.stride for shape in theirs.output_shape().values())
            with torch.no_grad():
                expected, actual = theirs.eval()(images), ours.eval()(images)
            assert list(actual) == list(expected) == list(subset)
            for name in subset:
                assert_parity(actual[name], expected[name])


def _modes(backbone: nn.Module) -> tuple[dict, list]:
    """requires_grad of each state-dict tensor (None: a buffer), and each norm's class and train mode."""
    tensors = {
        key: value.requires_grad if isinstance(value, nn.Parameter) else None
        for key, value in backbone.state_dict(keep_vars=True).items()
    }
    norms = [
        (type(module).__name__, module.training if isinstance(module, _BatchNorm) else None)
        for module in backbone.modules()
        if isinstance(module, (_BatchNorm, nn.GroupNorm, FrozenBatchNorm2d))
    ]
    return tensors, norms


@pytest.mark.parametrize("norm", ["BN", "GN"])
def test_freeze_at_freezes_as_detectron2(norm):
    widths = dict(STEM_OUT_CHANNELS=32, RES2_OUT_CHANNELS=128, WIDTH_PER_GROUP=32) if norm == "GN" else NARROW_R50
    for freeze_at in range(6):
        cfg = resnets_cfg(freeze_at, **widths, NORM=norm)
        theirs, ours = both_backbones(cfg)
        theirs.train(), ours.train()
        assert _modes(ours) == _modes(theirs), freeze_at


def _whole_models(config_file: str, backbone_name: str) -> tuple[nn.Module, nn.Module]:
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(config_file))
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    theirs = randomize_norms(build_model(cfg))
    cfg.MODEL.BACKBONE.NAME = backbone_name
    return theirs, build_model(cfg)


def _image_inputs(with_targets: bool, mask: bool = False) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    image = (torch.rand(3, 128, 160, generator=generator) * 255).to(torch.uint8)
    inputs = [{"image": image, "height": 128, "width": 160}]
    if with_targets:
        instances = Instances((128, 160), gt_boxes=Boxes(torch.tensor([[10.0, 20.0, 90.0, 100.0]])))
        instances.gt_classes = torch.tensor([3])
        if mask:
            from detectron2.structures import BitMasks

            masks = torch.zeros(1, 128, 160, dtype=torch.bool)
            masks[0, 20:100, 10:90] = True
            instances.gt_masks = BitMasks(masks)
        inputs[0]["instances"] = instances
    return inputs


class RecordingCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer, keeping what its load found missing, unexpected or mis-shaped (it only logs it)."""

    def _load_model(self, checkpoint: dict) -> object:
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


WHOLE_MODELS = [
    slow_param("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", "build_rb_resnet_fpn_backbone", id="faster-rcnn"),
    slow_param("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", "build_rb_resnet_fpn_backbone", id="mask-rcnn"),
    slow_param("COCO-Detection/retinanet_R_50_FPN_1x.yaml", "build_rb_retinanet_resnet_fpn_backbone", id="retinanet"),
]


@pytest.mark.parametrize(("config_file", "backbone_name"), WHOLE_MODELS)
def test_model_zoo_detector_loads_detectron2s_checkpoint_predicts_the_same_and_trains(
    config_file, backbone_name, tmp_path
):
    theirs, ours = _whole_models(config_file, backbone_name)
    assert isinstance(ours.backbone.bottom_up, RBResNet)
    torch.save({"model": theirs.state_dict()}, tmp_path / "model_final.pth")
    checkpointer = RecordingCheckpointer(ours)
    checkpointer.load(str(tmp_path / "model_final.pth"))
    incompatible = checkpointer.incompatible
    assert (incompatible.missing_keys, incompatible.unexpected_keys, incompatible.incorrect_shapes) == ([], [], [])
    ours.load_state_dict(theirs.state_dict(), strict=True)

    with torch.no_grad():
        expected, actual = theirs.eval()(_image_inputs(False)), ours.eval()(_image_inputs(False))
    for field in ("pred_boxes", "scores", "pred_classes"):
        first, second = (getattr(output["instances"], field) for output in (expected[0], actual[0]))
        first, second = (value.tensor if isinstance(value, Boxes) else value for value in (first, second))
        assert first.shape == second.shape and torch.allclose(first.float(), second.float(), atol=1e-4), field

    ours.train()
    frozen = {k: v.clone() for k, v in ours.state_dict().items() if re.match(r"backbone\.bottom_up\.(stem|res2)\.", k)}
    trainable = ours.backbone.bottom_up.state_dict()["res3.0.conv1.weight"].clone()
    parameters = [parameter for parameter in ours.parameters() if parameter.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.01)
    with EventStorage():  # detectron2's training forward logs into one
        losses = ours(_image_inputs(True, mask="mask" in config_file))
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    after = ours.state_dict()
    assert frozen and all(torch.equal(after[key], value) for key, value in frozen.items())
    assert not torch.equal(ours.backbone.bottom_up.state_dict()["res3.0.conv1.weight"], trainable)


def _caffe2_name(key: str) -> str:
    """The name detectron2's model-zoo .pkl files (Caffe2's) give a ResNet tensor, as c2_model_loading reads it."""
    module, _, parameter = key.rpartition(".")
    suffix = {"weight": "s", "bias": "b"}[parameter] if module.endswith(".norm") else {"weight": "w"}[parameter]
    module = module.removesuffix(".norm")
    if module == "stem.conv1":
        return "res_conv1_bn_" + suffix if key.startswith("stem.conv1.norm") else "conv1_w"
    stage, block, conv = module.split(".")
    branch = {"shortcut": "branch1", "conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c"}[conv]
    return f"{stage}_{block}_{branch}_{'bn_' if key.endswith(('norm.weight', 'norm.bias')) else ''}{suffix}"


@pytest.mark.slow
def test_detectron2s_caffe2_conversion_loads_the_same_tensors(tmp_path):
    theirs, ours = _whole_models("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", "build_rb_resnet_fpn_backbone")
    backbone = randomize_norms(build_resnet_backbone(resnets_cfg(), ShapeSpec(channels=3)))
    blobs = {
        _caffe2_name(key): value.numpy()
        for key, value in backbone.state_dict().items()
        if not key.endswith(("running_mean", "running_var"))
    }
    with (tmp_path / "R-50.pkl").open("wb") as file:
        pickle.dump({"blobs": blobs}, file)
    for model in (theirs, ours):
        DetectionCheckpointer(model).load(str(tmp_path / "R-50.pkl"))
    expected, actual = theirs.backbone.bottom_up.state_dict(), ours.backbone.bottom_up.state_dict()
    assert list(actual) == list(expected)
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
    assert torch.equal(actual["res4.5.conv3.norm.weight"], torch.from_numpy(blobs["res4_5_branch2c_bn_s"]))


@pytest.mark.slow
def test_lazyconfig_mask_rcnn_with_rbresnet_as_bottom_up_predicts_as_detectron2s():
    config = LazyConfig.load(model_zoo.get_config_file("common/models/mask_rcnn_fpn.py"))
    config.model.backbone.bottom_up.freeze_at = 2
    theirs = randomize_norms(instantiate(config.model))
    config.model.backbone.bottom_up = LazyCall(RBResNet)(
        depth=50, out_features=["res2", "res3", "res4", "res5"], norm="FrozenBN", stride_in_1x1=True, freeze_at=2
    )
    ours = instantiate(config.model)
    assert isinstance(ours.backbone.bottom_up, RBResNet)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        expected, actual = theirs.eval()(_image_inputs(False)), ours.eval()(_image_inputs(False))
    assert torch.allclose(actual[0]["instances"].scores, expected[0]["instances"].scores, atol=1e-4)
    assert actual[0]["instances"].pred_masks.shape == expected[0]["instances"].pred_masks.shape


BAD_CONFIGS = {
    "deformable": (dict(DEFORM_ON_PER_STAGE=[False, False, True, True]), "RBResNet has no deformable convolutions"),
    "depth": (dict(DEPTH=42), "DEPTH must be one of 18, 34, 50, 101, 152"),
    "norm close match": (dict(NORM="BNN"), "Did you mean 'BN'?"),
    "norm refused": (dict(NORM="LN"), "LayerNorm over channels"),
    "res5 dilation": (dict(RES5_DILATION=4), "RES5_DILATION must be 1 or 2"),
    "r18 widths": (dict(DEPTH=18), "DEPTH 18 (basic blocks) needs RES2_OUT_CHANNELS=64"),
    "out features": (dict(OUT_FEATURES=["res2", "rex3"]), "Did you mean 'res3'?"),
    "linear": (dict(OUT_FEATURES=["linear"]), "RBResNet has no classifier"),
    "widths": (dict(WIDTH_PER_GROUP=10, RES2_OUT_CHANNELS=192), "WIDTH_PER_GROUP=10 with RES2_OUT_CHANNELS=192"),
}


@pytest.mark.parametrize(("resnets", "message"), BAD_CONFIGS.values(), ids=BAD_CONFIGS)
def test_bad_detectron2_keys_are_refused_clearly(resnets, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_rb_resnet_backbone(resnets_cfg(**resnets), ShapeSpec(channels=3))


def test_bad_keys_beyond_resnets_are_refused_clearly():
    cfg = resnets_cfg(freeze_at=7)
    with pytest.raises(ValueError, match=re.escape("FREEZE_AT (freeze_at) must be 0 (nothing frozen) to 5")):
        build_rb_resnet_backbone(cfg, ShapeSpec(channels=3))
    cfg = resnets_cfg(DEPTH=101)
    cfg.MODEL.RB_RESNET.PRESET = "resnet50"
    with pytest.raises(ValueError, match="PRESET 'resnet50' sets the architecture: leave DEPTH at detectron2's"):
        build_rb_resnet_backbone(cfg, ShapeSpec(channels=3))
    cfg = resnets_cfg(RES5_DILATION=2)
    cfg.MODEL.RB_RESNET.OUTPUT_STRIDE = 8
    with pytest.raises(ValueError, match="Give RES5_DILATION or RB_RESNET.OUTPUT_STRIDE, not both"):
        build_rb_resnet_backbone(cfg, ShapeSpec(channels=3))
    cfg = resnets_cfg()
    cfg.MODEL.RESNETS.RES4_DILATION = 2  # a project's key (DeepLab's), which detectron2's ResNet does not read
    with pytest.raises(ValueError, match=re.escape("MODEL.RESNETS has keys that detectron2's build_resnet_backbone")):
        build_rb_resnet_backbone(cfg, ShapeSpec(channels=3))


def test_rb_resnet_keys_build_what_detectron2s_cannot_say(tmp_path):
    source = RBResNet(preset="resnet18", out_features=ALL_FEATURES)
    torch.save(source.trunk.to_detectron2_state_dict(), tmp_path / "r18.pth")
    cfg = resnets_cfg(freeze_at=1)
    cfg.MODEL.RB_RESNET.PRESET, cfg.MODEL.RB_RESNET.OUTPUT_STRIDE = "resnet18", 32
    cfg.MODEL.RB_RESNET.WEIGHTS = str(tmp_path / "r18.pth")
    ours = build_rb_resnet_backbone(cfg, ShapeSpec(channels=3))
    assert ours.load_report.is_exact and ours.load_report.source_layout == "detectron2"
    written = source.state_dict()
    assert all(torch.equal(value, written[key]) for key, value in ours.state_dict().items())
    assert [shape.channels for shape in ours.output_shape().values()] == [64, 64, 128, 256, 512]
