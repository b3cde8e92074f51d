"""Fixtures every test gets; shared helpers live in helpers.py.

torch is imported inside the hooks and fixtures, not here: under pytest-xdist this file is also loaded by
the controller process, which runs no test and should not spend seconds importing torch before the workers
start.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Each xdist worker gets one core: torch's own threads would otherwise fight over the two.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic_random_weights() -> None:
    """Every test starts from the same random state, so random weights cannot make a test flaky."""
    import torch

    torch.manual_seed(0)


@pytest.fixture
def images():  # noqa: ANN201  (a torch.Tensor; torch is not imported at module level, see above)
    """A batch of two odd-sized images, so rounding in strides and pooling shows up."""
    import torch

    return torch.randn(2, 3, 97, 130, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):  # noqa: ANN201  (a tuple of two Paths)
    """A COCO folder and a mask folder over the same images (see ``helpers.write_labelled_folders``)."""
    from helpers import write_labelled_folders

    return write_labelled_folders(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def saved_detector(folders, tmp_path_factory):  # noqa: ANN201  (a Path)
    """A tiny FCOS with random weights on the COCO folder's classes, saved as train saves it."""
    from helpers import BAR, SQUARE, TINY_BASIC

    from resnet_backbone import ResNetBackbone, ResNetConfig
    from resnet_backbone.training.data.coco import CocoFolder
    from resnet_backbone.training.task_model import TaskSpec, build_task_model, save_task_model

    coco = CocoFolder(folders[0])
    spec = TaskSpec("detection", "fcos", coco.num_classes, 64, coco.id2label, [SQUARE, BAR])
    directory = tmp_path_factory.mktemp("saved") / "model"
    save_task_model(build_task_model(spec, ResNetBackbone(ResNetConfig(**TINY_BASIC))), directory, spec)
    return directory
