"""detectron2's ResNet key layout without detectron2 (CI): the names its ``build_resnet_backbone`` gives every
tensor, written out here from detectron2's own naming rules, against the weights package's table, both ways,
and through ``resnet-backbone convert --to detectron2``. Parity with detectron2's own ResNet lives in
test_adapter_detectron2.py."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_BASIC, TINY_BOTTLENECK, randomize_norms

from resnet_backbone import ResNetConfig, ResNetModel
from resnet_backbone.cli.main import main
from resnet_backbone.weights import export_problems, load_checkpoint, read_state_dict, to_canonical

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def detectron2_keys(config: ResNetConfig) -> list[str]:
    """detectron2's names: ``stem.conv1`` with its ``norm``; each stage ``res{2..5}`` a Sequential of blocks
    with ``conv1``..``conv3`` (``conv1``, ``conv2`` for basic blocks) and, where channels change, ``shortcut``,
    each a Conv2d with a nested ``norm``; a block registers ``shortcut`` before its convs."""
    convs = 3 if config.layer_type == "bottleneck" else 2
    modules = ["stem.conv1"]
    in_channels = config.embedding_size
    for stage, (depth, channels) in enumerate(zip(config.depths, config.hidden_sizes), start=2):
        for block in range(depth):
            if block == 0 and in_channels != channels:
                modules.append(f"res{stage}.{block}.shortcut")
            modules += [f"res{stage}.{block}.conv{conv}" for conv in range(1, convs + 1)]
        in_channels = channels
    return [key for module in modules for key in (f"{module}.weight", *(f"{module}.norm.{name}" for name in BN))]


@pytest.mark.parametrize("architecture", [TINY_BASIC | dict(hidden_sizes=[64, 128, 256, 512]), TINY_BOTTLENECK])
def test_detectron2_keys_are_detectron2_names_and_load_back(architecture):
    model = randomize_norms(ResNetModel(**architecture))
    keys = model.to_detectron2_state_dict()
    assert sorted(keys) == sorted(detectron2_keys(model.config))
    canonical, layout = to_canonical({f"backbone.bottom_up.{key}": value for key, value in keys.items()})
    assert layout.naming == "detectron2"
    assert all(torch.equal(canonical[key], value) for key, value in model.state_dict().items())
    report = load_checkpoint(ResNetModel(**architecture), keys)
    assert report.is_exact and report.source_layout == "detectron2"


def test_detectron2_cannot_hold_what_its_resnet_does_not_build():
    dilated = ResNetConfig(**TINY_BOTTLENECK, output_stride=8)
    assert export_problems(dilated, "detectron2") == []  # its BottleneckBlock takes any dilation
    refused = {
        "the deep stem and avg_down": ResNetConfig.from_preset("resnet50d"),
        "hidden_act='gelu'": ResNetConfig(**TINY_BOTTLENECK, hidden_act="gelu"),
        "BasicBlock has no dilation": ResNetConfig(**TINY_BASIC, output_stride=16),
    }
    for expected, config in refused.items():
        assert any(expected in problem for problem in export_problems(config, "detectron2")), expected
    with pytest.raises(ValueError, match="detectron2 cannot represent this model: the deep stem"):
        ResNetModel.from_preset("resnet50d").to_detectron2_state_dict()


def test_convert_to_detectron2_writes_its_keys_and_refuses_them_as_a_source(tmp_path, capsys):
    model = randomize_norms(ResNetModel(**TINY_BASIC | dict(hidden_sizes=[64, 128, 256, 512])))
    model.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "d2.pth"), "--to", "detectron2"]) == 0
    assert "(hf -> detectron2)" in capsys.readouterr().out
    written = read_state_dict(tmp_path / "d2.pth")
    assert sorted(written) == sorted(detectron2_keys(model.config))
    assert all(torch.equal(written[key], value) for key, value in model.to_detectron2_state_dict().items())

    assert main(["convert", str(tmp_path / "d2.pth"), str(tmp_path / "back")]) == 2
    error = capsys.readouterr().err
    assert "holds detectron2 keys (stem.conv1.*, res2.*)" in error and error.count("\n") == 1
    assert not (tmp_path / "back").exists()
