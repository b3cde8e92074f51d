"""The fine-tuning loop behind ``resnet-backbone train`` and the demo, on torch's own DDP engine.

One process or many under ``torchrun`` (gloo on CPU, nccl on CUDA): ``DistributedDataParallel``,
``DistributedSampler`` (so every run sees the same data order), optional SyncBatchNorm, AdamW with
warm-up and cosine decay, bf16 autocast where it pays, rank-0 logging and progress bar, and atomic
checkpoints (model, optimizer, schedule, step, RNG) from which a resumed run continues the loss curve
exactly. A step whose loss or updated weights are not finite stops every rank at once, before anything of
it is written, so the last checkpoint stays the last good one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from ..distributed import convert_sync_batchnorm
from ..inference import compile_for_training, computes_bf16_natively
from ..torch_compat import tree_map
from ..weights import CheckpointMismatchError, LoadReport, load_placed
from ..weights.files import atomic_write

PRECISIONS = ("auto", "bf16", "fp32")  # auto: bf16 where the device computes it natively, else fp32
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "losses.jsonl"


@dataclass(frozen=True)
class TrainingOptions:
    steps: int
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    precision: str = "auto"  # one of PRECISIONS
    seed: int = 0
    output_dir: Path | None = None  # checkpoints and the loss log go here (rank 0 writes)
    checkpoint_every: int = 0  # steps; 0 = only at the end
    resume: bool = False
    stop_at_step: int | None = None  # end this run early (checkpointed) to resume later, e.g. a preemptible job
    sync_batchnorm: bool = False
    compile: bool = False  # channels_last and the dense parts compiled: see compile_for_training
    show_progress: bool = True
    # What the model is (e.g. the task spec), saved in each checkpoint: resume refuses one saved for another.
    model_spec: dict[str, Any] | None = None


@dataclass(frozen=True)
class World:
    """Where this process stands in the (possibly single-process) job."""

    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextmanager
def distributed_world() -> Iterator[World]:
    """Join the ``torchrun`` job described by the environment (or run alone), and leave it at the end."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield World(rank, size, device)
    finally:
        if size > 1:
            dist.destroy_process_group()


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"``: bf16 where the device computes it natively (CUDA with bf16, AVX512-BF16 or AMX CPUs)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if precision != "auto":
        return precision
    return "bf16" if computes_bf16_natively(device) else "fp32"


