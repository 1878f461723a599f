"""User-facing input errors: every problem names the file or case it is about."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import NamedTuple

__all__ = [
    "Problem",
    "InputError",
    "CasesFailed",
    "DEBUG_ENV",
    "INPUT_ERROR_STATUS",
    "CASES_FAILED_STATUS",
    "INTERRUPTED_STATUS",
    "Terminated",
    "debugging",
    "environment_problem",
    "find_input_error",
    "exit_on_input_error",
]

#: environment variable that, set to anything but ``""`` or ``"0"``, shows the traceback of a refused input.
DEBUG_ENV = "MLBSEG_DEBUG"
#: exit status of a run refused for bad input, or stopped by its environment (a full disk, an unwritable folder); a
#: crash exits with 1.
INPUT_ERROR_STATUS = 2
#: exit status of a run that went on past cases that failed mid-run (each named in the output) and finished the
#: others.
CASES_FAILED_STATUS = 3
#: exit status of a run interrupted with Ctrl-C (the shell's convention, 128 + SIGINT).
INTERRUPTED_STATUS = 130

#: what to do after an environment error: the run kept its last complete checkpoint
_RERUN = "then run the same command again: it continues from the last complete checkpoint"
_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


class Problem(NamedTuple):
    """One problem with the input.

    Attributes:
        where: the file, case id or datalist entry the problem is about.
        what: what is wrong, in words a user can act on.
    """

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


class InputError(ValueError):
    """
    Bad input, detected before any work starts. The command-line entry points print the message (no traceback)
    and exit with status 2; nothing has been written.

    Args:
        problems: the problems found (at least one).
        context: a short headline, e.g. ``"datalist check failed"``.
    """

    def __init__(self, problems: Iterable[Problem], context: str = "invalid input") -> None:
        self.problems = list(problems)
        if not self.problems:
            raise ValueError("InputError needs at least one problem.")
        self.context = context
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{context} ({len(self.problems)} problem{'s' if len(self.problems) > 1 else ''}):\n{lines}")


class CasesFailed(RuntimeError):
    """
    Some cases of a run failed mid-run (a volume that could not be read, predicted or written) while the run went on
    with the others, which are finished. The command-line entry points print the message (no traceback) and exit
    with status 3 (:py:data:`CASES_FAILED_STATUS`).

    Args:
        problems: one problem per failed case (at least one), ``where`` being its file.
        total: the number of cases of the run, failed ones included.

    Raises:
        ValueError: for no problems, or more problems than cases.

    Example::

        raise CasesFailed([Problem("/data/la_b.h5", "truncated file")], total=3)
        # 1 of 3 cases failed (the other 2 are done):
        #   - /data/la_b.h5: truncated file
    """

    def __init__(self, problems: Iterable[Problem], total: int) -> None:
        self.problems = list(problems)
        self.total = int(total)
        if not 0 < len(self.problems) <= self.total:
            raise ValueError(f"CasesFailed needs 1 to {self.total} problems, got {len(self.problems)}.")
        lines = "\n".join(f"  - {p}" for p in self.problems)
        done = self.total - len(self.problems)
        rest = f" (the other {done} are done)" if done else ""
        super().__init__(f"{len(self.problems)} of {self.total} cases failed{rest}:\n{lines}")


def _find(error: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def find_input_error(error: BaseException | None) -> InputError | None:
    """
    The :py:class:`InputError` behind ``error``: ``error`` itself or the first one along its chain of causes and
    contexts (MONAI's config parser wraps every error of an expression in ``RuntimeError("Failed to evaluate ...")``).

    Returns:
        the input error, or ``None`` when the chain holds none.
    """
    return _find(error, InputError)  # type: ignore[return-value]


class Terminated(BaseException):
    """The process was asked to stop (``SIGTERM``), raised where it was so that it stops as after Ctrl-C."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated("stopped by SIGTERM")


def _chain(error: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and all(error is not e for e in seen):
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def environment_problem(error: BaseException | None) -> tuple[str, int] | None:
    """
    The message and exit status of an error of the run's environment behind ``error`` (along its chain of causes):
    a full disk or quota, a folder that cannot be written, Ctrl-C or ``SIGTERM``. ``None`` for any other error.

    Example::

        environment_problem(OSError(errno.ENOSPC, "No space left on device", "work/stage2/x.pt"))
        # ("work/stage2/x.pt: no space left on the device; free some space ...", 2)
    """
    for link in _chain(error):
        if isinstance(link, KeyboardInterrupt):
            return f"interrupted (Ctrl-C); {_RERUN}", INTERRUPTED_STATUS
        if isinstance(link, Terminated):
            return f"stopped (SIGTERM); {_RERUN}", INPUT_ERROR_STATUS
        if isinstance(link, OSError) and link.errno in _FULL + _DENIED:
            where = link.filename or "the output folder"
            if link.errno in _FULL:
                what = "no space left on the device (or the quota is used up); free some space or give another output"
                return f"{where}: {what} folder, {_RERUN}", INPUT_ERROR_STATUS
            what = f"cannot be written ({link.strerror}); make the folder writable or give another output folder"
            return f"{where}: {what}, {_RERUN}", INPUT_ERROR_STATUS
    return None


def debugging() -> bool:
    """Whether :py:data:`DEBUG_ENV` asks for the tracebacks of the errors reported in the product's words."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _quiet_environment_errors() -> None:
    """Log an environment error or an :py:class:`InputError` without its traceback, whatever logger logs it (MONAI's
    ``StatsHandler`` logs the exception that ends a run, e.g. data changed under it): the process ends with the
    short message instead. Installed once."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_mlbseg_quiet", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and (environment_problem(error) or find_input_error(error)) and not debugging():
            record.exc_info = None
        return record

    factory._mlbseg_quiet = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def exit_on_input_error(logger_name: str = "monai_mlbseg") -> None:
    """
    Make an uncaught :py:class:`InputError` (also one wrapped by MONAI's config parser) end the process cleanly: its
    problems are logged at ERROR, one per line, as the last lines of the output, without a traceback (unless the
    environment variable :py:data:`DEBUG_ENV` is set), and the process exits with :py:data:`INPUT_ERROR_STATUS`.
    A :py:class:`CasesFailed` (a run that went on past failed cases) ends the same way, with its list of failed cases
    and :py:data:`CASES_FAILED_STATUS`.
    An error of the environment (:py:func:`environment_problem`: a full disk, an unwritable folder, Ctrl-C, and
    ``SIGTERM``, which is raised as :py:class:`Terminated` where the process is) ends the same way, with a message
    that names the file and says what to do, and :py:data:`INTERRUPTED_STATUS` for Ctrl-C; loggers then log such an
    error without its traceback. Other errors keep Python's usual report. Installing it twice is harmless.

    The bundles call it first thing in their ``initialize`` list, so that ``python -m monai.bundle run ...`` on bad
    data reads like ``python -m monai_mlbseg prepare``.

    Args:
        logger_name: the logger the problems are written to.

    Example::

        "initialize": ["$monai_mlbseg.utils.exit_on_input_error()", "$monai.utils.set_determinism(seed=@seed)"]
    """
    previous = sys.excepthook
    if getattr(previous, "_mlbseg_input_error_hook", False):
        return

    def hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        input_error, failed = find_input_error(error), _find(error, CasesFailed)
        if input_error is not None:
            found: tuple[str, int] | None = (str(input_error), INPUT_ERROR_STATUS)
        elif failed is not None:
            found = (str(failed), CASES_FAILED_STATUS)
        else:
            found = environment_problem(error)
        if found is None:
            previous(kind, error, tb)
            return
        if debugging():
            previous(kind, error, tb)
        message, status = found
        logger = logging.getLogger(logger_name)
        if logger.disabled or not logger.isEnabledFor(logging.ERROR):  # e.g. silenced by a logging config
            print(message, file=sys.stderr)
        else:
            logger.error(message)
        for handler in logging.getLogger().handlers + logger.handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)  # after the hook, Python would exit with 1, the status of a crash

    hook._mlbseg_input_error_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook
    _quiet_environment_errors()
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
