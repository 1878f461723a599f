"""
The one training recipe: a bundle's own training workflow (``configs/train.json`` with overrides), driven step by
step. The demo and the benchmarks train through it, so that every figure they report measures what the bundle
ships; only the overrides (sizes, lengths, learning rates, method) differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow
from monai.transforms import Randomizable
from monai.utils import set_determinism

from monai_mlbseg.engines import STAGE2_METHODS, TRUSTS
from monai_mlbseg.utils import find_input_error

__all__ = [
    "TRAINER_OPTIONS",
    "TRAINING_STEPS",
    "trainer_overrides",
    "parsed",
    "reseed_stage2",
    "run_training_step",
    "stage_length",
    "stage_overrides",
    "stage2_iterations",
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
    if STAGE2_METHODS[method].labeled_only:
        return optimizer_steps
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


#: the stage-2 options a run may set on top of its method, in JSON form (:py:func:`trainer_overrides`)
TRAINER_OPTIONS = (
    "grad_clip",
    "student_augment",
    "clean_augment",
    "reuse_meta_grad",
    "meta_params",
    "trust",
    "cutmix",
    "feature_dropout",
)


def _wrap_perturbations(out: dict[str, Any], wrappers: list[tuple[str, float]]) -> None:
    """Wrap the method's perturbations (student's and labeled views', only those it has) in each ``target(base,
    prob)`` of ``wrappers``, innermost first; a perturbation given in ``out`` is wrapped instead of the method's."""
    for key in ("student_augment", "clean_augment"):
        name = f"train#trainer#{key}"
        if name not in out:  # the method's own part, when it has one
            part = inner = f"@stage2_parts['{key}']"
            for target, prob in wrappers:
                inner = f"{target}({inner}, {prob})"
            out[name] = f"$None if {part} is None else {inner}"
        elif out[name] is not None:
            for target, prob in wrappers:
                out[name] = {"_target_": target, "base": out[name], "prob": prob}


def trainer_overrides(options: dict[str, Any]) -> dict[str, Any]:
    """
    The bundle overrides of stage-2 options in JSON form, on top of the bundle's ``stage2_method``:
    ``grad_clip`` (a number or ``None``); ``student_augment`` / ``clean_augment`` (the arguments of
    :py:class:`~monai_mlbseg.transforms.StrongIntensityAugment`, or ``None``); MLB-Seg's fast modes
    ``reuse_meta_grad`` (the clean step reuses the meta-gradient: :py:class:`~monai_mlbseg.engines.TwoSteps`) and
    ``meta_params`` (parameter names or prefixes of the meta-gradient: :py:class:`~monai_mlbseg.engines.MetaWeighting`);
    ``trust``: the weighting of the label sources by name, a key of :py:data:`~monai_mlbseg.engines.TRUSTS`;
    ``cutmix``: a probability: the method's perturbations (student's and labeled views') followed by
    :py:class:`~monai_mlbseg.transforms.CutMix` with it; ``feature_dropout``: a probability: the same with
    :py:class:`~monai_mlbseg.transforms.FeatureDropout` (inside a CutMix when both are given).

    Args:
        options: ``{option: value}`` of :py:data:`TRAINER_OPTIONS`.

    Returns:
        ``{"train#trainer#<argument>": value}``.

    Raises:
        ValueError: for an option not in :py:data:`TRAINER_OPTIONS`.

    Example::

        trainer_overrides({"grad_clip": 0.2, "clean_augment": {"contrast": 0.25}})
    """
    unknown = sorted(set(options) - set(TRAINER_OPTIONS))
    if unknown:
        raise ValueError(f"unknown stage-2 options {unknown}; known: {', '.join(TRAINER_OPTIONS)}.")
    out: dict[str, Any] = {}
    if "grad_clip" in options:
        out["train#trainer#grad_clip"] = options["grad_clip"]
    for key in ("student_augment", "clean_augment"):
        if key in options:
            value = options[key]
            target = {"_target_": "monai_mlbseg.transforms.StrongIntensityAugment"}
            out[f"train#trainer#{key}"] = None if value is None else {**target, **value}
    if options.get("reuse_meta_grad"):
        out["train#trainer#schedule"] = "$monai_mlbseg.engines.TwoSteps(reuse_meta_grad=True)"
    if options.get("meta_params") is not None:
        names = [str(m) for m in options["meta_params"]]
        out["train#trainer#weighting"] = f"$monai_mlbseg.engines.MetaWeighting({names!r})"
    wrappers = [  # CutMix outermost, so that the trainer finds the targets it mixes
        (f"monai_mlbseg.transforms.{target}", float(options[option]))
        for option, target in (("feature_dropout", "FeatureDropout"), ("cutmix", "CutMix"))
        if options.get(option) is not None
    ]
    if wrappers:
        _wrap_perturbations(out, wrappers)
    if options.get("trust") is not None:
        name = str(options["trust"])
        if name not in TRUSTS:
            raise ValueError(f"unknown pseudo-label trust {name!r}; known: {', '.join(TRUSTS)}.")
        out["train#trainer#weighting"] = f"$monai_mlbseg.engines.pseudo_label_trust({name!r})"
    return out
