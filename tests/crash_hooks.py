"""Hooks that kill the running process (SIGKILL: no cleanup, no exception handlers) at chosen points, for the
crash-safety tests. They are armed from an extra bundle config file that the tests add to the command line."""

from __future__ import annotations

import os
import signal
import time

import nibabel as nib
from ignite.engine import Events


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_iteration(trainer, iteration: int):
    """SIGKILL the process when ``trainer`` completes ``iteration`` (after its handlers, e.g. checkpoints, ran)."""
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=iteration), lambda engine: _die())
    return trainer


def kill_while_writing(nth: int) -> None:
    """SIGKILL the process in the middle of the ``nth`` NIfTI write: half a file on disk, never renamed."""
    calls = {"n": 0}
    save = nib.save

    def dying_save(img, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth:
            with open(filename, "wb") as f:
                f.write(b"\x5c\x01\x00\x00 half a header")
                f.flush()
            _die()
        return save(img, filename, *args, **kwargs)

    nib.save = dying_save


def pause_at_iteration(trainer, iteration: int, marker: str, seconds: float = 300.0):
    """Write ``marker`` and wait when ``trainer`` completes ``iteration``: a run that holds its folder meanwhile. It
    goes on when ``marker`` is removed, or after ``seconds``."""

    def pause(engine) -> None:
        with open(marker, "w") as f:
            f.write("paused")
        deadline = time.time() + seconds
        while os.path.exists(marker) and time.time() < deadline:
            time.sleep(0.2)

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=iteration), pause)
    return trainer


def fill_disk_at_save(nth: int) -> None:
    """Make the ``nth`` ``torch.save`` fail as on a full disk (``OSError(ENOSPC)`` with no file name, as a write
    call raises it), after half the file is written."""
    import errno

    import torch

    calls = {"n": 0}
    save = torch.save

    def full(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    torch.save = full


def replace_file_at_iteration(trainer, iteration: int, path: str, replacement: str):
    """Copy ``replacement`` over the data file ``path`` when ``trainer`` completes ``iteration``: the data change
    under a running stage (a volume replaced, or a label corrected in place, while training)."""
    import shutil

    trainer.add_event_handler(
        Events.ITERATION_COMPLETED(once=iteration), lambda engine: shutil.copyfile(replacement, path)
    )
    return trainer


def fill_disk_at_iteration(trainer, iteration: int, filler: str):
    """Fill the device that holds ``filler`` when ``trainer`` completes ``iteration``, with a file of that name: the
    next write on that device fails as on a real full disk."""

    def fill(engine) -> None:
        fd, size = os.open(filler, os.O_WRONLY | os.O_CREAT), 1 << 20
        while size:
            try:
                os.write(fd, b"\0" * size)
            except OSError:
                size //= 2
        os.close(fd)

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=iteration), fill)
    return trainer
