"""
The one training recipe: a bundle's own training workflow (``configs/train.json`` with overrides), driven step by
step. The demo and the benchmarks train through it, so that every figure they report measures what the bundle
ships; only the overrides (sizes, lengths, learning rates, method) differ.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow
from monai.transforms import Randomizable
from monai.utils import set_determinism
from torch import nn

from monai_mlbseg.engines import WEIGHTINGS, load_weights, pixel_weighting, stage2_method
from monai_mlbseg.engines.methods import as_matched_control
from monai_mlbseg.engines.stage2 import BidirectionalCopyPasteTerm, MetaWeighting, StepSchedule, TwoSteps
from monai_mlbseg.transforms import CutMix, FeatureDropout, StrongIntensityAugment
from monai_mlbseg.utils import InputError, Problem, atomic_write_json, find_input_error

__all__ = [
    "STAGE2_OPTIONS",
    "TrainingRun",
    "train_matched_control",
    "TRAINING_STEPS",
    "check_stage2_options",
    "trainer_overrides",
    "parsed",
    "reseed_stage2",
    "run_training_step",
    "iterations_for_steps",
    "stage_epoch_length",
    "stage_epochs",
    "stage_length",
    "stage2_parts",
    "training_workflow",
]

#: the steps of a bundle's ``training`` list, in order, and their top-level ids
TRAINING_STEPS = {
    "data check": "check_data",
    "initial weights": "load_init",
    "stage 1": "run_stage1",
    "bootstrap": "run_bootstrap",
    "stage 2": "run_stage2",
}


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
    overrides: Mapping[str, Any],
    configs: Sequence[str] = ("train.json",),
    workflow_type: str = "train",
    user_overrides: Mapping[str, Any] | None = None,
) -> ConfigWorkflow:
    """
    A ``ConfigWorkflow`` of the bundle's ``configs`` with ``overrides``, initialised. A driver describes its run by
    the bundle's documented top-level ids only (the bundle README's "Top-level ids"); a user's own overrides, any
    id, come in ``user_overrides`` and win.

    Raises:
        ValueError: for an id of ``overrides`` that is not top-level (it names a nested id with ``#``).
        RuntimeError: for a training workflow whose ``training`` list is not the ids of :py:data:`TRAINING_STEPS`.
    """
    nested = sorted(k for k in overrides if "#" in k)
    if nested:
        raise ValueError(f"a driver sets only top-level bundle ids; nested: {nested} (a user's go in user_overrides).")
    overrides = {**overrides, **(user_overrides or {})}
    bundle = Path(bundle)
    workflow = ConfigWorkflow(
        config_file=[str(bundle / "configs" / c) for c in configs],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        **overrides,
    )
    workflow.initialize()
    expected = [f"@{id}" for id in TRAINING_STEPS.values()]
    if workflow_type == "train" and list(workflow.parser["training"]) != expected:
        raise RuntimeError(f"the bundle's training is {workflow.parser['training']}, the recipe knows {expected}.")
    return workflow


def run_training_step(workflow: ConfigWorkflow, step: str) -> Any:
    """Run one step of :py:data:`TRAINING_STEPS` of a training workflow (its top-level id); returns what it returns."""
    return parsed(workflow, TRAINING_STEPS[step])


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
    """
    ``(epoch_length, max_epochs)`` of ``iterations`` iterations in whole epochs of ``min(chunk, iterations)``:
    exactly ``iterations`` when ``chunk`` divides it, else rounded up to the next whole epoch.
    """
    epoch_length = max(1, min(chunk, iterations))
    return epoch_length, math.ceil(iterations / epoch_length)


def iterations_for_steps(schedule: StepSchedule, optimizer_steps: int | None) -> int | None:
    """
    The stage-2 iterations that make ``optimizer_steps`` optimizer steps with ``schedule`` (equal budgets compare
    optimizer steps: a two-step iteration counts twice); ``None`` for ``None``. The bundles' ``stage2_steps`` become
    iterations here, and nowhere else.
    """
    if optimizer_steps is None:
        return None
    return max(1, int(optimizer_steps) // schedule.steps_per_iteration)


def stage_epochs(iterations: int | None, max_epoch_length: int, default: int) -> int:
    """The ``max_epochs`` of a stage of ``iterations`` iterations (:py:func:`stage_length`); ``default`` for
    ``None``."""
    return default if iterations is None else stage_length(iterations, max_epoch_length)[1]


def stage_epoch_length(iterations: int | None, max_epoch_length: int) -> int | None:
    """The ``epoch_length`` of a stage of ``iterations`` iterations (:py:func:`stage_length`); ``None`` (a pass over
    the loader) for ``None``."""
    return None if iterations is None else stage_length(iterations, max_epoch_length)[0]


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
    "copy_paste",
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
    - ``copy_paste``: bidirectional copy-paste between labeled and unlabeled views, one more unlabeled term
      (:py:class:`~monai_mlbseg.engines.stage2.BidirectionalCopyPasteTerm`): its weight, or its arguments as a
      mapping; it needs the method's mean teacher and does not combine with ``cutmix``.

    Args:
        method: a key of :py:data:`~monai_mlbseg.engines.STAGE2_METHODS`.
        teacher: the mean teacher's network (default: a copy of the student).
        options: ``{option: value}`` of :py:data:`STAGE2_OPTIONS`.
        control: the labeled-only control matched to the method with these options instead (the bundles' top-level
            ``stage2_control``; :py:func:`~monai_mlbseg.engines.matched_control`).

    Returns:
        ``{argument: value}`` for :py:class:`~monai_mlbseg.engines.MetaTrainer`.

    Raises:
        ValueError: for an unknown method, option or weighting, or ``copy_paste`` with ``cutmix``.

    Example::

        trainer = MetaTrainer(..., **stage2_parts("weak_to_strong", options={"cutmix": 0.5}))
    """
    options = check_stage2_options(options or {})
    if options.get("copy_paste") is not None and options.get("cutmix") is not None:
        raise ValueError("the stage-2 options copy_paste and cutmix do not combine: both paste boxes between images.")
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
    copy_paste = options.get("copy_paste")
    if copy_paste is not None:
        term = (
            BidirectionalCopyPasteTerm(**copy_paste)
            if isinstance(copy_paste, Mapping)
            else BidirectionalCopyPasteTerm(float(copy_paste))
        )
        parts["terms"] = [*parts["terms"], term]
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


class TrainingRun:
    """
    A bundle's training workflow with a driver's top-level overrides (and a user's own), run step by step: data
    check, stage 1, bootstrap, stage 2, stage 2 reseeded after the bootstrap so that its randomness does not depend
    on whether stage 1 ran in this process. The demo and the benchmarks train through it.

    Args:
        bundle: the bundle folder.
        overrides: top-level ids (:py:func:`training_workflow`).
        seed: the run's seed (the bundle's ``seed`` too).
        user_overrides: the user's own overrides, any id.

    Example::

        run = TrainingRun("bundles/mlbseg_la", {"dataset_dir": "/data/LA", "stage2_steps": 300}, seed=0)
        run.get("train#trainer").add_event_handler(...)
        run.run()
    """

    def __init__(
        self,
        bundle: str | Path,
        overrides: Mapping[str, Any],
        seed: int = 0,
        user_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.seed = int(seed)
        self.workflow = training_workflow(bundle, {**overrides, "seed": self.seed}, user_overrides=user_overrides)
        #: wall time of each step run, in seconds
        self.timings: dict[str, float] = {}

    def get(self, id: str) -> Any:
        """The parsed content of a bundle id (:py:func:`parsed`)."""
        return parsed(self.workflow, id)

    def run(self, steps: Sequence[str] = tuple(TRAINING_STEPS), after: Callable[[str], None] | None = None) -> None:
        """
        Run ``steps`` of :py:data:`TRAINING_STEPS` in order, calling ``after(step)`` when each has finished.

        Raises:
            ValueError: for a step that is not one of :py:data:`TRAINING_STEPS`.
        """
        unknown = [s for s in steps if s not in TRAINING_STEPS]
        if unknown:
            raise ValueError(f"unknown training steps {unknown}; known: {', '.join(TRAINING_STEPS)}.")
        for step in steps:
            if step == "stage 2":
                reseed_stage2(self.workflow, self.seed)
            start = time.perf_counter()
            run_training_step(self.workflow, step)
            self.timings[step] = time.perf_counter() - start
            if after is not None:
                after(step)


def train_matched_control(
    bundle: str | Path,
    overrides: Mapping[str, Any],
    stage1_weights: str | Path,
    folder: str | Path,
    seed: int = 0,
    user_overrides: Mapping[str, Any] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """
    The labeled-only control matched to a run's stage-2 method (the bundle's ``stage2_control``: the method's
    perturbation on the labeled views, its labeled loss and gradient clip, the same optimizer and optimizer steps)
    from the run's stage-1 weights, trained once: only the unlabeled volumes differ, so stage 2 against it is what
    they added.

    Args:
        bundle: the bundle folder.
        overrides: the run's top-level ids (its ``stage2_steps`` the control's budget too).
        stage1_weights: the stage-1 weights the control starts from.
        folder: the control's folder: its weights in ``model.pt`` with its settings in ``run_settings.json``, its
            checkpoints in ``stage2/`` (a rerun continues; a finished control with the same settings is not trained
            again).
        seed: the run's seed (stage 2 is reseeded alike).
        user_overrides: the user's own overrides (their stage-2 options apply to the control too).

    Returns:
        the path of the control's weights and its trainer's ``run_settings``.

    Raises:
        InputError: naming the folder, when it holds a finished control with other settings (e.g. of another
            method), which would not be this run's control.
    """
    folder = Path(folder)
    model = folder / "model.pt"
    control = {
        **overrides,
        "stage2_control": True,
        "use_unlabeled": False,
        "ckpt_dir": str(folder),
        "run_dir": str(folder),
    }
    run = TrainingRun(bundle, {**control, "stage1_dir": str(Path(stage1_weights).parent)}, seed, user_overrides)
    trained = model.is_file()
    if not trained:  # before the trainer is parsed: its mean teacher copies the network
        load_weights(run.get("network"), stage1_weights)
    trainer = run.get("train#trainer")
    recorded = folder / "run_settings.json"
    settings = json.loads(json.dumps(trainer.run_settings))
    if trained and (not recorded.is_file() or json.loads(recorded.read_text(encoding="utf-8")) != settings):
        problem = "holds a finished control with other (or unrecorded) settings than this run's matched control"
        raise InputError(
            [Problem(str(folder), f"{problem}; use another output folder, or move or delete this one")],
            "the control cannot be reused",
        )
    if not trained:
        atomic_write_json(recorded, settings)  # before training: a finished control always has its settings
        run.run(["stage 2"])
    return model, settings
