"""Label sources, a part kind of stage 2: the targets of the weighted term, each with a weight channel."""

from __future__ import annotations

import torch

from .context import Stage2Context

__all__ = ["InitialLabels", "LabelSource", "PseudoLabels", "TeacherLabels"]


class LabelSource:
    """
    A target of the weighted term, ``[N, 1, *S]`` in the unlabeled views' frame, values in ``[0, 1]``, treated as a
    constant. It gets a weight channel of the weighting, a ``weight_<name>`` output entry and an entry in
    ``engine.state.weight_maps["sources"]``. A source sees only the iteration's context.

    Example::

        class SmoothedPrediction(LabelSource):
            name = "smoothed"

            def __call__(self, ctx):
                return F.avg_pool2d(ctx.probs.detach(), 3, stride=1, padding=1)
    """

    name = "source"

    def __call__(self, ctx: Stage2Context) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(ctx).")


class InitialLabels(LabelSource):
    """The bootstrapped initial labels of the unlabeled images, warped into the views."""

    name = "initial"

    def __call__(self, ctx: Stage2Context) -> torch.Tensor:
        return ctx.unlabeled.labels


class PseudoLabels(LabelSource):
    """
    The student's pseudo labels of the views.

    Args:
        ensemble: the PLE pseudo labels (the view predictions mapped back, averaged, warped into every view,
            thresholded: the reference); off: each view's own prediction thresholded.
    """

    name = "pseudo"

    def __init__(self, ensemble: bool = True) -> None:
        self.ensemble = ensemble

    def __call__(self, ctx: Stage2Context) -> torch.Tensor:
        if self.ensemble:
            return ctx.pseudo
        return (ctx.probs.detach() > ctx.threshold).float()


class TeacherLabels(LabelSource):
    """The mean teacher's prediction of each view, thresholded at the views' threshold."""

    name = "teacher"

    def __call__(self, ctx: Stage2Context) -> torch.Tensor:
        return (ctx.teacher_probs() > ctx.threshold).float()
