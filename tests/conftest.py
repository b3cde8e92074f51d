"""Shared fixtures: peer models with random weights and randomised norm statistics."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

# Each xdist worker gets one core: torch's own threads would otherwise fight over the two.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

ALL_STAGES = ["stem", "stage1", "stage2", "stage3", "stage4"]

# Small architectures that still exercise every stage (and its first-block shortcut).
TINY_BOTTLENECK = dict(embedding_size=32, hidden_sizes=[64, 128, 192, 256], depths=[1, 2, 1, 1])
TINY_BASIC = dict(layer_type="basic", embedding_size=32, hidden_sizes=[32, 48, 64, 96], depths=[1, 1, 2, 1])


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics, so parity tests cannot pass
    by accident on the identity-like defaults."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) or hasattr(module, "running_var"):
                size = module.running_mean.shape
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.2)
    return model


def max_abs_diff(first: torch.Tensor, second: torch.Tensor) -> float:
    assert first.shape == second.shape, f"shapes differ: {tuple(first.shape)} vs {tuple(second.shape)}"
    return (first.float() - second.float()).abs().max().item()


@pytest.fixture
def images() -> torch.Tensor:
    """A batch of two odd-sized images, so rounding in strides and pooling shows up."""
    return torch.randn(2, 3, 97, 130, generator=torch.Generator().manual_seed(1))
