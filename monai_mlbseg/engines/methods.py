"""The named stage-2 methods: compositions of the parts of :py:mod:`~monai_mlbseg.engines.stage2`, in one registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from monai_mlbseg.transforms import StrongIntensityAugment

from .stage2 import (
    ConfidenceWeighting,
    InitialLabels,
    JointStep,
    LabeledOnly,
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

__all__ = [
    "METHOD_KEYS",
    "OPTION_KEYS",
    "STAGE2_METHODS",
    "Stage2Method",
    "as_matched_control",
    "matched_control",
    "stage2_method",
]

#: the ``MetaTrainer`` arguments a method sets (every one, so that switching methods switches all of them)
METHOD_KEYS = ("sources", "terms", "weighting", "schedule", "mean_teacher", "student_augment", "clean_augment")

#: what :py:func:`stage2_method` may change besides :py:data:`METHOD_KEYS`: the schedule's gradient clip
OPTION_KEYS = ("grad_clip",)


@dataclass(frozen=True)
class Stage2Method:
    """
    A named stage-2 method. Its measured effect and cost are data, not code: ``docs/results/effects.json``, from
    which the bundle READMEs' table is generated.

    Attributes:
        title: its name in reports.
        description: one paragraph: what it does (the bundle READMEs and the demo report show it).
        parts: ``parts(teacher)`` builds fresh parts: the ``MetaTrainer`` arguments of :py:data:`METHOD_KEYS`
            (``teacher``: the mean teacher's network, or ``None`` for a copy of the student).
    """

    title: str
    description: str
    parts: Callable[[nn.Module | None], dict[str, Any]]


def _parts(**parts: Any) -> dict[str, Any]:
    defaults = dict.fromkeys(("mean_teacher", "student_augment", "clean_augment"))
    return {"sources": [], "terms": [], "weighting": UniformWeighting(), "schedule": TwoSteps(0.2), **defaults, **parts}


def _reference_terms() -> list:
    return [ViewConsistencyTerm(1.0), MeanTeacherTerm(1.0)]


def _weak_to_strong(teacher: nn.Module | None, weighting: PixelWeighting, terms: tuple = ()) -> dict[str, Any]:
    """The weak-to-strong mean teacher with a pseudo-label trust: the student on a strong perturbation of the views
    learns the teacher's labels of the views, weighted by ``weighting``, in one joint step with the labeled loss."""
    return _parts(
        sources=[TeacherLabels()],
        terms=list(terms),
        weighting=weighting,
        schedule=JointStep(grad_clip=None),
        mean_teacher=MeanTeacher(teacher),
        student_augment=StrongIntensityAugment(contrast=0.25, shift=0.2, noise_std=0.08, blur_prob=0.5),
    )


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
        parts=lambda teacher: _parts(
            sources=[InitialLabels(), PseudoLabels()],
            terms=_reference_terms(),
            weighting=MetaWeighting(),
            mean_teacher=MeanTeacher(teacher),
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
        parts=lambda teacher: _weak_to_strong(teacher, ConfidenceWeighting(0.95)),
    ),
    "mean_teacher": Stage2Method(
        title="mean teacher",
        description=(
            "The student's predictions of the unlabeled slices' views are pulled towards an EMA teacher's (squared "
            "difference); no weighted term; a consistency step then a clean step, clipped at 0.2."
        ),
        parts=lambda teacher: _parts(terms=[MeanTeacherTerm(1.0)], mean_teacher=MeanTeacher(teacher)),
    ),
    "self_training": Stage2Method(
        title="self-training",
        description=(
            "Plain bootstrapping: the student trains on the initial labels of the unlabeled slices (the stage-1 "
            "model's predictions) with uniform weights, then a clean step; no teacher, no pseudo-label ensemble."
        ),
        parts=lambda teacher: _parts(sources=[InitialLabels()]),
    ),
    "labeled_only": Stage2Method(
        title="labeled only (control)",
        description=(
            "The control: stage 1 continued on the labeled slices alone, with the reference's clean step (BCE plus "
            "view consistency and a mean teacher on the labeled views, clipped at 0.2) and the stage-2 schedule. "
            "What a method gains over it is what the unlabeled slices add."
        ),
        parts=lambda teacher: _parts(
            terms=_reference_terms(), schedule=LabeledOnly(0.2), mean_teacher=MeanTeacher(teacher)
        ),
    ),
}


