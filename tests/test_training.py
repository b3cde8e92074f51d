"""Fine-tuning at scale: the train entry point, resuming, DDP under torchrun, SyncBatchNorm conversion."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import TINY_BASIC
from torch import nn

from resnet_backbone import ResNetBackbone, ResNetConfig, compile_for_training
from resnet_backbone.cli.main import main
from resnet_backbone.distributed import convert_sync_batchnorm

TINY_RUN = ["--train-images", "16", "--image-size", "64", "--batch-size", "4", "--precision", "fp32"]


def _losses(directory) -> list[float]:
    return [json.loads(line)["loss"] for line in (directory / "losses.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_resumed_run_continues_the_loss_curve_exactly(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(["train", *TINY_RUN, "--steps", "6", "--output-dir", str(straight)]) == 0
    assert main(["train", *TINY_RUN, "--steps", "6", "--output-dir", str(interrupted), "--stop-at-step", "3"]) == 0
    assert len(_losses(interrupted)) == 3
    assert main(["train", *TINY_RUN, "--steps", "6", "--output-dir", str(interrupted), "--resume"]) == 0
    assert _losses(interrupted) == _losses(straight)
    assert len(set(_losses(straight))) == 6  # the loss really changes from step to step
    backbone = ResNetBackbone.from_pretrained(straight / "backbone")
    assert backbone.out_features == ["stage2", "stage3", "stage4"]  # FCOS's levels


def test_resume_without_a_checkpoint_and_sync_bn_on_cpu_are_clear_errors(tmp_path, capsys):
    assert main(["train", *TINY_RUN, "--steps", "2", "--output-dir", str(tmp_path), "--resume"]) == 2
    assert "--resume needs a checkpoint" in capsys.readouterr().err
    assert main(["train", *TINY_RUN, "--steps", "2", "--output-dir", str(tmp_path), "--sync-bn"]) == 2
    assert "torch has no CPU implementation" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_under_torchrun_keeps_both_ranks_identical(tmp_path):
    command = [
        shutil.which("torchrun"), "--standalone", "--nproc_per_node=2", "-m", "resnet_backbone.cli", "train", *TINY_RUN,
        "--batch-size", "2", "--steps", "3", "--out-features", "stage2", "stage3", "--trainable-layers", "4",
        "--output-dir", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "training 3 steps on 2 process(es)" in result.stdout
    digests = re.search(r"parameter digests per rank: \['(\w+)', '(\w+)'\] \(identical\)", result.stdout)
    assert digests and digests[1] == digests[2]
    assert "find_unused_parameters" not in result.stderr and len(_losses(tmp_path)) == 3
    backbone = ResNetBackbone.from_pretrained(tmp_path / "backbone")
    assert backbone.out_features == ["stage2", "stage3"] and len(backbone.encoder.stages) == 3


# ---------------------------------------------------------------- SyncBatchNorm


def test_sync_batchnorm_conversion_leaves_frozen_stages_frozen():
    backbone = ResNetBackbone(**TINY_BASIC, freeze_at=2).train()
    head = nn.Sequential(nn.Conv2d(96, 8, 1), nn.BatchNorm2d(8))
    model = convert_sync_batchnorm(nn.ModuleDict({"backbone": backbone, "head": head}))
    frozen, trainable = backbone.stage_modules()[:2], backbone.stage_modules()[2:]

    def norms(modules):
        return [m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    assert norms(frozen) and not any(isinstance(m, nn.SyncBatchNorm) for m in norms(frozen))
    assert norms(trainable) and all(isinstance(m, nn.SyncBatchNorm) for m in norms(trainable))
    assert isinstance(model["head"][1], nn.SyncBatchNorm)
    model.train()
    assert not any(m.training for m in norms(frozen)) and all(m.training for m in norms(trainable))
    assert not any(p.requires_grad for m in frozen for p in m.parameters())


def test_frozen_batch_norm_is_never_converted():
    backbone = ResNetBackbone(**TINY_BASIC, norm_layer="frozen_batch")
    convert_sync_batchnorm(backbone)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in backbone.modules())


def test_contradictory_norm_settings_warn():
    with pytest.warns(UserWarning, match="never synchronised"):
        ResNetConfig(norm_layer="sync_batch", norm_eval=True)
    with pytest.warns(UserWarning, match="never synchronised"):
        convert_sync_batchnorm(ResNetBackbone(**TINY_BASIC, norm_eval=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ResNetConfig(norm_layer="sync_batch")


@pytest.mark.slow
def test_the_module_entry_point_runs_as_a_script(tmp_path):
    command = [
        sys.executable,
        "-m",
        "resnet_backbone.cli",
        "train",
        *TINY_RUN,
        "--steps",
        "1",
        "--output-dir",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training 1 steps on 1 process(es)" in result.stdout and torch.load(tmp_path / "checkpoint.pt")["step"] == 1


@pytest.mark.slow
def test_segmentation_trains_an_smp_model_whose_encoder_starts_from_given_weights(tmp_path):
    start = ResNetBackbone.from_preset("resnet18")
    start.save_pretrained(tmp_path / "start")
    args = [*TINY_RUN, "--task", "segmentation", "--segmenter", "fpn", "--steps", "1", "--lr", "0"]
    assert main(["train", *args, "--weights", str(tmp_path / "start"), "--output-dir", str(tmp_path / "run")]) == 0
    assert len(_losses(tmp_path / "run")) == 1
    trained = ResNetBackbone.from_pretrained(tmp_path / "run" / "backbone").state_dict()
    convolutions = [key for key in trained if key.endswith("convolution.weight")]
    assert convolutions and all(torch.equal(trained[key], start.state_dict()[key]) for key in convolutions)


@pytest.mark.slow
def test_compiled_fine_tuning_step_gives_the_eager_loss_and_keeps_frozen_parameters_frozen():
    """compile_for_training (train --compile) on a small conv-BN net with a frozen first convolution: the
    same first loss and update as eager, and the frozen weights get no gradient and do not move."""
    eager = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    eager[0].requires_grad_(False)
    frozen_weight = eager[0].weight.clone()
    compiled = copy.deepcopy(eager)
    compile_for_training(compiled)
    assert compiled[3].weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 16, 16)
    losses = []
    for model in (eager, compiled):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        loss = model(images).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        assert model[0].weight.grad is None and torch.equal(model[0].weight, frozen_weight)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for trained, reference in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(trained, reference, rtol=1e-4, atol=1e-6)
