"""Stop training before a non-finite loss reaches the weights, or when the data change under a run."""

from __future__ import annotations

import math

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from monai_mlbseg.utils.manifest import DataManifest

__all__ = ["NonFiniteLossGuard", "DataUnchangedGuard", "check_finite"]


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


class DataUnchangedGuard:
    """
    Ignite handler: stop a training stage when a data file of its run changed since the run's
    :py:class:`~monai_mlbseg.utils.DataManifest` was made (a volume replaced, a label corrected in place): at the
    start, after every iteration (before the checkpoint savers attached after it) and at the end, before the
    stage's weights are saved. Only sizes and modification times are read unless one differs, so the check costs
    a ``stat`` per file. The run folder is keyed to the content the manifest recorded, so its checkpoints never
    hold a step on the new content, and the same command rerun starts a new run on it.

    Args:
        manifest: the run's data manifest.

    Example::

        DataUnchangedGuard(manifest).attach(trainer)  # first among the train handlers
    """

    def __init__(self, manifest: DataManifest) -> None:
        self.manifest = manifest

    def attach(self, engine: Engine) -> None:
        for event in (Events.STARTED, Events.ITERATION_COMPLETED, Events.COMPLETED):
            engine.add_event_handler(event, self)

    def __call__(self, engine: Engine) -> None:
        self.manifest.verify(f"training (iteration {engine.state.iteration})")
