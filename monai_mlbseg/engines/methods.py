"""Named stage-2 methods: the :py:class:`~monai_mlbseg.engines.MetaTrainer` options each one sets."""

from __future__ import annotations

import copy
from typing import Any

from monai_mlbseg.transforms import StrongIntensityAugment

__all__ = ["STAGE2_METHODS", "stage2_method_options"]

#: the stage-2 methods by name and the ``MetaTrainer`` options that make them, in JSON-compatible form (every other
#: option keeps its value; ``student_augment`` is ``None`` or the arguments of
#: :py:class:`~monai_mlbseg.transforms.StrongIntensityAugment`): ``"mlbseg"`` the method as the reference defines it
#: (meta-learned weights for the initial and the PLE pseudo labels, L_pc and L_mt, a weighted and a clean step);
#: ``"mean_teacher"`` no weighted term, only L_mt acts on the unlabeled views (the clean step unchanged);
#: ``"weak_to_strong"`` the mean teacher with weak-to-strong consistency: the student sees a strong intensity
#: perturbation of the unlabeled views, the teacher the views, and L_mt is the BCE against the teacher's confident
#: pseudo labels (confidence at least 0.95), in one joint step with the clean loss whose gradient is not clipped
#: (the other methods clip every step's gradient norm at the reference's 0.2; on real left-atrium scans the clip
#: changes this method's result by less than a seed's noise, and without it the unlabeled term keeps training stable
#: where labeled-only training without a clip is not, docs/results.md); ``"self_training"`` plain bootstrapping on
#: the initial labels (uniform weights, no PLE, no regularisers).
STAGE2_METHODS: dict[str, dict[str, Any]] = {
    "mlbseg": {
        "reweight": True,
        "use_ple": True,
        "label_sources": ["initial", "pseudo"],
        "pc_weight": 1.0,
        "mt_weight": 1.0,
        "joint_step": False,
        "mt_confidence": None,
        "student_augment": None,
        "grad_clip": 0.2,
    },
    "mean_teacher": {
        "reweight": False,
        "use_ple": True,
        "label_sources": [],
        "pc_weight": 0.0,
        "mt_weight": 1.0,
        "joint_step": False,
        "mt_confidence": None,
        "student_augment": None,
        "grad_clip": 0.2,
    },
    "weak_to_strong": {
        "reweight": False,
        "use_ple": True,
        "label_sources": [],
        "pc_weight": 0.0,
        "mt_weight": 1.0,
        "joint_step": True,
        "mt_confidence": 0.95,
        "student_augment": {"contrast": 0.25, "shift": 0.2, "noise_std": 0.08, "blur_prob": 0.5},
        "grad_clip": None,
    },
    "self_training": {
        "reweight": False,
        "use_ple": False,
        "label_sources": ["initial"],
        "pc_weight": 0.0,
        "mt_weight": 0.0,
        "joint_step": False,
        "mt_confidence": None,
        "student_augment": None,
        "grad_clip": 0.2,
    },
}


def stage2_method_options(name: str) -> dict[str, Any]:
    """
    The ``MetaTrainer`` options of a named stage-2 method (a fresh copy, ``student_augment`` built), for configs: the
    bundles' trainer reads every option of :py:data:`STAGE2_METHODS` from
    ``$monai_mlbseg.engines.stage2_method_options(@stage2_method)``, so ``--stage2_method`` switches all of them.

    Args:
        name: a key of :py:data:`STAGE2_METHODS`.

    Returns:
        ``{option: value}``, ``student_augment`` a :py:class:`~monai_mlbseg.transforms.StrongIntensityAugment` or
        ``None``.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).

    Example::

        trainer = MetaTrainer(..., **stage2_method_options("weak_to_strong"))
    """
    if name not in STAGE2_METHODS:
        raise ValueError(f"unknown stage-2 method {name!r}; known: {', '.join(STAGE2_METHODS)}.")
    options = copy.deepcopy(STAGE2_METHODS[name])
    if options["student_augment"] is not None:
        options["student_augment"] = StrongIntensityAugment(**options["student_augment"])
    return options
