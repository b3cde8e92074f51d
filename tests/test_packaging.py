"""`adapters/` and `benchmarks/` install as `resnet_backbone.adapters` and `resnet_backbone.benchmarks`,
never as top-level packages of those generic names."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, pkgutil, resnet_backbone, resnet_backbone.adapters, resnet_backbone.benchmarks
print(resnet_backbone.adapters.__file__)
top_level = importlib.util.find_spec("adapters")
print(top_level.origin if top_level else None)
modules = {"resnet_backbone.adapters", "resnet_backbone.benchmarks"}
for package in (resnet_backbone, resnet_backbone.adapters, resnet_backbone.benchmarks):
    modules |= {m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")}
print(",".join(sorted(modules)))
"""


def _repository_modules() -> str:
    """Every module of the repository's three source folders, under its installed name."""
    names = []
    folders = [("resnet_backbone", "resnet_backbone"), ("adapters", "resnet_backbone.adapters")]
    for folder, package in [*folders, ("benchmarks", "resnet_backbone.benchmarks")]:
        for path in (REPOSITORY / folder).rglob("*.py"):
            parts = path.relative_to(REPOSITORY / folder).with_suffix("").parts
            names.append(".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)]))
    return ",".join(sorted(set(names) - {"resnet_backbone"}))


def _probe(cwd: Path, extra_path: Path | None = None) -> tuple[Path, str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, check=True, timeout=120
    )
    adapters_file, top_level_origin, modules = result.stdout.split()
    assert modules == _repository_modules(), "some modules are not installed"
    return Path(adapters_file), top_level_origin


@pytest.mark.slow
def test_installed_package_imports_adapters_under_resnet_backbone(tmp_path):
    """Whatever the install (the README's is editable), adapters/ is reached as resnet_backbone.adapters."""
    adapters_file, top_level_origin = _probe(tmp_path)
    assert adapters_file.name == "__init__.py" and adapters_file.parent.name == "adapters"
    assert adapters_file.read_text() == (REPOSITORY / "adapters" / "__init__.py").read_text()
    assert top_level_origin == "None" or not top_level_origin.startswith(str(REPOSITORY))


@pytest.mark.slow
def test_a_regular_install_ships_adapters_inside_resnet_backbone(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(
        REPOSITORY, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".*cache")
    )
    wheels, target = tmp_path / "wheels", tmp_path / "target"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source], check=True, timeout=300)
    (wheel,) = wheels.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "resnet_backbone/adapters/__init__.py" in names
    assert "resnet_backbone/benchmarks/__init__.py" in names
    assert not any(name.startswith(("adapters/", "benchmarks/")) for name in names)

    subprocess.run([*pip, "install", "--no-deps", "--target", target, wheel], check=True, timeout=300)
    adapters_file, top_level_origin = _probe(tmp_path, extra_path=target)
    assert adapters_file == target / "resnet_backbone" / "adapters" / "__init__.py"
    assert top_level_origin == "None"

    bench_help = subprocess.run(
        [sys.executable, "-m", "resnet_backbone.cli", "bench", "--help"],
        cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bench_help.returncode == 0, bench_help.stderr[-2000:]
    assert "--smoke" in bench_help.stdout
