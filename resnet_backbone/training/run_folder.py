"""A training run's output folder: one run at a time in it, and never two runs' files mixed.

A folder that already holds a run is refused unless the user says what to do with it (``--resume``
continues it, ``--overwrite`` replaces it). A lock file, held for the run's whole life, keeps a second
process out: it is an ``fcntl.flock`` lock, which the operating system releases when its process ends in any
way (a kill included), so a lock left by a dead process is never mistaken for a live one.
"""

from __future__ import annotations

import os
import shutil
import socket
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

LOCK_NAME = ".train.lock"


def refuse_to_mix_runs(directory: Path, run_files: Sequence[str], *, resume: bool, overwrite: bool) -> None:
    """Raise unless ``directory`` holds no run, or the user said to continue (``resume``) or replace it
    (``overwrite``) the run it holds. ``run_files``: the names that make up a run."""
    found = earlier_run_files(directory, run_files)
    if found and not (resume or overwrite):
        raise ValueError(
            f"{directory} already holds a training run ({', '.join(found)}). Continue it with --resume, replace "
            "it with --overwrite, or choose another --output-dir."
        )


def earlier_run_files(directory: Path, run_files: Sequence[str]) -> list[str]:
    """Which of ``run_files`` ``directory`` holds."""
    return [name for name in run_files if (directory / name).exists()]


def remove_run(directory: Path, run_files: Sequence[str]) -> None:
    """Delete the run's own files and folders in ``directory``, and nothing else the user keeps there."""
    found = earlier_run_files(directory, run_files)
    for name in found:
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if found:
        print(f"--overwrite: removed the earlier run's {', '.join(found)} from {directory}")


@contextmanager
def run_folder_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory/.train.lock`` until the block ends; refuse if another live process holds it.

    The file keeps the holder's PID and host, for the message a second run gets, and is emptied on a clean
    release: a PID still in it when the lock is free was left by a process that was killed.
    """
    if fcntl is None:
        warnings.warn(
            f"No lock on {directory}: this platform has no fcntl, so nothing stops a second run from writing "
            "into the same folder at the same time.",
            stacklevel=3,
        )
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    # Opened without truncating: the holder's PID must stay readable until the lock is ours.
    with open(path, "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"Another training run ({_holder(lock) or 'PID unknown'}) is writing into {directory} (it holds "
                f"{path}). Wait for it to end, or choose another --output-dir."
            ) from None
        left_by = _holder(lock)
        if left_by is not None:
            print(f"{path} was left by {left_by}, which ended without releasing it (killed?); this run takes it over")
        _write(lock, f"{os.getpid()} {socket.gethostname()}\n")
        try:
            yield
        finally:
            _write(lock, "")
            fcntl.flock(lock, fcntl.LOCK_UN)


def _holder(lock) -> str | None:  # noqa: ANN001  (an open text file)
    """``PID 1234 on host`` as the holder wrote it; None when the file names nobody."""
    lock.seek(0)
    fields = lock.read().split()
    return f"PID {fields[0]} on {fields[1]}" if len(fields) == 2 else None


def _write(lock, text: str) -> None:  # noqa: ANN001  (an open text file)
    lock.seek(0)
    lock.truncate()
    lock.write(text)
    lock.flush()


@contextmanager
def claimed_run_folder(
    directory: Path, run_files: Sequence[str], *, is_main: bool, resume: bool, overwrite: bool
) -> Iterator[None]:
    """Rank 0 (``is_main``, the only writer) locks ``directory`` for the run's lifetime, once every input has
    passed its checks (a refused run writes nothing, not even the folder), and refuses one that holds another
    run unless ``resume`` or ``overwrite`` says what to do with it. Other ranks pass straight through."""
    if not is_main:
        yield
        return
    with run_folder_lock(directory):
        refuse_to_mix_runs(directory, run_files, resume=resume, overwrite=overwrite)
        if overwrite:
            # The earlier run goes now, once the data and the model have passed their checks, rather than
            # once this run has checkpointed: until then the folder would hold parts of two runs (new log
            # lines beside the old checkpoint, model/ and best/), and a crash in between would leave exactly
            # that mix. --overwrite says the earlier run is not wanted; a mistake in the other arguments
            # still fails before it is touched.
            remove_run(directory, run_files)
        yield
