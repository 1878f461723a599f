"""
What the acting parts of stage 2 (a step schedule, the mean teacher, a weighting with a look-ahead or a fit loop) may
use of the engine that runs them: a declared protocol, which
:py:class:`~monai_mlbseg.engines.stage2.MetaTrainer` implements. Parts are typed against it and never name the
trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from ignite.engine import State
from torch import nn

from monai_mlbseg.transforms import ViewTransform

from .context import ViewBatch

if TYPE_CHECKING:
    from .perturbations import Perturbation
    from .sources import LabelSource
    from .weightings import PixelWeighting

__all__ = ["Stage2Host"]


@runtime_checkable
class Stage2Host(Protocol):
    """
    The engine as an acting stage-2 part sees it.

    Attributes:
        network: the student.
        optimizer: its optimizer.
        loss_function: the weighted term ``loss_function(logits, sources, weights)``.
        state: the Ignite state (``device``, ``iteration``, ``output``).
        logger: the engine's logger.
        views: the view transform (``spatial_dims``, ``threshold``).
        sources: the label sources of the weighted term.
        weighting: the weighting of the sources.
        student_perturbation: what the student sees of the unlabeled views.
        compile: whether plain forwards are compiled; ``compile_kwargs`` their ``torch.compile`` arguments.
    """

    @property
    def network(self) -> nn.Module: ...

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...

    @property
    def loss_function(self) -> Callable: ...

    @property
    def state(self) -> State: ...

    @property
    def logger(self) -> logging.Logger: ...

    @property
    def views(self) -> ViewTransform: ...

    @property
    def sources(self) -> Sequence[LabelSource]: ...

    @property
    def weighting(self) -> PixelWeighting: ...

    @property
    def student_perturbation(self) -> Perturbation: ...

    @property
    def compile(self) -> bool: ...

    @property
    def compile_kwargs(self) -> dict: ...

    @property
    def output(self) -> dict[str, Any]:
        """The iteration's ``engine.state.output`` (a part adds its scalars)."""

    def add_event_handler(self, event_name: Any, handler: Callable, *args: Any, **kwargs: Any) -> Any:
        """Register ``handler`` for ``event_name`` (Ignite's)."""

    def fire_event(self, event_name: Any) -> None:
        """Fire ``event_name`` (Ignite's)."""

    def run_network(self, module: Callable[..., torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """``module``'s float32 logits of ``images`` through the engine's inferer and autocast setting."""

    def labeled_views(self) -> ViewBatch:
        """The next labeled batch expanded into its views."""

    def clean_loss(self, batch: ViewBatch) -> torch.Tensor:
        """The labeled loss on labeled views (the student's BCE plus the terms' labeled parts)."""

    def step(self, loss: torch.Tensor, what: str, event: Any, grad_clip: float | None) -> None:
        """Check ``loss`` is finite, backward, fire ``event``, clip the gradient norm to ``grad_clip``, step."""

    def apply_gradients(
        self, loss: torch.Tensor, grads: Mapping[str, torch.Tensor], what: str, event: Any, grad_clip: float | None
    ) -> None:
        """Check ``loss`` is finite, set the student's gradients (``loss``'s) by parameter name, fire ``event``, clip
        their norm to ``grad_clip``, step."""
