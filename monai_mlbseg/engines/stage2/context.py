"""What the computation parts of a stage-2 iteration see: the views, the student's prediction, values made on demand."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from monai_mlbseg.transforms import PLEResult, ViewParams

__all__ = ["LabeledViews", "Stage2Context", "ViewBatch"]


class ViewBatch(NamedTuple):
    """
    A batch expanded into its views.

    Attributes:
        views: ``[N, C, *S]`` the views (what the teacher and the look-ahead see), ``N = B K``.
        labels: ``[N, 1, *S]`` the batch's labels warped into the views (binary).
        params: the view parameters.
    """

    views: torch.Tensor
    labels: torch.Tensor
    params: ViewParams


class LabeledViews(NamedTuple):
    """
    The labeled batch's views with the student's prediction on them (the clean loss and its regularisers).

    Attributes:
        batch: the views, expert labels in the views (moved like the pixels the student saw) and view parameters.
        logits: ``[N, 1, *S]`` the student's logits on what it saw of the views.
        probs: their sigmoid.
        teacher: the mean teacher's probabilities of views (``None``: no mean teacher).
        student: the student's logits of other images (a further forward, with a graph; ``None``: not offered).
    """

    batch: ViewBatch
    logits: torch.Tensor
    probs: torch.Tensor
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None
    student: Callable[[torch.Tensor], torch.Tensor] | None = None

    def teacher_probs(self) -> torch.Tensor:
        """
        The mean teacher's probabilities on the labeled views.

        Raises:
            ValueError: without a mean teacher.
        """
        if self.teacher is None:
            raise ValueError("this stage-2 part needs the mean teacher: give the trainer a MeanTeacher.")
        return self.teacher(self.batch.views)


class Stage2Context:
    """
    One stage-2 iteration as its computation parts (label sources, unlabeled terms, weightings) see it: values, and
    three that are made once, when a part first asks (the labeled batch's views, the teacher's probabilities, the
    student's trainable parameters). A part never sees the engine.

    Args:
        unlabeled: the unlabeled views; ``labels`` are the initial labels in the views.
        student_views: what the student saw of ``unlabeled.views`` (its perturbation of them, or the views).
        logits: ``[N, 1, *S]`` the student's logits on ``student_views`` (float32, with a graph).
        probs: their sigmoid (the same graph).
        ple: the PLE ensemble of ``probs`` (pseudo labels thresholded at ``threshold``).
        threshold: the views' threshold of binary labels.
        labeled_views: makes the labeled batch's views (the view transform draws them when called).
        teacher: the mean teacher's probabilities of views, in the frame of what the student saw (``None``: no
            mean teacher).
        student: the student's logits of other images (a further forward, with a graph).
        parameters: the student's trainable parameters by name.
    """

    def __init__(
        self,
        unlabeled: ViewBatch,
        student_views: torch.Tensor,
        logits: torch.Tensor,
        probs: torch.Tensor,
        ple: PLEResult,
        threshold: float,
        labeled_views: Callable[[], ViewBatch],
        teacher: Callable[[torch.Tensor], torch.Tensor] | None,
        student: Callable[[torch.Tensor], torch.Tensor],
        parameters: Callable[[], list[tuple[str, nn.Parameter]]],
    ) -> None:
        self.unlabeled = unlabeled
        self.student_views = student_views
        self.logits = logits
        self.probs = probs
        self.ple = ple
        self.threshold = threshold
        self.student = student
        self._labeled_views = labeled_views
        self._teacher = teacher
        self._parameters = parameters
        self._clean: ViewBatch | None = None
        self._teacher_probs: torch.Tensor | None = None

    @property
    def pseudo(self) -> torch.Tensor:
        """``[N, 1, *S]`` the PLE pseudo labels of the unlabeled views."""
        return self.ple.pseudo_labels

    @property
    def has_teacher(self) -> bool:
        """Whether the iteration has a mean teacher."""
        return self._teacher is not None

    def clean(self) -> ViewBatch:
        """The labeled batch's views, made on the first call."""
        if self._clean is None:
            self._clean = self._labeled_views()
        return self._clean

    def teacher_probs(self) -> torch.Tensor:
        """
        The mean teacher's probabilities on the unlabeled views (moved like the pixels the student saw), computed on
        the first call.

        Raises:
            ValueError: without a mean teacher.
        """
        if self._teacher is None:
            raise ValueError("this stage-2 part needs the mean teacher: give the trainer a MeanTeacher.")
        if self._teacher_probs is None:
            self._teacher_probs = self._teacher(self.unlabeled.views)
        return self._teacher_probs

    def confidence_probs(self) -> torch.Tensor:
        """The probabilities a confidence is read from: the mean teacher's, or the student's own (detached)."""
        return self.teacher_probs() if self.has_teacher else self.probs.detach()

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The student's trainable parameters by name (for gradients of the iteration's losses)."""
        return self._parameters()

    def named_grads(self, loss: torch.Tensor | None) -> dict[str, torch.Tensor | None] | None:
        """The gradient of ``loss`` (a scalar with a graph) by parameter name, keeping the graph (``None``: none)."""
        if loss is None or not loss.requires_grad:
            return None
        named = self.named_parameters()
        grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
        return {n: g for (n, _), g in zip(named, grads)}
