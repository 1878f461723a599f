"""Stop training on a non-finite loss before it reaches the weights."""

from __future__ import annotations

import math

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents

__all__ = ["NonFiniteLossGuard", "check_finite"]


def check_finite(loss: torch.Tensor | float, engine: Engine, what: str = "loss") -> None:
    """
    Raise when ``loss`` is NaN or infinite, naming where training stopped.

    Raises:
        FloatingPointError: the loss is not finite; no optimizer step has used it.
    """
    value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
    if not math.isfinite(value):
        raise FloatingPointError(
            f"non-finite {what} ({value}) at iteration {engine.state.iteration}, epoch {engine.state.epoch}: "
            "training stopped before the optimizer step, so the weights and the saved checkpoints hold the last "
            "good state. Check the data (intensity range) or lower the learning rate, then rerun to resume."
        )


class NonFiniteLossGuard:
    """
    Ignite handler for MONAI trainers: after the loss is computed and before the backward pass
    (``IterationEvents.LOSS_COMPLETED``), stop with a clear ``FloatingPointError`` if it is NaN or infinite.
    :py:class:`~monai_mlbseg.engines.MetaTrainer` checks its two losses itself.

    Example::

        NonFiniteLossGuard().attach(supervised_trainer)
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        check_finite(engine.state.output["loss"], engine)
