"""What the fast paths need to know about the classes of a whole model, declared by whoever knows them.

The core names no other library's classes or attributes. Each adapter declares, when it is imported, the dense
parts of the model classes it builds or recognises (:func:`register_dense_parts`) and the norm classes of its
framework that fold into a convolution (:func:`register_foldable_norm`), and the faster stand-ins for its
modules that compute the same at inference (:func:`register_inference_module`); a user does the same for their own
classes, or passes the parts to each call. Like torch's pytree registry, a declaration is keyed by class and
inherited by subclasses, so it reaches every model of that class however it was built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from .hints import close_match_hint
from .layers import FrozenBatchNorm2d

# The norms torch and the core define that are a per-channel affine map in eval mode; GroupNorm depends on each
# input, so it stays.
FOLDABLE_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)

_dense_parts_by_class: dict[type | str, tuple[str, ...]] = {}
_registered_norms: list[type[nn.Module]] = []
_inference_modules: dict[type[nn.Module], Callable[[nn.Module], nn.Module]] = {}


def register_dense_parts(model_class: type[nn.Module] | str, part_names: Sequence[str]) -> None:
    """Declare which submodules of ``model_class`` (and of its subclasses) run dense convolutions on inputs of
    a fixed shape for a fixed image size: what ``optimize_for_inference`` runs in low precision and compiles,
    and ``compile_for_training`` compiles. Anchors, matching, NMS, RoI heads (whose inputs change shape with
    the number of proposals) and post-processing belong outside them: they stay eager and in float32.

    A part whose own class declares parts is replaced by those (a detector's ``backbone`` by the body and the
    neck it holds); a name that is absent or ``None`` on a model (an optional head) is skipped.

    Args:
        model_class: the class, or its ``"module.QualName"`` for a class of an optional library that the
            declaring module does not import.
        part_names: dotted submodule names; ``""`` is the model itself (one dense part as a whole).

    Raises:
        TypeError: ``part_names`` is a single string rather than a sequence of names.
    """
    if isinstance(part_names, str):
        raise TypeError(f"part_names is a sequence of submodule names, e.g. [{part_names!r}], got {part_names!r}.")
    _dense_parts_by_class[model_class] = tuple(part_names)


def register_foldable_norm(norm_class: type[nn.Module]) -> None:
    """Declare ``norm_class`` a norm that ``optimize_for_inference`` folds into the convolution before it.

    Its instances must compute, in eval mode, ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``
    per channel, with those five attributes (as BatchNorm does): the folding reads them.

    Args:
        norm_class: the norm's class (its subclasses fold too).

    Raises:
        TypeError: ``norm_class`` is not a subclass of ``nn.Module``.
    """
    if not (isinstance(norm_class, type) and issubclass(norm_class, nn.Module)):
        raise TypeError(f"register_foldable_norm takes an nn.Module subclass, got {norm_class!r}.")
    if norm_class not in _registered_norms:
        _registered_norms.append(norm_class)


def register_inference_module(module_class: type[nn.Module], make: Callable[[nn.Module], nn.Module]) -> None:
    """Declare that ``optimize_for_inference`` puts ``make(module)`` in place of each module of exactly
    ``module_class`` (a subclass may compute something else): a stand-in that computes the same outputs
    faster in eval mode, such as a framework's RoI pooling run as one sparse matrix product.

    Args:
        module_class: the class replaced.
        make: builds the stand-in from the module, with the module's settings and state.

    Raises:
        TypeError: ``module_class`` is not a subclass of ``nn.Module``.
    """
    if not (isinstance(module_class, type) and issubclass(module_class, nn.Module)):
        raise TypeError(f"register_inference_module takes an nn.Module subclass, got {module_class!r}.")
    _inference_modules[module_class] = make


def use_inference_modules(model: nn.Module) -> None:
    """Put the declared stand-in (:func:`register_inference_module`) in place of each module of ``model`` whose
    class has one, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            make = _inference_modules.get(type(child))
            if make is not None:
                setattr(parent, name, make(child))


def is_foldable_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a norm of :data:`FOLDABLE_NORMS` or of a class declared foldable. A subclass that
    overrides ``forward`` computes more than the affine map (timm's ``BatchNormAct2d`` adds an activation),
    so folding it would drop that: it is not foldable."""
    foldable = (*FOLDABLE_NORMS, *_registered_norms)
    return isinstance(module, foldable) and type(module).forward in {norm.forward for norm in foldable}


def declared_dense_parts(model: nn.Module) -> tuple[str, ...] | None:
    """The part names declared for the most specific class of ``model`` that has a declaration, or None."""
    for model_class in type(model).__mro__:
        for key in (model_class, f"{model_class.__module__}.{model_class.__qualname__}"):
            if key in _dense_parts_by_class:
                return _dense_parts_by_class[key]
    return None


def dense_parts(model: nn.Module, parts: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The parts of ``model`` that run dense convolutions on fixed-shape inputs, by submodule name.

    Without ``parts``: the parts declared for the model's class (:func:`register_dense_parts`), each replaced
    by its own declared parts (a detector's ``backbone.body`` and ``backbone.fpn`` rather than its
    ``backbone``); ``{"": model}`` (the whole model) when its class declares none or none of them is present.

    Args:
        model: the whole model.
        parts: submodule names that replace the declaration, used as given (``""``: the whole model).

    Returns:
        ``{name: submodule}``, in declaration order.

    Raises:
        ValueError: a name of ``parts`` names no submodule of ``model``, or one part lies inside another.
    """
    if parts is None:
        return _declared_parts(model) or {"": model}
    if isinstance(parts, str) or not parts:
        raise ValueError(f"parts is a non-empty sequence of submodule names, e.g. ['backbone'], got {parts!r}.")
    names = dict(model.named_modules())
    for name in parts:
        if name not in names:
            raise ValueError(
                f"parts: {type(model).__name__} has no submodule {name!r}.{close_match_hint(name, names)} Its "
                f"top-level submodules: {', '.join(name for name, _ in model.named_children())}."
            )
        outer = next((other for other in parts if other != name and _inside(name, other)), None)
        if outer is not None:
            whole = " (the whole model)" if outer == "" else ""
            raise ValueError(f"parts must not nest: {name!r} lies inside {outer!r}{whole}. Keep one of them.")
    return {name: names[name] for name in parts}


def _declared_parts(model: nn.Module) -> dict[str, nn.Module]:
    declared = declared_dense_parts(model)
    if declared is None:
        return {}
    found = {}
    for name in declared:
        part = model if name == "" else _optional_submodule(model, name)
        if part is None:
            continue
        inner = _declared_parts(part) if name else {}
        found.update({_join(name, inner_name): module for inner_name, module in inner.items()} or {name: part})
    return found


def _optional_submodule(model: nn.Module, name: str) -> nn.Module | None:
    for attribute in name.split("."):
        model = getattr(model, attribute, None)
    return model if isinstance(model, nn.Module) else None


def _inside(name: str, outer: str) -> bool:
    return outer == "" or name.startswith(f"{outer}.")


def _join(name: str, inner_name: str) -> str:
    return f"{name}.{inner_name}" if inner_name else name
