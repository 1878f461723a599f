"""User-facing input errors: every problem names the file or case it is about."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

__all__ = ["Problem", "InputError"]


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
