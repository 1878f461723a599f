"""
Datalists (MONAI decathlon style) for semi-supervised segmentation, their splits, and a thorough input check.

A datalist is a JSON object with the lists ``labeled`` (the clean set), ``unlabeled``, ``test`` and optionally
``validation``; each item is ``{"case_id": ..., "image": path, "label": path}`` with paths relative to the data
folder. Unlabeled items carry their ground truth (when the files have one) under ``"gt"`` instead of ``"label"``:
it is used for monitoring only, never for training. The datalist also records its ``format``.

Example::

    {"format": "uamt_h5",
     "labeled":   [{"case_id": "case000", "image": "case000/mri_norm2.h5", "label": "case000/mri_norm2.h5"}],
     "unlabeled": [{"case_id": "case001", "image": "case001/mri_norm2.h5", "gt": "case001/mri_norm2.h5"}],
     "test":      [{"case_id": "case009", "image": "case009/mri_norm2.h5", "label": "case009/mri_norm2.h5"}]}
"""

from .build import (
    DECATHLON_KEYS,
    PATH_KEYS,
    REQUIRED_SPLITS,
    SPLITS,
    build_datalist,
    from_decathlon,
    is_decathlon,
    read_case_list,
)
from .check import MAX_ANISOTROPY, MIN_SPATIAL_SIZE, check_datalist, validate_datalist, validate_inputs
from .paths import load_datalist, resolve_datalist, training_datalist

__all__ = [
    "SPLITS",
    "REQUIRED_SPLITS",
    "PATH_KEYS",
    "DECATHLON_KEYS",
    "MIN_SPATIAL_SIZE",
    "MAX_ANISOTROPY",
    "read_case_list",
    "build_datalist",
    "is_decathlon",
    "from_decathlon",
    "load_datalist",
    "resolve_datalist",
    "training_datalist",
    "check_datalist",
    "validate_datalist",
    "validate_inputs",
]
