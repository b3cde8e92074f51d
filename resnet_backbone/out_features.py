"""The one place where ``out_features`` / ``out_indices`` are resolved against ``stage_names``.

The config, the models and serialization all call :func:`align_out_features`, so a selection can never
mean one thing in one place and another elsewhere. It accepts everything transformers'
``BackboneConfigMixin`` accepts (plus tuples everywhere) and gives the same stages, but rejects with a
``ValueError`` what transformers lets through or turns into an ``IndexError`` (for example ``[-6]`` on
five stages). Negative indices are returned as their non-negative equivalents.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from .hints import close_match_hint


def align_out_features(
    stage_names: Sequence[str],
    out_features: Sequence[str] | None = None,
    out_indices: Sequence[int] | None = None,
) -> tuple[list[str], list[int]]:
    """Resolve a stage selection given by names, indices or both into aligned ``(names, indices)``.

    Both ``None`` selects the last stage. Names and indices must be unique and in network order; when
    both are given they must name the same stages.
    """
    stage_names = list(stage_names)
    indices = None if out_indices is None else _normalized_indices(stage_names, out_indices)
    names = None if out_features is None else _checked_names(stage_names, out_features)

    if names is None and indices is None:
        indices = [len(stage_names) - 1]
    if names is None:
        names = [stage_names[i] for i in indices]
    elif indices is None:
        indices = [stage_names.index(name) for name in names]
    elif names != [stage_names[i] for i in indices]:
        raise ValueError(
            f"out_features {list(out_features)} and out_indices {list(out_indices)} name different stages "
            f"(out_indices select {[stage_names[i] for i in indices]}); give only one of them, or make them "
            f"agree. Valid stage_names: {stage_names}."
        )
    return names, indices


def _checked_names(stage_names: list[str], out_features: Sequence[str]) -> list[str]:
    if isinstance(out_features, str) or not isinstance(out_features, (list, tuple)):
        hint = f" Did you mean [{out_features!r}]?" if isinstance(out_features, str) else ""
        raise ValueError(
            f"out_features must be a list of stage names, got {type(out_features).__name__} "
            f"{out_features!r}.{hint} Valid stage_names: {stage_names}."
        )
    names = list(out_features)
    for name in names:
        if not isinstance(name, str):
            raise ValueError(
                f"out_features must contain stage names (str), got {type(name).__name__} {name!r} in "
                f"{names}. Use out_indices for indices. Valid stage_names: {stage_names}."
            )
        if name not in stage_names:
            raise ValueError(
                f"out_features contains unknown stage {name!r}.{close_match_hint(name, stage_names)} "
                f"Valid stage_names: {stage_names}."
            )
    _check_unique_and_ordered("out_features", names, [stage_names.index(n) for n in names], stage_names)
    return names


def _normalized_indices(stage_names: list[str], out_indices: Sequence[int]) -> list[int]:
    if not isinstance(out_indices, (list, tuple)):
        raise ValueError(
            f"out_indices must be a list of stage indices, got {type(out_indices).__name__} "
            f"{out_indices!r}. Valid stage_names: {stage_names}."
        )
    num_stages = len(stage_names)
    indices = []
    for index in out_indices:
        try:
            if isinstance(index, bool):
                raise TypeError
            index = operator.index(index)
        except TypeError:
            raise ValueError(
                f"out_indices must contain integers, got {type(index).__name__} {index!r} in "
                f"{list(out_indices)}. Use out_features for names. Valid stage_names: {stage_names}."
            ) from None
        if not -num_stages <= index < num_stages:
            raise ValueError(
                f"out_indices contains {index}, out of range for {num_stages} stages (valid: "
                f"{-num_stages} to {num_stages - 1}). Valid stage_names: {stage_names}."
            )
        indices.append(index % num_stages)
    _check_unique_and_ordered("out_indices", list(out_indices), indices, stage_names)
    return indices


def _check_unique_and_ordered(argument: str, given: list, positions: list[int], stage_names: list[str]) -> None:
    if len(set(positions)) != len(positions):
        duplicated = sorted({stage_names[p] for p in positions if positions.count(p) > 1})
        raise ValueError(
            f"{argument} {given} selects {duplicated} more than once; each stage may appear once. "
            f"Valid stage_names: {stage_names}."
        )
    if positions != sorted(positions):
        expected = [g for _, g in sorted(zip(positions, given))]
        raise ValueError(
            f"{argument} must follow the order of stage_names: expected {expected}, got {given}. "
            f"Valid stage_names: {stage_names}."
        )
