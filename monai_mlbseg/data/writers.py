"""Image writers that never leave a half-written file: MONAI's NIfTI writer, and the volume file writers the
:py:class:`~monai_mlbseg.data.formats.VolumeFormat` layouts use."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data.image_writer import NibabelWriter

from monai_mlbseg.utils import atomic_path
from monai_mlbseg.utils.io import TEMP_MARKER

__all__ = ["AtomicNibabelWriter", "write_h5", "write_itk", "write_nifti"]


class AtomicNibabelWriter(NibabelWriter):
    """
    MONAI's :py:class:`~monai.data.NibabelWriter`, writing to a temporary file next to the target and renaming it,
    so an interrupted write leaves no truncated NIfTI. Use it wherever MONAI takes a writer, e.g.
    ``SaveImaged(..., writer=AtomicNibabelWriter)``.
    """

    def write(self, filename: Any, verbose: bool = False, **obj_kwargs: Any) -> None:
        with atomic_path(filename) as tmp:
            super().write(str(tmp), verbose=verbose, **obj_kwargs)


def write_itk(path: Path, array: np.ndarray, spacing: Sequence[float]) -> None:
    """
    Write ``array`` (``[x, y, z]`` or ``[x, y, z, c]``) with ITK, in the format of ``path``'s suffix (NRRD, MHA
    compressed; a MetaImage ``.mhd`` with its data file, the data file moved into place first and the header last,
    so a reader never sees a header without its data).
    """
    import itk

    img = itk.image_from_array(np.ascontiguousarray(array.transpose(2, 1, 0)))  # ITK wants z, y, x
    img.SetSpacing([float(s) for s in spacing])
    if path.suffix != ".mhd":
        with atomic_path(path) as tmp:
            itk.imwrite(img, str(tmp), compression=True)
        return
    tmpdir = Path(tempfile.mkdtemp(prefix=f".mhd{TEMP_MARKER}", dir=path.parent))
    try:
        itk.imwrite(img, str(tmpdir / path.name))
        header = (tmpdir / path.name).read_text()
        data_file = next(
            line.split("=", 1)[1].strip() for line in header.splitlines() if line.startswith("ElementDataFile")
        )
        with atomic_path(path.parent / data_file) as tmp:
            os.replace(tmpdir / data_file, tmp)
        with atomic_path(path) as tmp:
            os.replace(tmpdir / path.name, tmp)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_nifti(path: Path, array: np.ndarray, spacing: Sequence[float]) -> None:
    """Write ``array`` as NIfTI with a diagonal affine of ``spacing`` (millimetres), atomically."""
    import nibabel as nib

    affine = np.diag([*(float(s) for s in spacing), 1.0])
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def write_h5(path: Path, image: np.ndarray, label: np.ndarray | None) -> None:
    """Write float32 ``image`` and (when given) uint8 ``label`` datasets into one HDF5 file, atomically."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("image", data=image.astype(np.float32))
            if label is not None:
                f.create_dataset("label", data=label.astype(np.uint8))
