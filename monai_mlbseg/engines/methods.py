"""The named stage-2 methods: compositions of :py:mod:`~monai_mlbseg.engines.parts`, in one registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from monai_mlbseg.transforms import StrongIntensityAugment

from .parts import (
    ConfidenceWeighting,
    InitialLabels,
    JointStep,
    MeanTeacher,
    MeanTeacherTerm,
    MetaWeighting,
    PixelWeighting,
    PseudoLabels,
    TeacherLabels,
    TwoSteps,
    UniformWeighting,
    ViewConsistencyTerm,
)
from .trust import InstanceMetaWeighting, QualityPredictor, QualityTerm, QualityWeighting

__all__ = ["STAGE2_METHODS", "Stage2Method", "matched_control", "stage2_method"]

#: the ``MetaTrainer`` arguments a method sets (every one, so that switching methods switches all of them)
METHOD_KEYS = (
    "sources",
    "terms",
    "weighting",
    "schedule",
    "mean_teacher",
    "student_augment",
    "clean_augment",
    "grad_clip",
)


@dataclass(frozen=True)
class Stage2Method:
    """
    A named stage-2 method.

    Attributes:
        title: its name in reports.
        description: one paragraph: what it does (the bundle READMEs and the demo report show it).
        measured: its measured effect on real left-atrium scans (``docs/results.md``).
        cost: its cost per optimizer step, relative to a supervised step.
        parts: ``parts(teacher)`` builds fresh parts: the ``MetaTrainer`` arguments of :py:data:`METHOD_KEYS`
            (``teacher``: the mean teacher's network, or ``None`` for a copy of the student).
        labeled_only: the method trains on the labeled data alone (the control every row is compared with): it
            is run with an empty unlabeled loader.
    """

    title: str
    description: str
    measured: str
    cost: str
    parts: Callable[[nn.Module | None], dict[str, Any]]
    labeled_only: bool = False


def _parts(**parts: Any) -> dict[str, Any]:
    defaults = dict.fromkeys(("mean_teacher", "student_augment", "clean_augment"))
    return {"sources": [], "terms": [], "weighting": UniformWeighting(), "schedule": TwoSteps(), **defaults, **parts}


def _reference_terms() -> list:
    return [ViewConsistencyTerm(1.0), MeanTeacherTerm(1.0)]


def _weak_to_strong(teacher: nn.Module | None, weighting: PixelWeighting, terms: tuple = ()) -> dict[str, Any]:
    """The weak-to-strong mean teacher with a pseudo-label trust: the student on a strong perturbation of the views
    learns the teacher's labels of the views, weighted by ``weighting``, in one joint step with the labeled loss."""
    return _parts(
        sources=[TeacherLabels()],
        terms=list(terms),
        weighting=weighting,
        schedule=JointStep(),
        mean_teacher=MeanTeacher(teacher),
        student_augment=StrongIntensityAugment(contrast=0.25, shift=0.2, noise_std=0.08, blur_prob=0.5),
        grad_clip=None,
    )


def _quality_guided(teacher: nn.Module | None) -> dict[str, Any]:
    predictor = QualityPredictor()
    return _weak_to_strong(teacher, QualityWeighting(predictor), (QualityTerm(predictor, 0.1),))


#: the stage-2 methods by name
STAGE2_METHODS: dict[str, Stage2Method] = {
    "mlbseg": Stage2Method(
        title="MLB-Seg",
        description=(
            "The method as the reference defines it: meta-learned per-pixel weights (a look-ahead SGD step judged "
            "on a clean batch) for the bootstrapped initial labels and the PLE pseudo labels of the unlabeled "
            "slices, plus view consistency and a mean teacher, in a weighted step followed by a clean step, every "
            "step clipped at 0.2."
        ),
        measured=(
            "2.2 to 3.8 Dice below labeled-only training (3 seeds, 64 and 96 px; docs/results.md findings 13, 18, 25)"
        ),
        cost="an iteration about 2.4 supervised steps on the same views (docs/benchmarks.md); two optimizer steps",
        parts=lambda teacher: _parts(
            sources=[InitialLabels(), PseudoLabels()],
            terms=_reference_terms(),
            weighting=MetaWeighting(),
            mean_teacher=MeanTeacher(teacher),
            grad_clip=0.2,
        ),
    ),
    "weak_to_strong": Stage2Method(
        title="weak-to-strong mean teacher",
        description=(
            "A mean teacher with weak-to-strong consistency: the student sees a strong intensity perturbation of "
            "the unlabeled slices' views, the teacher the views themselves, and the student is trained on the "
            "teacher's labels where the teacher is at least 95 % confident, in one joint step with the labeled "
            "loss, without a gradient clip. No meta step: the trust in a pseudo label is the fixed confidence "
            "threshold."
        ),
        measured=(
            "+0.86 Dice over labeled-only training with the same perturbation and optimizer settings (its matched "
            "control) at 64 px and 300 steps (35 of 48 cases, 3 seeds), +1.39 at 1,200 steps, +0.07 with 8 labeled "
            "cases; +5.03 over labeled-only training with the reference's settings (docs/results.md findings 36-40)"
        ),
        cost="one optimizer step: student forward and backward on both batches, one teacher forward",
        parts=lambda teacher: _weak_to_strong(teacher, ConfidenceWeighting(0.95)),
    ),
    "instance_meta": Stage2Method(
        title="weak-to-strong with instance meta weights",
        description=(
            "The weak-to-strong mean teacher with one meta-learned weight per unlabeled view on top of the 0.95 "
            "confidence threshold: a look-ahead SGD step on the view's confident teacher labels, judged on the clean "
            "batch, raises (up to twice) the weight of views whose labels move the model towards the labeled data "
            "and lowers the others (the instance-level re-weighting of hybrid supervision, DII)."
        ),
        measured=(
            "-0.28 Dice against weak_to_strong (25 of 48 cases better, 3 seeds, 64 px), +0.58 over the matched "
            "control; its weights select right pseudo-label pixels no better (AUC 0.77 to 0.86, the fixed "
            "threshold's 0.77 to 0.84; docs/results.md finding 36)"
        ),
        cost="one optimizer step plus a look-ahead (one backward on the clean views, one Jacobian-vector product)",
        parts=lambda teacher: _weak_to_strong(teacher, InstanceMetaWeighting()),
    ),
    "quality_guided": Stage2Method(
        title="weak-to-strong with a quality predictor",
        description=(
            "The weak-to-strong mean teacher with per-view trust from a quality predictor: a small CNN fitted before "
            "stage 2 on the labeled slices only (corrupted expert masks and the stage-1 model's own predictions, each "
            "with its true Dice) predicts the Dice of the teacher's label of each view, which scales that view's "
            "confident pixels; the same predictor, frozen, also scores the student's prediction as a regulariser "
            "(weight 0.1)."
        ),
        measured=(
            "-1.61 Dice against weak_to_strong (seed 0, 4 of 16 cases better, 64 px), -0.37 against the matched "
            "control; its per-view weights select worse as stage 2 goes on (AUC 0.79 to 0.75; docs/results.md "
            "finding 36)"
        ),
        cost="one optimizer step plus the predictor (a small CNN), fitted once in 300 Adam steps",
        parts=_quality_guided,
    ),
    "mean_teacher": Stage2Method(
        title="mean teacher",
        description=(
            "The student's predictions of the unlabeled slices' views are pulled towards an EMA teacher's (squared "
            "difference); no weighted term; a consistency step then a clean step, clipped at 0.2."
        ),
        measured="0.1 to 0.5 Dice below labeled-only training (3 seeds; docs/results.md findings 13, 18)",
        cost="two optimizer steps; one teacher forward per batch",
        parts=lambda teacher: _parts(terms=[MeanTeacherTerm(1.0)], mean_teacher=MeanTeacher(teacher), grad_clip=0.2),
    ),
    "self_training": Stage2Method(
        title="self-training",
        description=(
            "Plain bootstrapping: the student trains on the initial labels of the unlabeled slices (the stage-1 "
            "model's predictions) with uniform weights, then a clean step; no teacher, no pseudo-label ensemble."
        ),
        measured="2.5 to 2.7 Dice below labeled-only training (3 seeds; docs/results.md findings 13, 18)",
        cost="two optimizer steps, no teacher",
        parts=lambda teacher: _parts(sources=[InitialLabels()], grad_clip=0.2),
    ),
    "labeled_only": Stage2Method(
        title="labeled only (control)",
        description=(
            "The control: stage 1 continued on the labeled slices alone, with the reference's clean step (BCE plus "
            "view consistency and a mean teacher on the labeled views, clipped at 0.2) and the stage-2 schedule. "
            "What a method gains over it is what the unlabeled slices add."
        ),
        measured="the baseline of every comparison",
        cost="one supervised step per iteration",
        parts=lambda teacher: _parts(terms=_reference_terms(), mean_teacher=MeanTeacher(teacher), grad_clip=0.2),
        labeled_only=True,
    ),
}


def stage2_method(name: str, teacher: nn.Module | None = None, **overrides: Any) -> dict[str, Any]:
    """
    The ``MetaTrainer`` arguments of a named stage-2 method, freshly built: the bundles read every one from
    ``$monai_mlbseg.engines.stage2_method(@stage2_method, @teacher)``, so ``--stage2_method`` switches all of them.

    Args:
        name: a key of :py:data:`STAGE2_METHODS`.
        teacher: the mean teacher's network for methods with one (default: a copy of the student).
        overrides: arguments of :py:data:`METHOD_KEYS` to replace, e.g. ``grad_clip=0.2``.

    Returns:
        ``{argument: value}`` for :py:class:`~monai_mlbseg.engines.MetaTrainer`.

    Raises:
        ValueError: for an unknown name (the message lists the known ones) or an override that is not a method's
            argument.

    Example::

        trainer = MetaTrainer(..., **stage2_method("weak_to_strong"))
    """
    if name not in STAGE2_METHODS:
        raise ValueError(f"unknown stage-2 method {name!r}; known: {', '.join(STAGE2_METHODS)}.")
    unknown = sorted(set(overrides) - set(METHOD_KEYS))
    if unknown:
        raise ValueError(f"{', '.join(unknown)} not a stage-2 method argument; known: {', '.join(METHOD_KEYS)}.")
    return {**STAGE2_METHODS[name].parts(teacher), **overrides}


def matched_control(name: str, teacher: nn.Module | None = None) -> dict[str, Any]:
    """
    The ``MetaTrainer`` arguments of the labeled-only control matched to a named method: the method's parts with the
    same perturbation and optimizer settings on the labeled data, so that what the method gains over it is what the
    unlabeled data add. The labeled views get the method's ``clean_augment`` or, without one, its
    ``student_augment`` (the perturbation its student sees); the clean loss keeps the method's terms' clean parts and
    its gradient clip. Train it with an empty unlabeled loader (the trainer then makes clean steps only).

    Args:
        name: a key of :py:data:`STAGE2_METHODS`.
        teacher: as :py:func:`stage2_method`.

    Returns:
        ``{argument: value}`` for :py:class:`~monai_mlbseg.engines.MetaTrainer`.

    Raises:
        ValueError: for an unknown name.

    Example::

        control = MetaTrainer(..., train_data_loader=[], **matched_control("weak_to_strong"))
    """
    parts = stage2_method(name, teacher)
    augment = parts["clean_augment"] if parts["clean_augment"] is not None else parts["student_augment"]
    return {**parts, "sources": [], "clean_augment": augment, "student_augment": None}
