"""Every public entry point says what it takes, gives and refuses (Google style ``Args:`` / ``Returns:``), and
every example in those docstrings runs.

The entry points are derived, never listed: the ``__all__`` of ``resnet_backbone``, ``resnet_backbone.weights``
and each adapter whose framework is installed; the public functions and classes that ``resnet_backbone.export``,
``resnet_backbone.distributed`` and ``resnet_backbone.conversion`` define; each command-line verb's ``run``; the
alternate constructors (classmethods, and methods returning their own class) of those classes; and every public
method of ``ResNetPreTrainedModel``, the checkpoint API all models inherit.

An example is an ``Example::`` block in doctest form (``>>>`` lines, with the output they print), so doctest runs
and checks it; examples build tiny configs, so all of them run in the inner loop.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import re
from collections.abc import Callable, Iterator
from types import ModuleType

import pytest

CORE_MODULES = ("resnet_backbone", "resnet_backbone.weights")
DEFINING_MODULES = ("resnet_backbone.export", "resnet_backbone.distributed", "resnet_backbone.conversion")
SECTION = re.compile(r"^\s*(Args|Returns|Raises|Example|Examples|Yields|Attributes|Note)::?\s*$", re.MULTILINE)


def _adapter_names() -> list[str]:
    import resnet_backbone.adapters

    return sorted(module.name for module in pkgutil.iter_modules(resnet_backbone.adapters.__path__))


def _import_adapter(name: str) -> ModuleType:
    """The adapter module, or a skip when its framework is not installed."""
    try:
        return importlib.import_module(f"resnet_backbone.adapters.{name}")
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] in ("resnet_backbone", "adapters"):
            raise
        pytest.skip(f"the {name} adapter needs {error.name}, which is not installed")


def _public_objects(module: ModuleType) -> Iterator[tuple[str, object]]:
    """``module.__all__``'s callables, or else the public functions and classes it defines."""
    if hasattr(module, "__all__"):
        names = module.__all__
    else:
        names = [
            name
            for name, value in vars(module).items()
            if not name.startswith("_")
            and (inspect.isfunction(value) or inspect.isclass(value))
            and value.__module__ == module.__name__
        ]
    for name in names:
        value = getattr(module, name)
        if callable(value):
            yield f"{module.__name__}.{name}", value


def _entry_points(module: ModuleType) -> Iterator[tuple[str, Callable]]:
    """The module's public callables, and the constructors (and checkpoint API) of its classes."""
    from torch import nn

    from resnet_backbone.pretrained import ResNetPreTrainedModel

    for qualname, value in _public_objects(module):
        yield qualname, value
        if not inspect.isclass(value):
            continue
        classes = [value, ResNetPreTrainedModel] if issubclass(value, ResNetPreTrainedModel) else [value]
        for owner in classes:
            for name, attribute in vars(owner).items():
                if name.startswith("_") or (issubclass(owner, nn.Module) and hasattr(nn.Module, name)):
                    continue
                method = getattr(value, name)
                if owner is ResNetPreTrainedModel and inspect.isroutine(method) or _constructs(owner, attribute):
                    yield f"{qualname}.{name}", method


def _constructs(owner: type, attribute: object) -> bool:
    """A classmethod, or a method annotated to return its own class."""
    if isinstance(attribute, classmethod):
        return True
    returned = inspect.signature(attribute).return_annotation if inspect.isfunction(attribute) else None
    return returned in (owner.__name__, "Self", owner)


def _verbs() -> Iterator[tuple[str, Callable]]:
    from resnet_backbone.cli.main import VERBS

    for name, verb in VERBS.items():
        yield f"resnet-backbone {name}: {verb.__name__}.run", verb.run


def _groups() -> list[str]:
    return [*CORE_MODULES, *DEFINING_MODULES, *(f"adapters.{name}" for name in _adapter_names()), "cli"]


def _entry_points_of(group: str) -> list[tuple[str, Callable]]:
    if group == "cli":
        return list(_verbs())
    if group.startswith("adapters."):
        return list(_entry_points(_import_adapter(group.removeprefix("adapters."))))
    return list(_entry_points(importlib.import_module(group)))


def _sections(doc: str) -> dict[str, str]:
    """A Google-style docstring's sections by title (``Example::`` as ``Example``)."""
    parts = SECTION.split(doc)
    return {title: body for title, body in zip(parts[1::2], parts[2::2])}


def _parameters(function: Callable) -> list[str]:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return []
    return [name for name in signature.parameters if name not in ("self", "cls")]


def _missing_sections(qualname: str, value: Callable) -> list[str]:
    """What ``value``'s docstring lacks: ``Args:`` where it takes arguments, ``Returns:`` where it returns."""
    if inspect.isclass(value):
        init = vars(value).get("__init__")
        doc = "\n".join(filter(None, [inspect.getdoc(value), init and inspect.getdoc(init)]))
        takes, returns = _parameters(value), False
    else:
        doc = inspect.getdoc(value) or ""
        returned = inspect.signature(value).return_annotation
        takes, returns = _parameters(value), returned not in (None, "None", inspect.Signature.empty)
    sections = set(_sections(doc))
    if inspect.isclass(value) and "Attributes" in sections:
        sections.add("Args")  # a dataclass's arguments are its attributes
    missing = [section for section, needed in (("Args", takes), ("Returns", returns)) if needed]
    return [f"{qualname}: no {section}: section" for section in missing if section not in sections]


@pytest.mark.parametrize("group", _groups())
def test_each_entry_point_says_what_it_takes_and_returns(group):
    problems = [
        problem for qualname, value in _entry_points_of(group) for problem in _missing_sections(qualname, value)
    ]
    assert not problems, "Google-style sections missing:\n" + "\n".join(problems)


@pytest.mark.parametrize("group", _groups())
def test_each_example_runs_as_shown(group):
    finder, runner = doctest.DocTestFinder(recurse=False), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for qualname, value in _entry_points_of(group):
        doc = inspect.getdoc(value) or ""
        for section, body in _sections(doc).items():
            if section.startswith("Example"):
                assert body.strip().startswith(">>>"), f"{qualname}: its example is not in doctest form (>>> lines)"
        for test in finder.find(value, qualname, globs={}):
            report: list[str] = []
            runner.run(test, out=report.append)
            assert not report, f"{qualname}'s example does not run as shown:\n" + "".join(report)
