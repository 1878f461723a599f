"""Image writers that never leave a half-written file."""

from __future__ import annotations

from typing import Any

from monai.data.image_writer import NibabelWriter

from monai_mlbseg.utils import atomic_path

__all__ = ["AtomicNibabelWriter"]


class AtomicNibabelWriter(NibabelWriter):
    """
    MONAI's :py:class:`~monai.data.NibabelWriter`, writing to a temporary file next to the target and renaming it,
    so an interrupted write leaves no truncated NIfTI. Use it wherever MONAI takes a writer, e.g.
    ``SaveImaged(..., writer=AtomicNibabelWriter)``.
    """

    def write(self, filename: Any, verbose: bool = False, **obj_kwargs: Any) -> None:
        with atomic_path(filename) as tmp:
            super().write(str(tmp), verbose=verbose, **obj_kwargs)