def autocast_for(precision: str, device: torch.device) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(
    model: nn.Module,
    dataset: Dataset,
    compute_loss: Callable[[nn.Module, Any], torch.Tensor],
    options: TrainingOptions,
    world: World,
    *,
    collate_fn: Callable | None = None,
    after_step: Callable[[nn.Module, int, bool], None] | None = None,
) -> list[float]:
    """Train ``model`` for ``options.steps`` steps; returns this run's losses (averaged over ranks).

    ``compute_loss(model, batch)`` gives the loss of one batch (already on the device).
    ``after_step(model, step, is_last_step)`` runs on every rank after each step (e.g. evaluation), with
    the model unwrapped from DDP and in training mode; it must leave it in training mode.
    A step whose loss, or whose updated weights, are not finite raises ValueError on every rank before
    anything of that step is logged or saved.
    """
    torch.manual_seed(options.seed)
    precision = resolve_precision(options.precision, world.device)
    model = model.to(world.device)
    if options.sync_batchnorm:
        if world.device.type != "cuda":
            raise ValueError(
                "SyncBatchNorm synchronises statistics between GPUs; torch has no CPU implementation (its DDP "
                "refuses SyncBatchNorm on CPU). Train without --sync-bn on CPUs."
            )
        model = convert_sync_batchnorm(model)
    if options.compile:
        compile_for_training(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=options.learning_rate, weight_decay=options.weight_decay, fused=True)
    scheduler = warmup_cosine(optimizer, options.steps, min(options.warmup_steps, options.steps // 10 or 1))
    step = _restore(model, optimizer, scheduler, options, world) if options.resume else 0
    saved_step = step if options.resume else None
    weights = [(name, tensor) for name, tensor in _named_tensors(model) if tensor.is_floating_point()]
    wrapped = model
    if world.size > 1:
        device_ids = [world.device.index] if world.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)
    sampler = DistributedSampler(dataset, num_replicas=world.size, rank=world.rank, shuffle=True, seed=options.seed)
    steps_per_epoch = len(sampler) // options.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"The data set is too small: {len(dataset)} samples over {world.size} processes give no full batch of "
            f"{options.batch_size}."
        )
    last_step = min(options.steps, options.stop_at_step or options.steps)
    autocast = autocast_for(precision, world.device)
    if world.is_main:
        print(f"training {last_step - step} steps on {world.size} process(es), {world.device}, precision {precision}")
    losses: list[float] = []
    wrapped.train()
    # Closed on any exit, so that an error is printed on a line of its own.
    with tqdm(total=last_step, initial=step, desc="training", unit="step",
              disable=not (world.is_main and options.show_progress)) as progress:  # fmt: skip
        while step < last_step:
            for batch in _batches(dataset, sampler, step, steps_per_epoch, options.batch_size, collate_fn):
                step += 1
                batch = tree_map(lambda t: t.to(world.device) if isinstance(t, torch.Tensor) else t, batch)
                with autocast:
                    loss = compute_loss(wrapped, batch)
                # Every rank checks the same all-reduced value, so all of them stop together (none waits in a
                # collective for a rank that has left).
                loss_value = _mean_over_ranks(loss.detach().float(), world)
                if not math.isfinite(loss_value):
                    raise _diverged(step, f"the loss is {loss_value}", options, saved_step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                _check_finite(weights, step, loss_value, options, saved_step)
                losses.append(loss_value)
                if world.is_main:
                    progress.set_postfix(loss=f"{loss_value:.4f}")
                    progress.update()
                    _log(options, step, loss_value, scheduler.get_last_lr()[0])
                if step == last_step or (options.checkpoint_every and step % options.checkpoint_every == 0):
                    _save(model, optimizer, scheduler, step, options, world)
                    saved_step = step
                if after_step is not None:
                    after_step(model, step, step == last_step)
                if step == last_step:
                    break
    if world.size > 1:
        _report_replica_digests(model, world)
    return losses


def _report_replica_digests(model: nn.Module, world: World) -> None:
    """Rank 0 prints each process's parameter digest: DDP keeps replicas identical, and this shows it."""
    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    digests: list[str | None] = [None] * world.size
    dist.all_gather_object(digests, digest.hexdigest()[:16])
    if world.is_main:
        verdict = "identical" if len(set(digests)) == 1 else "DIFFERENT"
        print(f"parameter digests per rank: {digests} ({verdict})")


def _batches(dataset: Dataset, sampler: DistributedSampler, step: int, steps_per_epoch: int, batch_size: int,
             collate_fn: Callable | None) -> DataLoader:  # fmt: skip
    """The rest of the epoch that ``step`` falls in: each (seed, epoch) always gives the same order."""
    epoch, done = divmod(step, steps_per_epoch)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    batches = [indices[i * batch_size : (i + 1) * batch_size] for i in range(done, steps_per_epoch)]
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn)


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def _check_finite(
    weights: list[tuple[str, torch.Tensor]], step: int, loss: float, options: TrainingOptions, saved_step: int | None
) -> None:
    """Raise if ``step``'s update left a weight NaN or infinite (DDP replicas are identical, so every rank
    agrees); one device sync for the lot."""
    finite = torch.stack([tensor.isfinite().all() for _, tensor in weights])
    if not bool(finite.all()):
        names = [name for (name, _), ok in zip(weights, finite.tolist()) if not ok]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise _diverged(step, f"its update made {shown} non-finite (the loss was {loss:.4g})", options, saved_step)


