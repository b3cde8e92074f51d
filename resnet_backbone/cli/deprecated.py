"""Import paths of names that moved out of the command line, kept working for one release."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def forward_to(new_module: str, old_module: str) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``old_module`` that finds each public name of ``new_module``, with a
    ``DeprecationWarning`` saying where it lives now. Importing ``old_module`` alone does not warn: only a use
    of a moved name does, at the line that uses it.

    Args:
        new_module: where the names live now, e.g. ``"resnet_backbone.export"``.
        old_module: the deprecated module (its ``__name__``).

    Returns:
        The function to assign to the old module's ``__getattr__``.
    """

    def __getattr__(name: str) -> Any:
        module = importlib.import_module(new_module)
        if name.startswith("__") or not hasattr(module, name):
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        warnings.warn(
            f"{old_module}.{name} moved to {new_module}.{name}: import it from there ({old_module} goes in the "
            "next release).",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(module, name)

    return __getattr__
