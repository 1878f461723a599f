"""
The one training recipe: a bundle's own training workflow (``configs/train.json`` with overrides), driven step by
step. The demo and the benchmarks train through it, so that every figure they report measures what the bundle
ships; only the overrides (sizes, lengths, learning rates, method) differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow
from monai.transforms import Randomizable
from monai.utils import set_determinism
from torch import nn

from monai_mlbseg.engines import STAGE2_METHODS, WEIGHTINGS, pixel_weighting, stage2_method
from monai_mlbseg.engines.methods import as_matched_control
from monai_mlbseg.engines.stage2 import MetaWeighting, TwoSteps
from monai_mlbseg.transforms import CutMix, FeatureDropout, StrongIntensityAugment
from monai_mlbseg.utils import find_input_error

__all__ = [
    "STAGE2_OPTIONS",
    "TRAINING_STEPS",
    "check_stage2_options",
    "trainer_overrides",
    "parsed",
    "reseed_stage2",
    "run_training_step",
    "stage_length",
    "stage_overrides",
    "stage2_iterations",
    "stage2_parts",
    "training_workflow",
]

#: the steps of a bundle's ``training`` list, in order
TRAINING_STEPS = ("data check", "stage 1", "bootstrap", "stage 2")


def parsed(workflow: ConfigWorkflow, id: str) -> Any:
    """
    ``workflow.parser.get_parsed_content(id)``, raising the error behind MONAI's wrapping ``RuntimeError`` (an
    :py:class:`~monai_mlbseg.utils.InputError` anywhere in the chain, else the direct cause), so that bad data or
    options are reported as such.
    """
    try:
        return workflow.parser.get_parsed_content(id)
    except RuntimeError as e:
        cause = find_input_error(e) or e.__cause__
        if cause is None:
            raise
        raise cause from e


def training_workflow(
    bundle: str | Path,
    overrides: dict[str, Any],
    configs: Sequence[str] = ("train.json",),
    workflow_type: str = "train",
) -> ConfigWorkflow:
    """
    A ``ConfigWorkflow`` of the bundle's ``configs`` with ``overrides``, initialised.

    Raises:
        RuntimeError: for a training workflow whose ``training`` list is not :py:data:`TRAINING_STEPS`.
    """
    bundle = Path(bundle)
    workflow = ConfigWorkflow(
        config_file=[str(bundle / "configs" / c) for c in configs],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        **overrides,
    )
    workflow.initialize()
    if workflow_type == "train" and len(workflow.parser["training"]) != len(TRAINING_STEPS):
        steps = len(workflow.parser["training"])
        raise RuntimeError(f"the bundle's training has {steps} steps, the recipe knows {TRAINING_STEPS}.")
    return workflow


def run_training_step(workflow: ConfigWorkflow, step: str) -> Any:
    """Run one step of :py:data:`TRAINING_STEPS` of a training workflow; returns what the step returns."""
    return parsed(workflow, f"training#{TRAINING_STEPS.index(step)}")


def reseed_stage2(workflow: ConfigWorkflow, seed: int) -> None:
    """
    Seed what stage 2 draws from: the global generators (``seed + 1``), the trainer's views and perturbations, and
    the slice augmentation, which stage 1 shares (``train#preprocessing``) and would otherwise leave wherever stage 1
    stopped drawing; so a run whose stage 1 was reused continues exactly as an uninterrupted one.
    """
    set_determinism(seed=seed + 1)
    parsed(workflow, "train#trainer").set_random_state(seed)
    augment = parsed(workflow, "train#preprocessing")
    if isinstance(augment, Randomizable):
        augment.set_random_state(seed)


def stage_length(iterations: int, chunk: int) -> tuple[int, int]:
    """``(epoch_length, max_epochs)`` giving exactly ``iterations`` iterations in epochs of at most ``chunk``."""
    epoch_length = max(1, min(chunk, iterations))
    return epoch_length, math.ceil(iterations / epoch_length)


def stage2_iterations(method: str, optimizer_steps: int) -> int:
    """
    The stage-2 iterations that make ``optimizer_steps`` optimizer steps with ``method`` (equal budgets compare
    optimizer steps: a two-step iteration counts twice; the labeled-only control makes one step per iteration).
    """
    steps = STAGE2_METHODS[method].parts(None)["schedule"].steps_per_iteration
    return max(1, optimizer_steps // steps)


def stage_overrides(
    stage1_iterations: int | None = None,
    stage2_iterations: int | None = None,
    stage1_chunk: int = 50,
    stage2_chunk: int = 50,
) -> dict[str, int]:
    """
    The overrides that make stage 1 and/or stage 2 of a bundle's training run exactly these many iterations
    (``None``: that stage keeps the bundle's length), in epochs of at most ``stage1_chunk`` / ``stage2_chunk``
    iterations. Stage 2's learning rate decays per epoch, the reference's 120-epoch curve spread over its epochs.
    """
    out = {}
    if stage1_iterations is not None:
        length, epochs = stage_length(stage1_iterations, stage1_chunk)
        out.update({"stage1#max_epochs": epochs, "stage1#trainer#epoch_length": length})
    if stage2_iterations is not None:
        length, epochs = stage_length(stage2_iterations, stage2_chunk)
        out.update({"train#trainer#max_epochs": epochs, "train#trainer#epoch_length": length})
    return out


#: the stage-2 options a run may set on top of its method, in JSON form (:py:func:`stage2_parts`)
STAGE2_OPTIONS = (
    "grad_clip",
    "student_augment",
    "clean_augment",
    "reuse_meta_grad",
    "meta_params",
    "weighting",
    "cutmix",
    "feature_dropout",
)


def check_stage2_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """
    ``options`` as a dict, checked against :py:data:`STAGE2_OPTIONS` (and ``weighting`` against
    :py:data:`~monai_mlbseg.engines.WEIGHTINGS`).

    Raises:
        ValueError: for an unknown option or weighting (the message lists the known ones).
    """
    options = dict(options)
    unknown = sorted(set(options) - set(STAGE2_OPTIONS))
    if unknown:
        raise ValueError(f"unknown stage-2 options {unknown}; known: {', '.join(STAGE2_OPTIONS)}.")
    name = options.get("weighting")
    if name is not None and name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; known: {', '.join(WEIGHTINGS)}.")
    return options


def stage2_parts(
    method: str, teacher: nn.Module | None = None, options: Mapping[str, Any] | None = None, control: bool = False
) -> dict[str, Any]:
    """
    The ``MetaTrainer`` arguments of a named method with stage-2 options on top (the bundles' ``stage2_parts``, from
    their top-level ``stage2_method`` and ``stage2_options``):

    - ``grad_clip``: the gradient clip of the method's schedule (a number or ``None``);
    - ``student_augment`` / ``clean_augment``: the arguments of
      :py:class:`~monai_mlbseg.transforms.StrongIntensityAugment`, or ``None``;
    - MLB-Seg's fast modes ``reuse_meta_grad`` (the clean step reuses the meta-gradient:
      :py:class:`~monai_mlbseg.engines.stage2.TwoSteps`) and ``meta_params`` (parameter names or prefixes of the
      meta-gradient: :py:class:`~monai_mlbseg.engines.stage2.MetaWeighting`);
    - ``weighting``: the weighting of the label sources by name, a key of
      :py:data:`~monai_mlbseg.engines.WEIGHTINGS`;
    - ``cutmix`` / ``feature_dropout``: a probability: the method's perturbations (student's and labeled views',
      those it has) followed by :py:class:`~monai_mlbseg.transforms.FeatureDropout` and then
      :py:class:`~monai_mlbseg.transforms.CutMix` with it.

    Args:
        method: a key of :py:data:`~monai_mlbseg.engines.STAGE2_METHODS`.
        teacher: the mean teacher's network (default: a copy of the student).
        options: ``{option: value}`` of :py:data:`STAGE2_OPTIONS`.
        control: the labeled-only control matched to the method with these options instead (the bundles' top-level
            ``stage2_control``; :py:func:`~monai_mlbseg.engines.matched_control`).

    Returns:
        ``{argument: value}`` for :py:class:`~monai_mlbseg.engines.MetaTrainer`.

    Raises:
        ValueError: for an unknown method, option or weighting.

    Example::

        trainer = MetaTrainer(..., **stage2_parts("weak_to_strong", options={"cutmix": 0.5}))
    """
    options = check_stage2_options(options or {})
    parts = stage2_method(method, teacher, **{k: options[k] for k in ("grad_clip",) if k in options})
    for key in ("student_augment", "clean_augment"):
        if key in options:
            parts[key] = None if options[key] is None else StrongIntensityAugment(**options[key])
    if options.get("reuse_meta_grad"):
        parts["schedule"] = TwoSteps(parts["schedule"].grad_clip, reuse_meta_grad=True)
    if options.get("meta_params") is not None:
        parts["weighting"] = MetaWeighting([str(m) for m in options["meta_params"]])
    for key in ("student_augment", "clean_augment"):
        if parts[key] is not None and options.get("feature_dropout") is not None:
            parts[key] = FeatureDropout(parts[key], float(options["feature_dropout"]))
        if parts[key] is not None and options.get("cutmix") is not None:
            parts[key] = CutMix(parts[key], float(options["cutmix"]))
    if options.get("weighting") is not None:
        parts["weighting"] = pixel_weighting(str(options["weighting"]))
    return as_matched_control(parts) if control else parts


def trainer_overrides(options: Mapping[str, Any]) -> dict[str, Any]:
    """
    The bundle override of stage-2 options: the top-level ``stage2_options`` (see :py:func:`stage2_parts`).

    Args:
        options: ``{option: value}`` of :py:data:`STAGE2_OPTIONS`.

    Returns:
        ``{"stage2_options": options}`` (empty options: no override).

    Raises:
        ValueError: for an unknown option or weighting.

    Example::

        trainer_overrides({"grad_clip": 0.2, "clean_augment": {"contrast": 0.25}})
    """
    options = check_stage2_options(options)
    return {"stage2_options": options} if options else {}