def _diverged(step: int, what: str, options: TrainingOptions, saved_step: int | None) -> ValueError:
    if options.output_dir is None:
        kept = "Nothing was saved"
    elif saved_step is None:
        kept = f"Nothing of this run was saved to {options.output_dir}"
    else:
        kept = f"Nothing of it was saved: {options.output_dir / CHECKPOINT_NAME} still holds step {saved_step}"
    return ValueError(
        f"Training diverged at step {step}: {what}. {kept}. Lower the learning rate (it is "
        f"{options.learning_rate:g}) and start again."
    )


def _mean_over_ranks(value: torch.Tensor, world: World) -> float:
    if world.size > 1:
        dist.all_reduce(value)
        value = value / world.size
    return float(value)


def _log(options: TrainingOptions, step: int, loss: float, learning_rate: float) -> None:
    if options.output_dir is not None:
        options.output_dir.mkdir(parents=True, exist_ok=True)
        with open(options.output_dir / LOG_NAME, "a", encoding="utf-8") as log:
            log.write(json_line({"step": step, "loss": loss, "lr": learning_rate}))


def json_line(record: dict[str, Any]) -> str:
    """One line of a ``.jsonl`` log: strict JSON (a NaN or infinity raises rather than writing ``NaN``)."""
    return json.dumps(record, allow_nan=False) + "\n"


def keep_log_until(path: Path, step: int) -> list[dict[str, Any]]:
    """Drop the lines of the ``.jsonl`` log ``path`` after ``step`` (a resumed run redoes those steps) and
    return the rest."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    kept = [record for record in records if record["step"] <= step]
    if len(kept) < len(records):
        atomic_write(path, lambda staged: staged.write_text("".join(map(json_line, kept)), encoding="utf-8"))
    return kept


def _save(model: nn.Module, optimizer, scheduler, step: int, options: TrainingOptions, world: World) -> None:
    if options.output_dir is None or not world.is_main:
        return
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "rng": torch.get_rng_state(),
        "options": {key: str(value) for key, value in asdict(options).items() if key != "model_spec"},
        "model_spec": options.model_spec,
    }
    options.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(options.output_dir / CHECKPOINT_NAME, lambda path: torch.save(state, path))


def _restore(model: nn.Module, optimizer, scheduler, options: TrainingOptions, world: World) -> int:
    """Load the checkpoint of ``options.output_dir`` into the model, optimizer and schedule, all or nothing,
    after checking that it was saved for this model; returns its step."""
    path = None if options.output_dir is None else options.output_dir / CHECKPOINT_NAME
    if path is None or not path.is_file():
        raise ValueError(f"--resume needs a checkpoint, and {path} does not exist. Start again with --overwrite.")
    state = _read_training_checkpoint(path, world.device)
    saved_spec = state.get("model_spec")
    if saved_spec is not None and options.model_spec is not None and saved_spec != options.model_spec:
        differences = "; ".join(
            f"{key} {saved_spec.get(key)!r} there, {options.model_spec.get(key)!r} here"
            for key in sorted(saved_spec.keys() | options.model_spec.keys())
            if saved_spec.get(key) != options.model_spec.get(key)
        )
        raise ValueError(f"{path} was saved for another model ({differences}): resume with the same settings.")
    report = LoadReport(source_layout="training checkpoint")
    try:
        load_placed(model, state["model"], report)
    except CheckpointMismatchError:
        details = "; ".join(str(report).splitlines()[1:])
        raise ValueError(
            f"{path} holds the weights of another model ({details}): resume with the same settings."
        ) from None
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError) as error:
        raise ValueError(
            f"{path}: its optimizer state does not fit this run's trainable parameters (another "
            f"--trainable-layers?): {error}"
        ) from None
    torch.set_rng_state(state["rng"].cpu())
    step = int(state["step"])
    if world.is_main:
        keep_log_until(options.output_dir / LOG_NAME, step)
        print(f"resumed from {path} at step {step}")
    return step


def _read_training_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"{path} is not a readable training checkpoint (truncated or corrupt?): {reason}. Start again with "
            "--overwrite."
        ) from None
    needed = ("model", "optimizer", "scheduler", "step", "rng")
    missing = [key for key in needed if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"{path} is not a training checkpoint: it lacks {', '.join(missing)}.")
    return state
