"""NIfTI files with the header faults the data check must catch, written as such tools write them (nibabel repairs some
of these faults when it builds a header, so the bytes are written here)."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np


def write_without_spacing(path: Path, array: np.ndarray | None = None) -> None:
    """
    Rewrite ``path`` (``.nii`` or ``.nii.gz``) with its voxels (or ``array``) and a header that gives no spacing:
    pixdim 0, neither qform nor sform. nibabel reads it as 1 mm.
    """
    array = np.asarray(nib.load(str(path)).dataobj) if array is None else array
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_data_dtype(array.dtype)
    header["pixdim"][1:4] = 0.0
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + array.tobytes(order="F")
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    assert (nib.load(str(path)).header.get_zooms()[:3]) == (1.0, 1.0, 1.0), "nibabel guesses 1 mm"


def write_sform(path: Path, sform: np.ndarray, pixdim: Sequence[float]) -> None:
    """
    Rewrite ``path`` with its voxels, the sform ``sform`` (code 1, written into the header fields: nibabel refuses to
    build an image from an affine it cannot decompose), the spacing ``pixdim`` and no qform (code 0).
    """
    array = np.asarray(nib.load(str(path)).dataobj)
    header = nib.Nifti1Image(array, np.eye(4)).header.copy()
    header.set_qform(None, code=0)
    header["sform_code"] = 1
    for row, name in enumerate(("srow_x", "srow_y", "srow_z")):
        header[name] = sform[row]
    header["pixdim"][1:4] = pixdim
    nib.save(nib.Nifti1Image(array, None, header=header), str(path))
    written = nib.load(str(path)).header
    np.testing.assert_array_equal(written.get_sform(), np.asarray(sform, dtype=np.float32))
