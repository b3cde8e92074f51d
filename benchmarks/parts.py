"""A whole model's dense parts, one at a time: the time of one call spent in each (and in each one's backward
pass), and what each outputs. Each part is replaced for the call by a module that stands in for it."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from resnet_backbone import dense_parts
from resnet_backbone.torch_compat import tree_flatten, tree_unflatten


class _StandIn(nn.Module):
    """Stands in for one dense part while the caller measures it; the part's own attributes stay reachable."""

    def __init__(self, part: nn.Module) -> None:
        super().__init__()
        self.part = part

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # the part's own methods, e.g. a head's compute_loss
            return getattr(self.part, name)


@contextmanager
def _parts_replaced(model: nn.Module, stand_in: Callable[[str, nn.Module], nn.Module]) -> Iterator[None]:
    """Each named dense part of ``model`` replaced by ``stand_in(name, part)``, and put back at the end."""
    parts = {name: part for name, part in dense_parts(model).items() if name}
    for name, part in parts.items():
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attribute, stand_in(name, part))
    try:
        yield
    finally:
        for name, part in parts.items():
            parent_name, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attribute, part)


class _Recorded(_StandIn):
    """Stands in for one part during a checked call: runs it and keeps its output, all its tensors flattened
    into one vector (an RPN's box deltas, near zero next to its objectness, count for as little as they weigh)."""

    def __init__(self, part: nn.Module, outputs: list[torch.Tensor]) -> None:
        super().__init__(part)
        self.outputs = outputs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.part(*args, **kwargs)
        leaves = [leaf.detach().flatten() for leaf in tree_flatten(output)[0] if isinstance(leaf, torch.Tensor)]
        self.outputs.append(torch.cat([leaf.float() for leaf in leaves]))
        return output


@contextmanager
def recorded_outputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The outputs of ``model``'s named dense parts in the calls inside the block, one vector per call (a
    detector's detections can change with any feature; its dense outputs change by as much as the features do).

    Args:
        model: a whole model whose dense parts are submodules (see ``resnet_backbone.dense_parts``).

    Yields:
        The list the vectors are appended to.
    """
    outputs: list[torch.Tensor] = []
    with _parts_replaced(model, lambda _, part: _Recorded(part, outputs)):
        yield outputs


class _Timed(_StandIn):
    """Stands in for one part during the split: runs it and adds its seconds to ``spent``; in training it also
    notes in ``gradients_ready`` when all the gradients of its outputs have arrived: its backward pass starts."""

    def __init__(self, part: nn.Module, spent: dict[str, float], gradients_ready: dict[str, float], name: str) -> None:
        super().__init__(part)
        self.spent, self.gradients_ready, self.name = spent, gradients_ready, name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        output = self.part(*args, **kwargs)
        self.spent[self.name] += time.perf_counter() - started
        leaves, spec = tree_flatten(output)
        tracked = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
        if tracked:
            for i, tensor in zip(tracked, _GradientsArrive.apply(self._note, *(leaves[i] for i in tracked))):
                leaves[i] = tensor
        return tree_unflatten(leaves, spec)

    def _note(self) -> None:
        self.gradients_ready[self.name] = time.perf_counter()


class _GradientsArrive(torch.autograd.Function):
    """The identity on a part's outputs, seen only by the part's consumers (not by the part itself, whose
    later stages may read the same tensors): its backward runs once all their gradients have arrived."""

    @staticmethod
    def forward(ctx: Any, note: Callable[[], None], *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.note = note
        return tensors

    @staticmethod
    def backward(ctx: Any, *gradients: torch.Tensor) -> tuple[Any, ...]:
        ctx.note()
        return (None, *gradients)


def time_parts(model: nn.Module, run: Callable[[], Any]) -> dict[str, float]:
    """Milliseconds of one call in each dense part; in training also in each part's backward pass (from the
    arrival of its outputs' gradients to that of the part before it, or the end of the call); and the rest
    (transform, anchors, NMS, RoI heads, post-processing, the loss and its backward)."""
    spent: dict[str, float] = defaultdict(float)
    gradients_ready: dict[str, float] = {}
    with _parts_replaced(model, lambda name, part: _Timed(part, spent, gradients_ready, name)):
        started = time.perf_counter()
        run()
        ended = time.perf_counter()
    backward_order = sorted(gradients_ready, key=gradients_ready.get)  # the head first, the backbone last
    ends = [gradients_ready[name] for name in backward_order[1:]] + [ended]
    for name, end in zip(backward_order, ends):
        spent[f"{name} backward"] = end - gradients_ready[name]
    return {
        **{name: seconds * 1e3 for name, seconds in spent.items()},
        "rest": (ended - started - sum(spent.values())) * 1e3,
    }
