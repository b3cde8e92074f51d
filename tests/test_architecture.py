"""The architecture holds: import-linter's contracts (pyproject.toml) on the repository, and a bare
``import resnet_backbone`` loads none of the frameworks it adapts to."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _copy_of_the_package(destination: Path) -> Path:
    """A copy to break on purpose; copying follows the adapters/ and benchmarks/ links into real folders."""
    shutil.copytree(
        REPOSITORY / "resnet_backbone", destination / "resnet_backbone", ignore=shutil.ignore_patterns("__pycache__")
    )
    return destination


def _lint_imports(layout: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, str(REPOSITORY / "pyproject.toml"), "--no-cache"],
        cwd=layout, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(layout), "HOME": str(layout)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.slow
def test_every_import_contract_is_kept():
    """On the repository itself, as a developer runs `lint-imports` from its root."""
    result = _lint_imports(REPOSITORY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 5 kept, 0 broken." in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("config.py", "from .adapters import timm", "The core imports no adapter"),
        ("specs.py", "import torchvision", "The core imports no adapter"),
        ("specs.py", "from . import trunk", "No import cycles"),
        ("adapters/timm.py", "from ..trunk import ResNetTrunk as _", "Adapters use only the core's public API"),
        ("adapters/torchvision.py", "from ..cli import main", "Three tiers"),
        ("adapters/torchvision.py", "from ..training import engine", "Three tiers"),
        ("training/engine.py", "from ..cli import main", "Three tiers"),
        ("cli/info.py", "import torchvision", "The command line imports only"),
        ("conversion.py", "from .cli import convert", "The core imports no adapter"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tmp_path, module, line, broken):
    """The contracts are not vacuous: each kind of violation is caught and named."""
    layout = _copy_of_the_package(tmp_path)
    path = layout / "resnet_backbone" / module
    path.write_text(path.read_text() + f"\n{line}\n")
    result = _lint_imports(layout)
    assert result.returncode == 1 and "0 broken" not in result.stdout
    assert broken in result.stdout.split("Broken contracts")[1]


@pytest.mark.slow
def test_importing_the_core_loads_no_framework_it_adapts_to():
    frameworks = {"timm", "torchvision", "transformers", "matplotlib", "torch._dynamo", "onnx", "onnxruntime"}
    code = (
        "import sys, resnet_backbone, resnet_backbone.conversion, resnet_backbone.distributed, resnet_backbone.export; "
        f"print(sorted({frameworks!r} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
