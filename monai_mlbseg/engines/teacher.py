"""The mean teacher: an exponential moving average of the student, as an Ignite handler."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from ignite.engine import Engine, Events
from torch import nn

from monai_mlbseg.utils import unwrap_network

from .events import MetaIterationEvents

__all__ = ["MeanTeacherHandler"]


class MeanTeacherHandler:
    """
    Keeps ``teacher`` an exponential moving average of the trainer's network:
    ``theta' <- a theta' + (1 - a) theta`` with ``a = min(1 - 1 / (t + 1), decay)`` and ``t`` the 0-based global
    iteration (``engine.state.iteration - 1``), so the first update copies the student.

    The MLB-Seg reference restarts ``t`` every epoch, re-copying the student into the teacher at each epoch's first
    batch; here ``t`` is global (a documented difference). The teacher's parameters never require gradients. At
    the first iteration of a fresh run, after the ``STARTED`` handlers (checkpoint loaders among them), the teacher is
    initialised with the student's weights and buffers; a resumed run keeps the teacher restored from the
    checkpoint (include it in the checkpoint's ``save_dict``).

    Args:
        teacher: the teacher network (same architecture as the student).
        decay: the EMA decay (0.99 in the reference).
        events: when to update; default: after each optimizer step of a
            :py:class:`~monai_mlbseg.engines.MetaTrainer` (weighted step and clean step).
        student: the student; default: ``engine.network`` (DDP-unwrapped).

    Raises:
        ValueError: when ``decay`` is outside [0, 1].

    Example::

        MeanTeacherHandler(teacher, decay=0.99).attach(trainer)
    """

    def __init__(
        self,
        teacher: nn.Module,
        decay: float = 0.99,
        events: Sequence | None = None,
        student: nn.Module | None = None,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}.")
        self.teacher = teacher
        self.decay = float(decay)
        self.events = events
        self.student = student
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def attach(self, engine: Engine) -> None:
        """Register the start-up copy and the EMA updates with ``engine``."""
        default = (MetaIterationEvents.REAL_STEP_COMPLETED, MetaIterationEvents.CLEAN_STEP_COMPLETED)
        events: Sequence = default if self.events is None else self.events
        engine.add_event_handler(Events.ITERATION_STARTED(once=1), self.start)
        for event in events:
            engine.add_event_handler(event, self)

    def _student(self, engine: Engine) -> nn.Module:
        return unwrap_network(self.student if self.student is not None else engine.network)  # type: ignore[attr-defined]

    def start(self, engine: Engine) -> None:
        """Copy the student into the teacher at the start of a fresh (not resumed) run: at its first iteration,
        after every ``STARTED`` handler, so that weights a checkpoint loader put into the student at ``STARTED``
        (MONAI Label inserts one) are the teacher's too."""
        if engine.state.iteration <= 1:
            self.teacher.load_state_dict(self._student(engine).state_dict())

    def alpha(self, iteration: int) -> float:
        """EMA factor for the 1-based ``engine.state.iteration``."""
        t = max(iteration - 1, 0)
        return min(1.0 - 1.0 / (t + 1), self.decay)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        a = self.alpha(engine.state.iteration)
        student = dict(self._student(engine).named_parameters())
        for name, param in self.teacher.named_parameters():
            param.mul_(a).add_(student[name].detach(), alpha=1.0 - a)
