"""
MONAI image readers for HDF5 volumes (the UA-MT left-atrium layout ``<case>/mri_norm2.h5``) and for NIfTI files
whose header gives no voxel spacing, and the diagnosis of broken MetaImage headers.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from monai.config import PathLike
from monai.data import ImageReader, NibabelReader
from monai.data.utils import is_supported_format
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

__all__ = [
    "H5ImageReader",
    "H5_SUFFIXES",
    "NIFTI_SUFFIXES",
    "NiftiReader",
    "captured_stderr",
    "declared_voxels",
    "metaimage_header_problem",
    "nifti_header",
    "unspaced_axes",
]

#: file name endings :py:class:`H5ImageReader` claims in :py:meth:`~H5ImageReader.verify_suffix`.
H5_SUFFIXES = ("h5", "hdf5")
#: file name endings of NIfTI files.
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _positive_spacing(spacing: Sequence[float] | float | None) -> tuple[float, ...] | None:
    """``spacing`` as a tuple of floats (``None`` stays ``None``).

    Raises:
        ValueError: when an entry is not a positive finite number, or there is none.
    """
    if spacing is None:
        return None
    try:
        values = tuple(float(s) for s in ensure_tuple(spacing))
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be positive numbers, got {spacing!r}.") from None
    if not values or any(not np.isfinite(s) or s <= 0 for s in values):
        raise ValueError(f"spacing must be positive numbers, got {spacing!r}.")
    return values


class _DeferredError:
    """A read error that :py:meth:`H5ImageReader.get_data` raises."""

    def __init__(self, message: str) -> None:
        self.message = message


class H5ImageReader(ImageReader):
    """
    Load one dataset of an HDF5 file as an image, e.g. the ``image`` or the ``label`` of a UA-MT
    ``mri_norm2.h5`` (float32 ``image`` and uint8 ``label``, both ``H x W x D``).

    The arrays are returned as stored (no axis reordering). HDF5 files of this layout store no geometry, so the
    affine is ``diag(spacing)`` (identity when ``spacing`` is ``None``). The meta data hold ``affine``,
    ``original_affine``, ``spatial_shape``, ``original_channel_dim`` (``nan`` = no channel, unless ``channel_dim``
    is given) and ``space`` (RAS), like MONAI's own readers; ``LoadImage`` adds ``filename_or_obj``.

    ``read`` checks the file content, not its name, and raises for files that are not HDF5, so the reader also
    works inside a reader list of ``LoadImage`` (which tries the registered readers in turn). A missing dataset or a
    corrupt HDF5 file raises a ``ValueError`` naming the file and the dataset.

    Args:
        dataset: name (or ``/``-separated path) of the HDF5 dataset to read.
        spacing: voxel spacing along the spatial axes, used for the affine; ``None`` for unit spacing.
        channel_dim: the channel axis of the stored array, ``None`` (or ``"no_channel"``) when it has none.

    Raises:
        ValueError: when ``dataset`` is empty or ``spacing`` has a non-positive entry.

    Example::

        from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

        load = Compose([
            LoadImaged(keys="image", reader=H5ImageReader(dataset="image")),
            LoadImaged(keys="label", reader=H5ImageReader(dataset="label")),
            EnsureChannelFirstd(keys=["image", "label"]),
        ])
        item = load({"image": "LA/case0/mri_norm2.h5", "label": "LA/case0/mri_norm2.h5"})  # [1, H, W, D] each

        # in a bundle config: {"_target_": "LoadImaged", "keys": "label",
        #                      "reader": "monai_mlbseg.data.H5ImageReader", "dataset": "label"}
    """

    def __init__(
        self,
        dataset: str = "image",
        spacing: Sequence[float] | None = None,
        channel_dim: str | int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dataset, str) or not dataset:
            raise ValueError(f"dataset must be a non-empty string, got {dataset!r}.")
        self.dataset = dataset
        self.spacing = _positive_spacing(spacing)
        self.channel_dim = None if channel_dim == "no_channel" else channel_dim

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """
        Whether ``filename`` (or every file of a list) ends in ``.h5`` or ``.hdf5``.

        Args:
            filename: file name or a list of file names.
        """
        return is_supported_format(filename, H5_SUFFIXES)

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> Any:
        """
        Read the dataset ``self.dataset`` of each file.

        A file that is not HDF5 raises here (so ``LoadImage`` moves on to its other readers). A problem *inside* an
        HDF5 file (no such dataset, corrupt data) is raised by :py:meth:`get_data` instead: otherwise
        ``LoadImage`` would fall back to readers that half-open HDF5 files (PIL has a stub) and hide the message.

        Args:
            data: file name or a list of file names (stacked as channels by :py:meth:`get_data`).
            kwargs: unused (kept for the ``ImageReader`` contract).

        Returns:
            the array of one file, or a list of arrays (a deferred error in place of an unreadable dataset).

        Raises:
            FileNotFoundError: when a file does not exist.
            ValueError: when a file is not an HDF5 file.
        """
        import h5py

        arrays: list[Any] = []
        for name in ensure_tuple(data):
            path = os.fspath(name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: no such file.")
            if not h5py.is_hdf5(path):
                raise ValueError(f"{path}: not an HDF5 file (expected dataset {self.dataset!r}).")
            try:
                with h5py.File(path, "r") as f:
                    node = f.get(self.dataset)
                    if isinstance(node, h5py.Dataset):
                        arrays.append(np.asarray(node[()]))
                    else:
                        found = ", ".join(sorted(k for k in f.keys() if isinstance(f[k], h5py.Dataset))) or "none"
                        arrays.append(
                            _DeferredError(f"{path}: no dataset {self.dataset!r} in the HDF5 file (found: {found}).")
                        )
            except Exception as e:  # truncated / corrupt files raise OSError or KeyError from h5py
                arrays.append(
                    _DeferredError(f"{path}: cannot read dataset {self.dataset!r} ({type(e).__name__}: {e}).")
                )
        return arrays if len(arrays) > 1 else arrays[0]

    def get_data(self, img: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, dict]:
        """
        The image array and its meta data.

        Args:
            img: an array from :py:meth:`read`, or a list of arrays (stacked along a new first axis, which becomes
                the channel axis, unless ``channel_dim`` is set: then they are concatenated along it).

        Returns:
            ``(array, meta)`` with ``affine``, ``original_affine``, ``spatial_shape``, ``original_channel_dim`` and
            ``space`` in ``meta``.

        Raises:
            ValueError: when a file lacks the dataset or is corrupt (the message names the file and the dataset),
                the arrays of a list differ in shape, or ``spacing`` does not match the spatial rank.
        """
        arrays = list(img) if isinstance(img, (list, tuple)) else [img]
        for a in arrays:
            if isinstance(a, _DeferredError):
                raise ValueError(a.message)
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"all HDF5 arrays of a list must have the same shape, got {sorted(shapes)}.")
        shape = list(arrays[0].shape)
        if self.channel_dim is not None:
            del shape[int(self.channel_dim)]
        spatial_shape = np.asarray(shape)
        ndim = len(shape)
        if self.spacing is not None and len(self.spacing) != ndim:
            raise ValueError(f"spacing {self.spacing} does not match the {ndim} spatial dims of the HDF5 array.")
        affine = np.eye(ndim + 1)
        if self.spacing is not None:
            affine[:ndim, :ndim] = np.diag(self.spacing)
        meta: dict = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: spatial_shape,
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if self.channel_dim is None else int(self.channel_dim),
        }
        if len(arrays) == 1:
            return arrays[0], meta
        if self.channel_dim is None:
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
            return np.stack(arrays, axis=0), meta
        return np.concatenate(arrays, axis=int(self.channel_dim)), meta

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dataset={self.dataset!r}, spacing={self.spacing})"


def nifti_header(path: str | os.PathLike) -> Any:
    """
    The header of a NIfTI file as written: nibabel repairs a header while loading it (a ``pixdim`` of 0 is read as
    1), this one is read without repairs.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file (NIfTI-1 or NIfTI-2).

    Returns:
        the nibabel header (``Nifti1Header`` or ``Nifti2Header``).

    Raises:
        OSError: when the file cannot be read (nibabel raises its own errors for a file that is not NIfTI).

    Example::

        nifti_header("imagesTr/la_003.nii.gz")["pixdim"][1:4]  # array([0., 0., 0.], dtype=float32)
    """
    import nibabel as nib
    from nibabel.openers import ImageOpener

    with ImageOpener(os.fspath(path)) as f:
        size = f.read(4)
        f.seek(0)
        nifti2 = 540 in (int.from_bytes(size, "little"), int.from_bytes(size, "big"))
        return (nib.Nifti2Header if nifti2 else nib.Nifti1Header).from_fileobj(f, check=False)


def unspaced_axes(header: Any) -> tuple[int, ...]:
    """
    The spatial axes to which a NIfTI header (as :py:func:`nifti_header` reads it) gives no voxel spacing: it has no
    sform (``sform_code`` 0), so the geometry comes from ``pixdim``, and ``pixdim`` is 0 there. nibabel reads such an
    axis as 1 mm (with a warning), MONAI's ``NibabelReader`` keeps that guess.

    Args:
        header: a NIfTI header.

    Returns:
        the axes (0, 1, 2), empty when every spatial axis has a spacing.

    Example::

        unspaced_axes(nifti_header("imagesTr/la_003.nii.gz"))  # (0, 1, 2): pixdim 0, no qform, no sform
    """
    if int(header["sform_code"]) != 0:
        return ()
    return tuple(k for k in range(min(int(header["dim"][0]), 3)) if header["pixdim"][k + 1] == 0)


def _with_spacing(img: Any, path: PathLike, spacing: tuple[float, ...]) -> Any:
    """``img`` with ``spacing`` on the axes to which the header of file ``path`` gives no spacing."""
    axes = unspaced_axes(nifti_header(path))
    if not axes:
        return img
    if max(axes) >= len(spacing):
        raise ValueError(f"spacing {spacing} does not give axis {max(axes)} of {os.fspath(path)} a spacing.")
    header = img.header.copy()
    for k in axes:
        header["pixdim"][k + 1] = spacing[k]
    return type(img)(img.dataobj, header.get_best_affine(), header=header)


class NiftiReader(NibabelReader):
    """
    MONAI's ``NibabelReader``, with the voxel spacing of the files whose header gives none (see
    :py:func:`unspaced_axes`; without ``spacing`` nibabel reads them as 1 mm). The given spacing stands in for the
    header's missing ``pixdim`` values, and the affine is the one nibabel derives from the completed header (its
    qform, or without one nibabel's default orientation centred on the volume). Files whose header gives a spacing
    are read as ``NibabelReader`` reads them.

    Args:
        spacing: voxel spacing (mm) along the spatial axes, for the axes a header gives none; ``None``: nibabel's
            1 mm.
        kwargs: the arguments of ``NibabelReader``.

    Raises:
        ValueError: when ``spacing`` has a non-positive entry.

    Example::

        from monai.transforms import LoadImage

        img = LoadImage(image_only=True, reader=NiftiReader(spacing=(1.25, 1.25, 1.37)))("la_003.nii.gz")
        img.pixdim  # tensor([1.2500, 1.2500, 1.3700]) for a header with pixdim 0
    """

    def __init__(self, spacing: Sequence[float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spacing = _positive_spacing(spacing)

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> Any:
        """
        ``NibabelReader.read``, then every image whose header gives an axis no spacing gets ``spacing`` there.

        Args:
            data: file name or a list of file names.
            kwargs: the arguments of ``nibabel.load``.

        Returns:
            a nibabel image, or a list of them.

        Raises:
            ValueError: when ``spacing`` does not cover the spatial axes of a file.
        """
        images = super().read(data, **kwargs)
        spacing = self.spacing
        if spacing is None:
            return images
        spaced = [_with_spacing(img, name, spacing) for img, name in zip(ensure_tuple(images), self.filenames)]
        return spaced if len(spaced) > 1 else spaced[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spacing={self.spacing})"


#: bytes per element of the MetaImage ``ElementType`` values.
_MET_TYPE_SIZES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


def _positive_ints(text: str) -> list[int] | None:
    try:
        values = [int(v) for v in text.split()]
    except ValueError:
        return None
    return values if values and all(v > 0 for v in values) else None


#: bytes per element of NRRD's ``type`` field
_NRRD_TYPE_SIZES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "int16", "int16_t", "ushort", "unsigned short"), 2),
    **dict.fromkeys(("uint16", "uint16_t", "unsigned short int"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t"), 4),
    "float": 4,
    **dict.fromkeys(("double", "longlong", "int64", "int64_t", "ulonglong", "uint64", "uint64_t"), 8),
}


def _text_header(path: str, stop: str | None = None, limit: int = 1 << 16) -> dict[str, str]:
    """
    The ``key = value`` (or ``key: value``) lines of a text header in the first ``limit`` bytes of ``path``: up to
    the line of key ``stop`` (MetaImage's ``ElementDataFile``, after which binary data may follow), or without one
    up to the first blank line (NRRD).

    Raises:
        OSError: when the file cannot be read.
    """
    header: dict[str, str] = {}
    with open(path, "rb") as f:
        text = f.read(limit).decode("latin-1")
    for line in text.splitlines():
        if not line.strip():
            if stop is None:
                break
            continue
        key, sep, value = line.partition("=") if "=" in line else line.partition(":")
        if sep:
            header[key.strip()] = value.strip()
        if stop is not None and key.strip() == stop:
            break
    return header


def declared_voxels(path: str | os.PathLike) -> tuple[tuple[int, ...], int] | None:
    """
    The array shape a volume file declares and the bytes per voxel, read from its header alone (no voxel is read):
    the largest dataset of an HDF5 file, a NIfTI header, a MetaImage header (``DimSize`` x ``ElementType`` x
    channels) or an NRRD header (``sizes`` x ``type``).

    Args:
        path: the file.

    Returns:
        ``(shape, bytes per voxel)``, or ``None`` for another format or a header that cannot be parsed (the reader
        then reports the file).

    Example::

        shape, itemsize = declared_voxels("case000/mri_norm2.h5")
    """
    path = os.fspath(path)
    name = path.lower()
    try:
        if name.endswith(H5_SUFFIXES):
            import h5py

            with h5py.File(path, "r") as f:
                sets = [f[k] for k in f if isinstance(f[k], h5py.Dataset)]
                if not sets:
                    return None
                largest = max(sets, key=lambda d: int(np.prod(d.shape, dtype=np.float64)) * d.dtype.itemsize)
                return tuple(int(s) for s in largest.shape), int(largest.dtype.itemsize)
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            header = nib.load(path).header
            return tuple(int(s) for s in header.get_data_shape()), int(header.get_data_dtype().itemsize)
        if name.endswith((".mhd", ".mha")):
            header = _text_header(path, stop="ElementDataFile")
            dims = _positive_ints(header.get("DimSize", ""))
            size = _MET_TYPE_SIZES.get(header.get("ElementType", "").removesuffix("_ARRAY"))
            channels = (_positive_ints(header.get("ElementNumberOfChannels", "1")) or [1])[0]
            return (tuple(dims) + ((channels,) if channels > 1 else ()), size) if dims and size else None
        if name.endswith((".nrrd", ".nhdr")):
            header = _text_header(path)
            dims = _positive_ints(header.get("sizes", ""))
            size = _NRRD_TYPE_SIZES.get(header.get("type", "").lower())
            return (tuple(dims), size) if dims and size else None
    except Exception:  # an unparsable header: the reader reports the file
        return None
    return None


def metaimage_header_problem(path: str | os.PathLike) -> str | None:
    """
    What is wrong with a MetaImage header (``.mhd``/``.mha``), in words, when it can be told from the header alone:
    a missing or inconsistent ``NDims``, ``DimSize``, ``ElementSpacing`` or ``ElementType``, no ``ElementDataFile``,
    a missing data file, or one whose size is not exactly what ``DimSize`` and ``ElementType`` imply (a compressed
    one is decompressed in chunks and its zlib checksum verified).

    Args:
        path: the header file.

    Returns:
        the problem, or ``None`` when the header looks consistent (or cannot be parsed as text at all; the reader
        then reports it).

    Example::

        metaimage_header_problem("Case00.mhd")  # "the header has no DimSize (the size of each axis)"
    """
    path = os.fspath(path)
    try:
        header = _text_header(path, stop="ElementDataFile")
    except OSError:
        return None
    if "NDims" not in header:
        return "the header has no NDims (the number of axes)"
    ndims = _positive_ints(header["NDims"])
    if ndims is None or len(ndims) != 1:
        return f"the header's NDims = {header['NDims']!r} is not a positive integer"
    if "DimSize" not in header:
        return "the header has no DimSize (the size of each axis)"
    dims = _positive_ints(header["DimSize"])
    if dims is None:
        return f"the header's DimSize = {header['DimSize']!r} is not a list of positive integers"
    if len(dims) != ndims[0]:
        return f"the header's DimSize has {len(dims)} values but its NDims = {ndims[0]}"
    for key in ("ElementSpacing", "ElementSize"):
        if key in header and len(header[key].split()) != ndims[0]:
            return f"the header's {key} has {len(header[key].split())} values but its NDims = {ndims[0]}"
    element = header.get("ElementType")
    if element is None:
        return "the header has no ElementType (the voxel type, e.g. MET_FLOAT)"
    base = element.removesuffix("_ARRAY")
    if base not in _MET_TYPE_SIZES:
        return f"the header's ElementType {element!r} is unknown (known: {', '.join(_MET_TYPE_SIZES)})"
    data_file = header.get("ElementDataFile")
    if data_file is None:
        return "the header has no ElementDataFile (the name of the voxel data file, or LOCAL)"
    if data_file.upper() in ("LOCAL", "LIST") or "%" in data_file or " " in data_file:
        return None
    data = os.path.join(os.path.dirname(path), data_file)
    if not os.path.isfile(data):
        return f"the data file {data} named in the header is missing"
    if header.get("HeaderSize", "0") not in ("0", ""):
        return None
    channels = _positive_ints(header.get("ElementNumberOfChannels", "1")) or [1]
    need = int(np.prod(dims)) * channels[0] * _MET_TYPE_SIZES[base]
    if header.get("CompressedData", "False").lower() == "true":
        return _compressed_metaimage_problem(data, need, f"DimSize {dims} of {element}")
    have = os.path.getsize(data)
    if have != need:
        return (
            f"the data file {data} named in the header holds {have} bytes; DimSize {dims} of {element} needs exactly "
            f"{need}"
            + (f" ({have - need} bytes too many: a wrong header or another file's data)" if have > need else "")
        )
    return None


def _compressed_metaimage_problem(data: str, need: int, what: str, chunk: int = 1 << 20) -> str | None:
    """Decompress a MetaImage's zlib data file in chunks: its checksum must verify and it must hold ``need`` bytes."""
    stream, size = zlib.decompressobj(), 0
    try:
        with open(data, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                size += len(stream.decompress(block, chunk))
                while stream.unconsumed_tail and size <= need:
                    size += len(stream.decompress(stream.unconsumed_tail, chunk))
                if stream.eof or size > need:
                    break
    except zlib.error as e:
        return f"the compressed data file {data} is corrupt ({e})"
    if size > need:
        return f"the compressed data file {data} holds more than the {need} bytes {what} needs once decompressed"
    if not stream.eof:
        return f"the compressed data file {data} is truncated (its zlib stream ends before its checksum)"
    if size != need:
        return f"the compressed data file {data} holds {size} bytes once decompressed; {what} needs exactly {need}"
    return None


@contextlib.contextmanager
def captured_stderr() -> Iterator[io.StringIO]:
    """
    Capture what native code (ITK's MetaImage parser) writes to the process's standard error while the block runs;
    the text is in the yielded buffer afterwards, and nothing reaches the terminal.

    Example::

        with captured_stderr() as noise:
            reader.read("broken.mhd")
        noise.getvalue()  # "DimSize required and not defined.\\n..."
    """
    buffer = io.StringIO()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable file descriptor 2 (e.g. a detached process)
        yield buffer
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield buffer
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            buffer.write(tmp.read().decode("utf-8", errors="replace"))
