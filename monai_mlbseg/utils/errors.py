"""User-facing input errors: every problem names the file or case it is about."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from types import TracebackType
from typing import NamedTuple

__all__ = ["Problem", "InputError", "DEBUG_ENV", "INPUT_ERROR_STATUS", "find_input_error", "exit_on_input_error"]

#: environment variable that, set to anything but ``""`` or ``"0"``, shows the traceback of a refused input.
DEBUG_ENV = "MLBSEG_DEBUG"
#: exit status of a run refused for bad input (a crash exits with 1).
INPUT_ERROR_STATUS = 2


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


def find_input_error(error: BaseException | None) -> InputError | None:
    """
    The :py:class:`InputError` behind ``error``: ``error`` itself or the first one along its chain of causes and
    contexts (MONAI's config parser wraps every error of an expression in ``RuntimeError("Failed to evaluate ...")``).

    Returns:
        the input error, or ``None`` when the chain holds none.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, InputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def exit_on_input_error(logger_name: str = "monai_mlbseg") -> None:
    """
    Make an uncaught :py:class:`InputError` (also one wrapped by MONAI's config parser) end the process cleanly: its
    problems are logged at ERROR, one per line, as the last lines of the output, without a traceback (unless the
    environment variable :py:data:`DEBUG_ENV` is set), and the process exits with :py:data:`INPUT_ERROR_STATUS`.
    Other errors keep Python's usual report. Installing it twice is harmless.

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
        input_error = find_input_error(error)
        if input_error is None:
            previous(kind, error, tb)
            return
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            previous(kind, error, tb)
        logger = logging.getLogger(logger_name)
        if logger.disabled or not logger.isEnabledFor(logging.ERROR):  # e.g. silenced by a logging config
            print(str(input_error), file=sys.stderr)
        else:
            logger.error(str(input_error))
        for handler in logging.getLogger().handlers + logger.handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INPUT_ERROR_STATUS)  # after the hook, Python would exit with 1, the status of a crash

    hook._mlbseg_input_error_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook
