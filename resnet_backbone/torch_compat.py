"""The private torch APIs this project relies on, reached from here only (a test keeps it so).

torch does not promise to keep them, so each is looked up when it is first needed and, where a torch release
has changed it, fails with an error that names the API, the running torch version and what it was needed
for, rather than with an ``AttributeError`` deep inside a call. A version number is not checked: an API
that is still there works, whatever the release.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

try:
    from torch.utils import _pytree
except ImportError as error:  # pragma: no cover  (only a changed torch gets here)
    raise ImportError(
        f"torch {torch.__version__} has no torch.utils._pytree, which resnet_backbone needs to map over nested "
        "outputs. Install a torch release that has it (resnet_backbone's requirements name them)."
    ) from error


def _changed(path: str, purpose: str) -> RuntimeError:
    return RuntimeError(
        f"torch {torch.__version__} changed {path}, a private torch API that resnet_backbone needs to {purpose}. "
        "Install a torch release that has it (resnet_backbone's requirements name them), and report this."
    )


def _private(owner: Any, path: str, purpose: str) -> Any:
    """``owner.<last part of path>``, or the error that says ``path`` changed."""
    try:
        return getattr(owner, path.rpartition(".")[2])
    except (AttributeError, ImportError):
        raise _changed(path, purpose) from None


_TREE = "map over nested model outputs"
tree_map = _private(_pytree, "torch.utils._pytree.tree_map", _TREE)
tree_flatten = _private(_pytree, "torch.utils._pytree.tree_flatten", _TREE)
tree_unflatten = _private(_pytree, "torch.utils._pytree.tree_unflatten", _TREE)


# Every BatchNorm: 1d/2d/3d, SyncBatchNorm, and other libraries' subclasses (mmengine's _BatchNormXd, which its
# revert_sync_batchnorm puts in place of SyncBatchNorm), so norm_eval and frozen stages keep them all in eval mode.
BatchNormBase = _private(
    nn.modules.batchnorm, "torch.nn.modules.batchnorm._BatchNorm", "recognise every kind of BatchNorm"
)


def is_compiled_module(model: Any) -> bool:
    """Whether ``model`` is the wrapper that ``torch.compile(module)`` returns."""
    purpose = "recognise a model wrapped by torch.compile"
    eval_frame = _private(_private(torch, "torch._dynamo", purpose), "torch._dynamo.eval_frame", purpose)
    return isinstance(model, _private(eval_frame, "torch._dynamo.eval_frame.OptimizedModule", purpose))


def cpu_computes_bf16_natively() -> bool:
    """Whether this CPU has bfloat16 arithmetic units (AVX512-BF16 or AMX)."""
    purpose = "tell whether this CPU computes bfloat16 natively"
    avx512_bf16 = _private(torch.cpu, "torch.cpu._is_avx512_bf16_supported", purpose)
    amx = _private(torch.cpu, "torch.cpu._is_amx_tile_supported", purpose)
    return avx512_bf16() or amx()


def _check_call_impls(model: nn.Module, purpose: str) -> None:
    """The error that names nn.Module's private call attributes, where a torch release changed them."""
    missing = [name for name in ("_call_impl", "_compiled_call_impl") if not hasattr(model, name)]
    if missing:
        raise _changed(f"torch.nn.Module.{missing[0]}", purpose)


def compile_without_autograd(model: nn.Module, inductor_config: dict[str, Any]) -> None:
    """Compile ``model`` in place as ``nn.Module.compile(dynamic=False)`` does, so that every call runs without
    autograd and under ``inductor_config`` (e.g. ``{"freezing": True}``).

    Settings such as freezing are read from inductor's global config while Dynamo traces (the first call for
    each shape), which ``torch.compile(options=...)`` does not reach; so they wrap each call of this model,
    and the rest of the process keeps its own.
    """
    purpose = "compile a model with inductor settings of its own"
    config = _private(_private(torch, "torch._inductor", purpose), "torch._inductor.config", purpose)
    unknown = [name for name in inductor_config if not hasattr(config, name)]
    if unknown:
        raise _changed(f"torch._inductor.config.{unknown[0]}", purpose)
    _check_call_impls(model, purpose)
    compiled: Callable[..., Any] = torch.compile(model._call_impl, dynamic=False)
    model._compiled_call_impl = config.patch(inductor_config)(torch.no_grad()(compiled))


