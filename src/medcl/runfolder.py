"""Run folders: one process at a time, and nothing finished is overwritten silently.

Every command that writes a run folder (pretraining, fine-tuning, evaluation, export) holds
:func:`run_lock` on it while it works, and calls :func:`refuse_existing` before it starts:

    with run_lock(out, "medcl finetune"):
        refuse_existing(out, ["results.json", "comparison.json"], overwrite, "fine-tuning results")
        ...

The lock is an advisory ``flock`` on ``OUT/.medcl.lock`` (the file records the holder's pid and
command): the kernel releases it when the holder dies, even by ``kill -9``, so a stale lock file
never blocks a later run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

LOCK_NAME = ".medcl.lock"


class RunFolderError(FileExistsError):
    """The run folder is in use by another process, or already holds results (message says which)."""


@contextlib.contextmanager
def run_lock(folder: str | Path, command: str = "medcl") -> Iterator[Path]:
    """Hold the folder's lock for the duration of the block; a second process is refused with the
    holder's pid and command."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunFolderError(f"{folder}: in use by {holder}; wait for it to finish or choose another output folder") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({command}: {' '.join(sys.argv[1:])[:200]})".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def refuse_existing(folder: str | Path, names: Sequence[str], overwrite: bool, what: str) -> list[Path]:
    """Raise unless none of ``names`` exists in ``folder`` (or ``overwrite``); returns those found."""
    folder = Path(folder)
    found = [folder / n for n in names if (folder / n).exists()]
    if found and not overwrite:
        raise RunFolderError(f"{folder}: already holds {what} ({', '.join(p.name for p in found)}); "
                             "pass --overwrite to replace them, or choose another output folder")
    return found
