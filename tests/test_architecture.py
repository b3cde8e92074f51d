"""The architecture holds: import-linter's contracts (pyproject.toml) on the repository, and a bare
``import resnet_backbone`` loads none of the frameworks it adapts to."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from resnet_backbone.adapters.torchvision import DENSE_PARTS

REPOSITORY = Path(__file__).resolve().parents[1]
CORE = [*REPOSITORY.glob("resnet_backbone/*.py"), *REPOSITORY.glob("resnet_backbone/weights/**/*.py")]
LINKED = ("adapters", "benchmarks")  # linked into the package: read once, from the repository's top
SHIPPED = [
    *(
        path
        for path in (REPOSITORY / "resnet_backbone").rglob("*.py")
        if path.relative_to(REPOSITORY).parts[1] not in LINKED
    ),
    *(path for folder in LINKED for path in (REPOSITORY / folder).rglob("*.py")),
]
# What only the adapters know about their frameworks' models: the classes they declare dense parts for, the
# attribute paths of those parts that the core's own models do not have, and segmentation_models_pytorch.
# "torchvision" and "timm" are not in it: the weights package reads and writes their checkpoint layouts by
# name (weights/layouts.py's key table, from_torchvision / from_timm, and weights/sources.py's loaders of a
# torchvision weights enum or a timm model name, the two deferred imports the contract ignores), and the core's
# prose compares its conventions to theirs; whether the core imports them is import-linter's job.
FRAMEWORK_MODEL_NAMES = re.compile(
    r"\b(" + "|".join(model_class.__name__ for model_class in DENSE_PARTS) + r")\b"
    r"|\brpn\b|aux_classifier|segmentation_head|segmentation_models_pytorch|\bsmp\b|tu-rb_"
    r"|__(qual)?name__\s*(==|!=|in\b)"  # a class recognised by its name rather than its type
)
PRIVATE_TORCH_API = re.compile(r"\btorch(\.\w+)*\._[A-Za-z]|\._(compiled_)?call_impl\b|\._orig_mod\b|_EventType")
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
        ("adapters/timm.py", "from resnet_backbone.pretrained import ResNetPreTrainedModel as _", "Adapters use only"),
        ("adapters/transformers.py", "from resnet_backbone.weights.resolve import Source as _", "Adapters use only"),
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


def _lines_matching(pattern: re.Pattern, paths: list[Path]) -> list[str]:
    return [
        f"{path.relative_to(REPOSITORY)}:{number}: {line.strip()}"
        for path in sorted(paths)
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]


def test_the_core_names_no_framework_model_or_attribute():
    """The adapters declare their frameworks' dense parts and norms (register_dense_parts,
    register_foldable_norm); the core refers to none of their classes or attribute paths."""
    assert _lines_matching(FRAMEWORK_MODEL_NAMES, CORE) == []


def test_private_torch_apis_are_reached_only_from_torch_compat():
    """The one module that checks each private API and names it when a torch release changes it."""
    outside = [path for path in SHIPPED if path != REPOSITORY / "resnet_backbone" / "torch_compat.py"]
    assert _lines_matching(PRIVATE_TORCH_API, outside) == []


def test_the_names_adapters_use_moved_to_the_adapter_api_and_still_import_with_a_warning():
    """They left ``resnet_backbone.__all__`` (what users call) for ``resnet_backbone.adapter_api``; the old
    import path keeps working for one release, with a ``DeprecationWarning`` that says where they went."""
    import resnet_backbone
    from resnet_backbone import adapter_api

    for name in ("NORM_TYPES", "ResNetTrunk", "align_out_features", "check_pixel_values", "close_match_hint"):
        assert name not in resnet_backbone.__all__ and name in adapter_api.__all__
        with pytest.warns(DeprecationWarning, match=rf"from resnet_backbone\.adapter_api import {name}\)"):
            moved = getattr(resnet_backbone, name)
        assert moved is getattr(adapter_api, name)
    with pytest.raises(AttributeError, match="has no attribute 'ResNetTrunc'"):
        resnet_backbone.ResNetTrunc  # noqa: B018


def test_the_public_api_imports_without_a_warning(recwarn):
    import resnet_backbone
    import resnet_backbone.weights

    for module in (resnet_backbone, resnet_backbone.weights):
        for name in module.__all__:
            getattr(module, name)
    assert not recwarn.list