def wrap_compiled_call(
    model: nn.Module, wrap: Callable[[Callable[..., Any], Callable[..., Any]], Callable[..., Any]]
) -> None:
    """Replace the compiled call of ``model`` (compiled by :func:`compile_without_autograd`) by
    ``wrap(compiled call, eager call)``, e.g. to time the two. The eager call is the model's own uncompiled
    call, its ``forward`` with its hooks, without autograd.

    Raises:
        TypeError: ``model`` is not compiled.
    """
    purpose = "compare a compiled model's calls with its uncompiled forward"
    _check_call_impls(model, purpose)
    if model._compiled_call_impl is None:
        raise TypeError(f"{type(model).__name__} is not compiled: compile it with compile_without_autograd first.")
    model._compiled_call_impl = wrap(model._compiled_call_impl, torch.no_grad()(model._call_impl))


def inductor_cache_dir() -> str:
    """The folder where inductor caches compiled code (its FX-graph cache included): ``TORCHINDUCTOR_CACHE_DIR``,
    or inductor's default."""
    configured = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if configured:
        return os.path.abspath(configured)
    purpose = "name inductor's cache folder"
    try:
        from torch._inductor.runtime import cache_dir_utils
    except ImportError:
        raise _changed("torch._inductor.runtime.cache_dir_utils", purpose) from None
    default_cache_dir = _private(cache_dir_utils, "torch._inductor.runtime.cache_dir_utils.default_cache_dir", purpose)
    return os.path.abspath(default_cache_dir())


def allocation_events(profiler: torch.profiler.profile, device_type: str) -> list[tuple[int, int, int]]:
    """``(start time in ns, address, bytes)`` of each allocation a stopped ``profile_memory`` profiler saw on
    ``device_type``; a release has negative bytes. Read from kineto's event tree, which has no public API."""
    purpose = "count the memory a call allocates"
    event_types = _private(_private(torch._C, "torch._C._profiler", purpose), "torch._C._profiler._EventType", purpose)
    allocation = _private(event_types, "torch._C._profiler._EventType.Allocation", purpose)
    results = _private(profiler.profiler, "torch.autograd.profiler.profile.kineto_results", purpose)
    events, found = list(results.experimental_event_tree()), []
    while events:
        event = events.pop()
        events += event.children
        if event.tag == allocation and event.extra_fields.device.type == device_type:
            found.append((event.start_time_ns, event.extra_fields.ptr, event.extra_fields.alloc_size))
    return found


def fx_graph_cache_counts() -> dict[str, int]:
    """How many graphs inductor's FX graph cache has, in this process so far, served from the cache (``hit``),
    compiled and stored (``miss``) and compiled without caching (``bypass``): the difference over a first call
    says whether its compiled code came from the cache."""
    purpose = "tell whether a compiled graph came from inductor's cache"
    utils = _private(_private(torch, "torch._dynamo", purpose), "torch._dynamo.utils", purpose)
    inductor = _private(utils, "torch._dynamo.utils.counters", purpose)["inductor"]
    return {outcome: inductor[f"fxgraph_cache_{outcome}"] for outcome in ("hit", "miss", "bypass")}


@functools.cache
def onednn_convolution_ops() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """oneDNN's weight reorder and convolution, the pair inductor's frozen CPU code calls:
    ``reorder(weight, padding, stride, dilation, groups, input_size)`` returns the weight in oneDNN's blocked
    layout once, and ``convolve(input, packed, bias, padding, stride, dilation, groups, "none", [], "")`` runs
    on it without reordering it again per call. None where this torch build has no oneDNN or lacks either op
    (prepacking is a speed-up only: plain convolutions compute the same)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return None
    operators = torch.ops.mkldnn
    try:
        return operators._reorder_convolution_weight, operators._convolution_pointwise
    except (AttributeError, RuntimeError):
        return None
