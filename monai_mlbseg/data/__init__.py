"""
Data: readers for the real formats, the format registry, synthetic data, datalists and their checks, ``prepare``,
and 2D slice datasets of 3D volumes.
"""

from .datalist import (
    DECATHLON_KEYS,
    MAX_ANISOTROPY,
    MIN_SPATIAL_SIZE,
    PATH_KEYS,
    REQUIRED_SPLITS,
    SPLITS,
    build_datalist,
    check_datalist,
    from_decathlon,
    is_decathlon,
    load_datalist,
    read_case_list,
    resolve_datalist,
    training_datalist,
    validate_datalist,
    validate_inputs,
)
from .formats import FORMATS, VolumeFormat, first_channel, get_format, load_volume_transforms, write_case
from .prepare import check, prepare
from .readers import H5_SUFFIXES, H5ImageReader, NiftiReader, captured_stderr, metaimage_header_problem
from .slices import SliceDataset, available_memory
from .splits import folder_split, synthetic_split
from .synthetic import ANATOMIES, AnatomyParams, make_synthetic_dataset, synthetic_case, synthetic_discs
from .writers import AtomicNibabelWriter

__all__ = [
    "ANATOMIES",
    "DECATHLON_KEYS",
    "MAX_ANISOTROPY",
    "MIN_SPATIAL_SIZE",
    "AtomicNibabelWriter",
    "AnatomyParams",
    "FORMATS",
    "H5ImageReader",
    "H5_SUFFIXES",
    "NiftiReader",
    "PATH_KEYS",
    "REQUIRED_SPLITS",
    "SPLITS",
    "SliceDataset",
    "VolumeFormat",
    "available_memory",
    "build_datalist",
    "folder_split",
    "synthetic_split",
    "captured_stderr",
    "check",
    "check_datalist",
    "from_decathlon",
    "is_decathlon",
    "first_channel",
    "get_format",
    "load_datalist",
    "load_volume_transforms",
    "make_synthetic_dataset",
    "metaimage_header_problem",
    "prepare",
    "read_case_list",
    "resolve_datalist",
    "training_datalist",
    "validate_datalist",
    "validate_inputs",
    "synthetic_case",
    "synthetic_discs",
    "write_case",
]
