"""Named stage-2 methods: the :py:class:`~monai_mlbseg.engines.MetaTrainer` options each one sets."""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["STAGE2_METHODS", "stage2_method_options"]

#: the stage-2 methods by name and the ``MetaTrainer`` options that make them (every other option keeps its value):
#: ``"mlbseg"`` the method as the reference defines it (meta-learned weights for the initial and the PLE pseudo
#: labels, L_pc and L_mt); ``"mean_teacher"`` no weighted term, only L_mt acts on the unlabeled views (the clean step
#: unchanged); ``"self_training"`` plain bootstrapping on the initial labels (uniform weights, no PLE, no
#: regularisers).
STAGE2_METHODS: dict[str, dict[str, Any]] = {
    "mlbseg": {
        "reweight": True,
        "use_ple": True,
        "label_sources": ["initial", "pseudo"],
        "pc_weight": 1.0,
        "mt_weight": 1.0,
    },
    "mean_teacher": {"reweight": False, "use_ple": True, "label_sources": [], "pc_weight": 0.0, "mt_weight": 1.0},
    "self_training": {
        "reweight": False,
        "use_ple": False,
        "label_sources": ["initial"],
        "pc_weight": 0.0,
        "mt_weight": 0.0,
    },
}


def stage2_method_options(name: str) -> dict[str, Any]:
    """
    The ``MetaTrainer`` options of a named stage-2 method (a fresh copy), for configs: the bundles' trainer reads
    ``reweight``, ``use_ple``, ``label_sources``, ``pc_weight`` and ``mt_weight`` from
    ``$monai_mlbseg.engines.stage2_method_options(@stage2_method)``, so ``--stage2_method`` switches all of them.

    Args:
        name: a key of :py:data:`STAGE2_METHODS`.

    Returns:
        ``{option: value}``.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).

    Example::

        trainer = MetaTrainer(..., **stage2_method_options("mean_teacher"))
    """
    if name not in STAGE2_METHODS:
        raise ValueError(f"unknown stage-2 method {name!r}; known: {', '.join(STAGE2_METHODS)}.")
    return copy.deepcopy(STAGE2_METHODS[name])
