"""Helpers the tests share: peer models with random weights and randomised norm statistics, tiny
architectures, the Hub cache layout, and fresh interpreters."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from resnet_backbone import ResNetConfig
from resnet_backbone.config import FIELD_CHOICES

ALL_STAGES = ["stem", "stage1", "stage2", "stage3", "stage4"]

# Small architectures that still exercise every stage (and its first-block shortcut).
TINY_BOTTLENECK = dict(embedding_size=32, hidden_sizes=[64, 128, 192, 256], depths=[1, 2, 1, 1])
TINY_BASIC = dict(layer_type="basic", embedding_size=32, hidden_sizes=[32, 48, 64, 96], depths=[1, 1, 2, 1])


def non_default_config_values() -> dict[str, Any]:
    """For every ``ResNetConfig`` field, a valid value other than the default config's (valid alone, on top of
    the defaults): tests that loop over it cover a field added later without being edited, and fail, naming
    the field, when no candidate fits it."""
    default = ResNetConfig()
    values = {}
    for field in dataclasses.fields(ResNetConfig):
        current = getattr(default, field.name)
        values[field.name] = next(
            (value for value in _candidate_values(field.name, current) if _changes(field.name, value, current)), None
        )
        assert values[field.name] is not None, f"no valid non-default value of ResNetConfig.{field.name}: add one"
    return values


def _candidate_values(name: str, current: Any) -> Iterator[Any]:
    yield from FIELD_CHOICES.get(name, ())
    if isinstance(current, bool):
        yield not current
    elif isinstance(current, (int, float)):
        yield from (current + 1, (current + 1) / 2)
    elif isinstance(current, list):
        yield [item * 2 for item in current]
    # The shapes of the fields whose default is None or derived: stage names, indices, label maps.
    yield from (["stage1"], [1], {"cat": 0, "dog": 1, "bird": 2}, {0: "cat", 1: "dog", 2: "bird"})


def _changes(name: str, value: Any, current: Any) -> bool:
    try:
        return getattr(ResNetConfig(**{name: value}), name) != current
    except ValueError:
        return False


def slow_param(*values: object, id: str | None = None) -> object:  # noqa: A002  (pytest.param's name)
    """A parameter that runs in the full suite only, not in the inner loop (``pytest -m "not slow"``): a
    real-size model (ResNet-18 and up, a whole detector), or more of a grid the inner loop samples."""
    return pytest.param(*values, id=id, marks=pytest.mark.slow)


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


def place_in_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay files out exactly as huggingface_hub's cache stores a downloaded revision of ``repo_id``, so the
    real loaders find them offline."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copyfile(source, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def run_python(
    code: str, env: dict[str, str], args: list[str] = (), timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (library settings read at import time apply)."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result
