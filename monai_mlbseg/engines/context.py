"""What the parts of a stage-2 iteration share: the views, the student's prediction, and values computed once."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from monai_mlbseg.transforms import PLEResult, ViewParams, mix_targets

if TYPE_CHECKING:
    from .meta_trainer import MetaTrainer

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
    The clean batch's views with the student's prediction on them (the clean loss and its regularisers).

    Attributes:
        batch: the views, expert labels in the views and view parameters.
        logits: ``[N, 1, *S]`` the student's logits on what it saw of the views (``clean_augment`` of them).
        probs: their sigmoid.
    """

    batch: ViewBatch
    logits: torch.Tensor
    probs: torch.Tensor


class Stage2Context:
    """
    One iteration of a :py:class:`~monai_mlbseg.engines.MetaTrainer` as the parts see it. Everything is set when
    the ``views`` phase ends, except two values computed once, when a part first asks: the clean batch's views
    (:py:meth:`clean`) and the teacher's probabilities on the unlabeled views (:py:meth:`teacher_probs`).

    Attributes:
        trainer: the trainer (its forwards, teacher, threshold).
        unlabeled: the unlabeled views; ``labels`` are the initial labels in the views.
        student_views: what the student saw of ``unlabeled.views`` (``student_augment`` of them, or the views).
        logits: ``[N, 1, *S]`` the student's logits on ``student_views`` (float32, with a graph).
        probs: their sigmoid (the same graph).
        ple: the PLE ensemble of ``probs`` (pseudo labels thresholded at the trainer's threshold).
        clean_images: ``[M, C, *S]`` the clean batch's images; ``clean_labels`` their expert labels.
    """

    def __init__(
        self,
        trainer: MetaTrainer,
        unlabeled: ViewBatch,
        student_views: torch.Tensor,
        logits: torch.Tensor,
        probs: torch.Tensor,
        ple: PLEResult,
        clean_images: torch.Tensor,
        clean_labels: torch.Tensor,
    ) -> None:
        self.trainer = trainer
        self.unlabeled = unlabeled
        self.student_views = student_views
        self.logits = logits
        self.probs = probs
        self.ple = ple
        self.clean_images = clean_images
        self.clean_labels = clean_labels
        self._clean: ViewBatch | None = None
        self._teacher: torch.Tensor | None = None

    @property
    def pseudo(self) -> torch.Tensor:
        """``[N, 1, *S]`` the PLE pseudo labels of the unlabeled views."""
        return self.ple.pseudo_labels

    def clean(self) -> ViewBatch:
        """The clean batch's views, made on the first call (the view transform draws them then)."""
        if self._clean is None:
            self._clean = self.trainer.make_views(self.clean_images, self.clean_labels)
        return self._clean

    def teacher_probs(self) -> torch.Tensor:
        """
        The mean teacher's probabilities on the unlabeled views, computed on the first call; moved like the pixels of
        the student's views when ``student_augment`` mixes them (:py:class:`~monai_mlbseg.transforms.CutMix`).

        Raises:
            ValueError: when the trainer has no mean teacher.
        """
        if self._teacher is None:
            if self.trainer.mean_teacher is None:
                raise ValueError("this stage-2 part needs the mean teacher: give the trainer a MeanTeacher.")
            probs = self.trainer.mean_teacher.probs(self.unlabeled.views)
            self._teacher = mix_targets(self.trainer.student_augment, probs)
        return self._teacher
