"""One run per folder: an advisory lock that the operating system releases when the process ends, however it ends."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO

from .errors import InputError, Problem

__all__ = ["LOCK_FILE", "lock_folder", "release_folder"]

#: the lock file, in the locked folder
LOCK_FILE = ".mlbseg.lock"

#: the folders this process holds, with their open lock files (a process may lock a folder again: reentrant)
_HELD: dict[Path, IO[str]] = {}


def _holder(lock: Path) -> str:
    """Who holds ``lock``, from what it recorded."""
    try:
        info = json.loads(lock.read_text(encoding="utf-8"))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"process {info['pid']} on {info['host']} (started {started}: {info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _other_rank() -> bool:
    """Whether this process is a rank other than 0 of a distributed job (whose rank 0 holds the job's lock)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() > 0


def lock_folder(folder: str | os.PathLike) -> Path:
    """
    Take the run lock of ``folder`` (created) for this process until it ends or calls :py:func:`release_folder`:
    a second process that asks for it is refused at once, naming the folder and the holder. The lock is
    ``flock`` on ``<folder>/.mlbseg.lock``: the operating system drops it when the holder exits, is killed
    (``SIGKILL`` included) or crashes, so a lock file left behind never blocks a later run. In a distributed job,
    rank 0 holds it for every rank. Where ``flock`` does not exist (Windows), nothing is locked.

    Args:
        folder: the run folder.

    Returns:
        the folder.

    Raises:
        InputError: when another process holds the folder.

    Example::

        lock_folder("work/7e0edaadb0")  # in the bundle's ``initialize``
    """
    folder = Path(folder).resolve()
    if folder in _HELD or _other_rank():
        return folder
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    handle = open(lock, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        what = f"is in use by {_holder(lock)}; wait for that run to finish or stop it, then run this command again"
        raise InputError([Problem(str(folder), what)], "a second run in the same folder is refused") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": " ".join(sys.argv)}
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(info))
    handle.flush()
    _HELD[folder] = handle
    return folder


def release_folder(folder: str | os.PathLike) -> None:
    """Release this process's run lock of ``folder`` (nothing when it holds none)."""
    handle = _HELD.pop(Path(folder).resolve(), None)
    if handle is not None:
        handle.close()