def stage2_method(name: str, teacher: nn.Module | None = None, **overrides: Any) -> dict[str, Any]:
    """
    The ``MetaTrainer`` arguments of a named stage-2 method, freshly built: the bundles read every one from
    ``$monai_mlbseg.engines.stage2_method(@stage2_method, @teacher)``, so ``--stage2_method`` switches all of them.

    Args:
        name: a key of :py:data:`STAGE2_METHODS`.
        teacher: the mean teacher's network for methods with one (default: a copy of the student).
        overrides: arguments of :py:data:`METHOD_KEYS` to replace, e.g. ``weighting=MetaWeighting()``, or
            ``grad_clip``: the gradient clip of the method's schedule (``None``: none).

    Returns:
        ``{argument: value}`` for :py:class:`~monai_mlbseg.engines.MetaTrainer`.

    Raises:
        ValueError: for an unknown name (the message lists the known ones), an override that is not a method's
            argument or option, or a ``grad_clip`` that is not positive.

    Example::

        trainer = MetaTrainer(..., **stage2_method("weak_to_strong"))
    """
    if name not in STAGE2_METHODS:
        raise ValueError(f"unknown stage-2 method {name!r}; known: {', '.join(STAGE2_METHODS)}.")
    known = METHOD_KEYS + OPTION_KEYS
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"{', '.join(unknown)} not a stage-2 method argument; known: {', '.join(known)}.")
    options = {k: overrides.pop(k) for k in OPTION_KEYS if k in overrides}
    parts = {**STAGE2_METHODS[name].parts(teacher), **overrides}
    if "grad_clip" in options:
        parts["schedule"] = parts["schedule"].with_grad_clip(options["grad_clip"])
    return parts


def matched_control(name: str, teacher: nn.Module | None = None) -> dict[str, Any]:
    """
    The ``MetaTrainer`` arguments of the labeled-only control matched to a named method: the method's parts with the
    same perturbation and optimizer settings on the labeled data, so that what the method gains over it is what the
    unlabeled data add. The labeled views get the method's ``clean_augment`` or, without one, its
    ``student_augment`` (the perturbation its student sees); the clean loss keeps the method's terms' clean parts and
    the schedule becomes :py:class:`~monai_mlbseg.engines.stage2.LabeledOnly` with the method's gradient clip, so
    the trainer makes clean steps only, whatever its unlabeled loader holds.

    Args:
        name: a key of :py:data:`STAGE2_METHODS`.
        teacher: as :py:func:`stage2_method`.

    Returns:
        ``{argument: value}`` for :py:class:`~monai_mlbseg.engines.MetaTrainer`.

    Raises:
        ValueError: for an unknown name.

    Example::

        control = MetaTrainer(..., **matched_control("weak_to_strong"))
    """
    return as_matched_control(stage2_method(name, teacher))


def as_matched_control(parts: dict[str, Any]) -> dict[str, Any]:
    """
    The labeled-only control matched to a method's ``MetaTrainer`` arguments ``parts`` (see
    :py:func:`matched_control`).

    Example::

        control = MetaTrainer(..., **as_matched_control(stage2_method("weak_to_strong", grad_clip=0.2)))
    """
    augment = parts["clean_augment"] if parts["clean_augment"] is not None else parts["student_augment"]
    schedule = LabeledOnly(parts["schedule"].grad_clip)
    return {**parts, "sources": [], "schedule": schedule, "clean_augment": augment, "student_augment": None}
