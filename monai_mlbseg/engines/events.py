"""The events of a :py:class:`~monai_mlbseg.engines.MetaTrainer` iteration, beyond MONAI's ``IterationEvents``."""

from __future__ import annotations

from ignite.engine import EventEnum

__all__ = ["MetaIterationEvents"]


class MetaIterationEvents(EventEnum):
    """
    Events fired inside a :py:class:`~monai_mlbseg.engines.MetaTrainer` iteration, in this order, in addition to
    MONAI's ``IterationEvents`` (which keep ``SupervisedTrainer``'s meaning: the weighted step is the iteration's
    model step).

    - ``PLE_COMPLETED``: after ``FORWARD_COMPLETED`` and the pseudo labels; ``engine.state.output`` holds the
      views, the initial labels in the views and the student's logits (``image``/``label``/``pred``).
    - ``WEIGHTS_COMPLETED``: the label sources and weight maps are in ``engine.state.weight_maps``.
    - ``REAL_STEP_COMPLETED``: after the weighted optimizer step (the mean teacher updates here).
    - ``CLEAN_STEP_STARTED``: before the clean step's forward.
    - ``CLEAN_BACKWARD_COMPLETED``: the clean step's gradients are in the parameters' ``.grad`` (before clipping
      and the optimizer step) and its loss is ``engine.state.output["loss_clean"]``.
    - ``CLEAN_STEP_COMPLETED``: after the clean-batch optimizer step (the mean teacher updates here too).

    In the supervised mode (no unlabeled data) an iteration is one clean step: ``CLEAN_STEP_STARTED`` (the clean
    views and their labels in ``engine.state.output``), MONAI's forward, loss and backward events,
    ``CLEAN_STEP_COMPLETED``, ``MODEL_COMPLETED``.
    """

    PLE_COMPLETED = "ple_completed"
    WEIGHTS_COMPLETED = "weights_completed"
    REAL_STEP_COMPLETED = "real_step_completed"
    CLEAN_STEP_STARTED = "clean_step_started"
    CLEAN_BACKWARD_COMPLETED = "clean_backward_completed"
    CLEAN_STEP_COMPLETED = "clean_step_completed"
