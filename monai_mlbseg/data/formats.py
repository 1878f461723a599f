"""
The on-disk layouts of the supported data sets: where the files of a case are, and what values they hold.

Only file-layout and value conventions live here; splits, spacings and intensity rules are dataset choices and
belong in a bundle config. Each :py:class:`VolumeFormat` discovers the cases of a data folder, names the MONAI
reader of each file and writes a case in its layout (:py:meth:`VolumeFormat.write`, e.g. for synthetic data);
:py:func:`load_volume_transforms` builds the MONAI pipeline that loads a datalist item.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from monai.data import ImageReader, ITKReader
from monai.transforms import AsDiscreted, Compose, EnsureChannelFirstd, EnsureTyped, Lambdad, LoadImaged
from monai.utils import ensure_tuple
from scipy import ndimage

from ..utils.io import TEMP_MARKER
from .readers import H5ImageReader, NiftiReader
from .writers import write_h5, write_itk, write_nifti

__all__ = [
    "CaseFiles",
    "VolumeFormat",
    "FORMATS",
    "get_format",
    "load_volume_transforms",
    "first_channel",
    "write_case",
]


class CaseFiles(NamedTuple):
    """One case to write, as :py:meth:`VolumeFormat.write` hands it to the format's ``write_fn``."""

    #: where the image goes (absolute).
    image_path: Path
    #: where the label goes, ``None`` for an unlabeled case.
    label_path: Path | None
    case_id: str
    #: float32 ``[H, W, D]``.
    image: np.ndarray
    #: uint8 ``[H, W, D]`` {0, 1}, or ``None``.
    label: np.ndarray | None
    spacing: tuple[float, ...]


def _visible(name: str) -> bool:
    """Skip hidden files (``._x.nii.gz`` AppleDouble junk of the MSD archives) and unfinished atomic writes."""
    return not name.startswith(".") and TEMP_MARKER not in name


def _per_case_folder(image_name: str, label_name: str) -> Callable[[Path], dict[str, tuple[str, str | None]]]:
    def discover(root: Path) -> dict[str, tuple[str, str | None]]:
        out: dict[str, tuple[str, str | None]] = {}
        for case in sorted(p for p in root.iterdir() if p.is_dir() and _visible(p.name)):
            if (case / image_name).is_file():
                label = f"{case.name}/{label_name}"
                out[case.name] = (f"{case.name}/{image_name}", label if (root / label).is_file() else None)
        return out

    return discover


def _discover_uamt(root: Path) -> dict[str, tuple[str, str | None]]:
    import h5py

    out: dict[str, tuple[str, str | None]] = {}
    for case in sorted(p for p in root.iterdir() if p.is_dir() and _visible(p.name)):
        path = case / "mri_norm2.h5"
        if not path.is_file():
            continue
        rel = f"{case.name}/mri_norm2.h5"
        try:
            with h5py.File(path, "r") as f:
                has_label = isinstance(f.get("label"), h5py.Dataset)
        except Exception:  # unreadable: assume labeled, the check reports the file
            has_label = True
        out[case.name] = (rel, rel if has_label else None)
    return out


def _discover_msd(root: Path) -> dict[str, tuple[str, str | None]]:
    out: dict[str, tuple[str, str | None]] = {}
    for folder, labeled in (("imagesTr", True), ("imagesTs", False)):
        if not (root / folder).is_dir():
            continue
        for p in sorted((root / folder).iterdir()):
            suffix = next((x for x in (".nii.gz", ".nii") if p.name.endswith(x)), None)
            if suffix is None or not (p.is_file() and _visible(p.name)) or p.name[: -len(suffix)] in out:
                continue
            case = p.name[: -len(suffix)]
            # the label may be compressed or not, whatever the image is (MSD ships .nii.gz; a user's copy may not)
            label = next(
                (
                    f"labelsTr/{case}{x}"
                    for x in (suffix, ".nii.gz", ".nii")
                    if (root / f"labelsTr/{case}{x}").is_file()
                ),
                None,
            )
            out[case] = (f"{folder}/{p.name}", label if labeled else None)
    return out


def _discover_promise12(root: Path) -> dict[str, tuple[str, str | None]]:
    out: dict[str, tuple[str, str | None]] = {}
    for p in sorted(root.iterdir()):
        if not (p.is_file() and _visible(p.name) and p.suffix == ".mhd") or p.stem.endswith("_segmentation"):
            continue
        label = f"{p.stem}_segmentation.mhd"
        out[p.stem] = (p.name, label if (root / label).is_file() else None)
    return out


def _reader_factory(kind: str) -> Callable[[str, Sequence[float] | None], ImageReader]:
    def make(role: str, spacing: Sequence[float] | None) -> ImageReader:
        if kind == "h5":
            return H5ImageReader(dataset="image" if role == "image" else "label", spacing=spacing)
        return ITKReader() if kind == "itk" else NiftiReader(spacing=spacing)

    return make


def _write_h5_case(case: CaseFiles) -> None:
    """Image and label in one HDF5 file (no geometry: the spacing is not stored)."""
    write_h5(case.image_path, case.image, case.label)


def _volume_writer(
    write: Callable[[Path, np.ndarray, Sequence[float]], None], label_value: int = 1
) -> Callable[[CaseFiles], None]:
    """A case writer storing the image and the label (foreground as ``label_value``) in one file each."""

    def write_case_files(case: CaseFiles) -> None:
        write(case.image_path, case.image, case.spacing)
        if case.label is not None and case.label_path is not None:
            write(case.label_path, case.label * np.uint8(label_value), case.spacing)

    return write_case_files


def _prostate_zones(label: np.ndarray) -> np.ndarray:
    """Split a gland mask in two zones by a plane through its centroid: 1 (posterior, 'PZ') and 2 (the rest)."""
    mask = label > 0
    if not mask.any():
        return mask.astype(np.uint8)
    cy = np.nonzero(mask)[1].mean()
    posterior = np.arange(label.shape[1]).reshape(1, -1, 1) >= cy
    return np.where(mask, np.where(posterior, 1, 2), 0).astype(np.uint8)


def _second_contrast(image: np.ndarray, label: np.ndarray, case_id: str) -> np.ndarray:
    """An ADC-like channel: the gland darker than its surroundings, smoother, with its own noise."""
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    adc = 0.5 * ndimage.gaussian_filter(image, 1.0) - 0.8 * ndimage.gaussian_filter((label > 0).astype(np.float32), 1)
    adc = adc + rng.normal(0.0, 0.2, size=image.shape)
    return ((adc - adc.mean()) / (adc.std() + 1e-6)).astype(np.float32)


def _write_msd_prostate_case(case: CaseFiles) -> None:
    """A 2-channel image (T2, an ADC-like second contrast) and the gland split into the zones {1, 2}."""
    label = np.zeros_like(case.image) if case.label is None else case.label
    write_nifti(
        case.image_path, np.stack([case.image, _second_contrast(case.image, label, case.case_id)], -1), case.spacing
    )
    if case.label is not None and case.label_path is not None:
        write_nifti(case.label_path, _prostate_zones(case.label), case.spacing)


@dataclass(frozen=True)
class VolumeFormat:
    """
    One on-disk layout of 3D volumes with binary (or binarisable) labels.

    Attributes:
        name: registry key, e.g. ``"uamt_h5"``.
        description: the layout in one line.
        anatomy: ``"la"`` (left atrium) or ``"prostate"``; the kind of synthetic data that mimics it.
        reader_kind: ``"h5"``, ``"itk"`` or ``"nibabel"``.
        image_path: ``(case_id, labeled) -> relative image path`` of a case.
        label_path: ``case_id -> relative label path`` of a case.
        discover_fn: ``root -> {case_id: (image_path, label_path or None)}``.
        write_fn: ``CaseFiles -> None``, writes the files of one case (see :py:meth:`write`).
        default_case_id: ``index -> case id`` in the naming style of the data set (for synthetic data).
        image_channels: channels of the stored image (the method uses channel 0, so an image of channel 0 alone, a
            3D single-channel volume, is accepted too); default 1.
        label_values: the values a label file may hold (anything above 0 is foreground); default ``(0, 1)``.
        spatial_dims: spatial dimensions of the images; default 3.
        has_geometry: whether the files store spacing/orientation (HDF5 does not; a NIfTI header may lack a
            spacing); default ``True``.
        case_lists: whether the data set comes with UA-MT style ``train.list`` / ``test.list`` files (synthetic
            data sets of this format write them too); default ``False``.
    """

    name: str
    description: str
    anatomy: str
    reader_kind: str
    image_path: Callable[[str, bool], str]
    label_path: Callable[[str], str]
    discover_fn: Callable[[Path], dict[str, tuple[str, str | None]]]
    write_fn: Callable[[CaseFiles], None]
    default_case_id: Callable[[int], str]
    image_channels: int = 1
    label_values: tuple[int, ...] = (0, 1)
    spatial_dims: int = 3
    has_geometry: bool = True
    case_lists: bool = False

    def discover(self, data_dir: str | os.PathLike) -> dict[str, tuple[str, str | None]]:
        """
        The cases found in ``data_dir``.

        Args:
            data_dir: the data folder.

        Returns:
            ``{case_id: (image_path, label_path or None)}`` with paths relative to ``data_dir`` (``/``-separated),
            sorted by case id.

        Raises:
            FileNotFoundError: when ``data_dir`` is not a folder.
        """
        root = Path(data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: data folder not found.")
        return dict(sorted(self.discover_fn(root).items()))

    def reader(self, role: str = "image", spacing: Sequence[float] | None = None) -> ImageReader:
        """
        A MONAI reader for the files of this format.

        Args:
            role: ``"image"``, or ``"label"`` for label maps (it matters for HDF5, where both live in one file).
            spacing: voxel spacing (mm, one per spatial axis) of the files that store none: every HDF5 file, and a
                NIfTI file whose header gives no spacing (see :py:class:`~monai_mlbseg.data.readers.NiftiReader`);
                ``None``: unit spacing for HDF5, nibabel's 1 mm for such a NIfTI file.

        Raises:
            ValueError: when ``spacing`` is not ``spatial_dims`` positive numbers, or is given for a format whose
                files always store a spacing (ITK's NRRD and MetaImage).
        """
        if spacing is not None:
            if self.reader_kind == "itk":
                raise ValueError(
                    f"format {self.name!r} reads files that always store their spacing; a spacing only applies to "
                    "HDF5 files and NIfTI files whose header gives none "
                    f"({', '.join(k for k, f in FORMATS.items() if f.reader_kind != 'itk')})."
                )
            if len(ensure_tuple(spacing)) != self.spatial_dims:
                raise ValueError(f"spacing must be {self.spatial_dims} positive numbers (mm), got {spacing!r}.")
        return _reader_factory(self.reader_kind)(role, spacing)

    def write(
        self,
        data_dir: str | os.PathLike,
        case_id: str,
        image: np.ndarray,
        label: np.ndarray | None = None,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> dict:
        """
        Write one case in this layout (atomically, file by file).

        ``uamt_h5`` stores float32 ``image`` and uint8 ``label`` in ``<case>/mri_norm2.h5`` (no geometry: ``spacing``
        is not stored); ``la_raw`` writes ``lgemri.nrrd`` and ``laendo.nrrd`` with label value 255; ``msd_heart``
        and ``msd_prostate`` write NIfTI (``imagesTr``/``labelsTr``, or ``imagesTs`` for unlabeled cases);
        ``msd_prostate`` writes a 2-channel 4D image (channel 1 an ADC-like contrast) and labels {0,1,2} (the gland
        split into two zones); ``promise12`` writes ``CaseNN.mhd`` + ``.raw`` and ``CaseNN_segmentation.mhd`` +
        ``.raw``.

        Args:
            data_dir: the data folder.
            case_id: the case id (folder or file name stem).
            image: float ``[H, W, D]``, written as float32.
            label: binary ``[H, W, D]`` mask (anything above 0 is foreground), or ``None`` for an unlabeled case.
            spacing: voxel spacing stored in the files (formats with geometry).

        Returns:
            the datalist entry ``{"case_id", "image", "label"}`` (no ``"label"`` when ``label`` is ``None``) with
            paths relative to ``data_dir``.

        Raises:
            ValueError: when ``image`` is not 3D, ``label`` has another shape, or ``spacing`` is not 3 positive
                numbers.

        Example::

            entry = FORMATS["msd_heart"].write("/tmp/heart", "la_000", image, label, spacing=(1.25, 1.25, 1.37))
        """
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 3:
            raise ValueError(f"image must be 3D [H, W, D], got shape {image.shape}.")
        if label is not None:
            label = (np.asarray(label) > 0).astype(np.uint8)
            if label.shape != image.shape:
                raise ValueError(f"label shape {label.shape} differs from image shape {image.shape}.")
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or any(s <= 0 for s in spacing):
            raise ValueError(f"spacing must be 3 positive numbers, got {spacing}.")
        root = Path(data_dir)
        entry = {"case_id": case_id, "image": self.image_path(case_id, label is not None)}
        if label is not None:
            entry["label"] = self.label_path(case_id)
        for key in ("image", "label"):
            if key in entry:
                (root / entry[key]).parent.mkdir(parents=True, exist_ok=True)
        label_file = root / entry["label"] if label is not None else None
        self.write_fn(CaseFiles(root / entry["image"], label_file, case_id, image, label, spacing))
        return entry


FORMATS: dict[str, VolumeFormat] = {
    "uamt_h5": VolumeFormat(
        name="uamt_h5",
        description="UA-MT left atrium: D/<case>/mri_norm2.h5 with float32 'image' and uint8 'label' {0,1}",
        anatomy="la",
        has_geometry=False,
        reader_kind="h5",
        image_path=lambda c, labeled: f"{c}/mri_norm2.h5",
        label_path=lambda c: f"{c}/mri_norm2.h5",
        discover_fn=_discover_uamt,
        write_fn=_write_h5_case,
        default_case_id=lambda i: f"case{i:03d}",
        case_lists=True,
    ),
    "la_raw": VolumeFormat(
        name="la_raw",
        description="2018 LA challenge: D/<case>/lgemri.nrrd (image) and D/<case>/laendo.nrrd (label {0,255})",
        anatomy="la",
        label_values=(0, 255),
        reader_kind="itk",
        image_path=lambda c, labeled: f"{c}/lgemri.nrrd",
        label_path=lambda c: f"{c}/laendo.nrrd",
        discover_fn=_per_case_folder("lgemri.nrrd", "laendo.nrrd"),
        write_fn=_volume_writer(write_itk, label_value=255),
        default_case_id=lambda i: f"case{i:03d}",
        case_lists=True,
    ),
    "msd_heart": VolumeFormat(
        name="msd_heart",
        description="MSD Task02_Heart: D/imagesTr/la_NNN.nii.gz, D/labelsTr/la_NNN.nii.gz {0,1}, D/imagesTs",
        anatomy="la",
        reader_kind="nibabel",
        image_path=lambda c, labeled: f"{'imagesTr' if labeled else 'imagesTs'}/{c}.nii.gz",
        label_path=lambda c: f"labelsTr/{c}.nii.gz",
        discover_fn=_discover_msd,
        write_fn=_volume_writer(write_nifti),
        default_case_id=lambda i: f"la_{i:03d}",
    ),
    "promise12": VolumeFormat(
        name="promise12",
        description="PROMISE12: D/CaseNN.mhd (+.raw) and D/CaseNN_segmentation.mhd {0,1}",
        anatomy="prostate",
        reader_kind="itk",
        image_path=lambda c, labeled: f"{c}.mhd",
        label_path=lambda c: f"{c}_segmentation.mhd",
        discover_fn=_discover_promise12,
        write_fn=_volume_writer(write_itk),
        default_case_id=lambda i: f"Case{i:02d}",
    ),
    "msd_prostate": VolumeFormat(
        name="msd_prostate",
        description="MSD Task05_Prostate: D/imagesTr/prostate_NN.nii.gz (x,y,z,2: T2, ADC; or x,y,z: T2), "
        "D/labelsTr {0,1,2}",
        anatomy="prostate",
        image_channels=2,
        label_values=(0, 1, 2),
        reader_kind="nibabel",
        image_path=lambda c, labeled: f"{'imagesTr' if labeled else 'imagesTs'}/{c}.nii.gz",
        label_path=lambda c: f"labelsTr/{c}.nii.gz",
        discover_fn=_discover_msd,
        write_fn=_write_msd_prostate_case,
        default_case_id=lambda i: f"prostate_{i:02d}",
    ),
}


def get_format(name: str | VolumeFormat) -> VolumeFormat:
    """
    The :py:class:`VolumeFormat` registered as ``name`` (a ``VolumeFormat`` is returned as is).

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    if isinstance(name, VolumeFormat):
        return name
    if name not in FORMATS:
        raise ValueError(f"unknown data format {name!r}; known formats: {', '.join(FORMATS)}.")
    return FORMATS[name]


def write_case(
    out_dir: str | os.PathLike,
    case_id: str,
    image: np.ndarray,
    label: np.ndarray | None,
    format: str | VolumeFormat = "uamt_h5",
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> dict:
    """
    Write one case in the layout of ``format``: :py:meth:`VolumeFormat.write` of :py:func:`get_format` ``(format)``.

    Raises:
        ValueError: for an unknown format, and as :py:meth:`VolumeFormat.write`.

    Example::

        write_case("/tmp/la", "case000", image, label, "uamt_h5")  # {"case_id": ..., "image": ..., "label": ...}
    """
    return get_format(format).write(out_dir, case_id, image, label, spacing)


def first_channel(img: torch.Tensor) -> torch.Tensor:
    """Channel 0 of a channel-first image, keeping the channel axis (``[C, *S] -> [1, *S]``)."""
    return img[:1]


def load_volume_transforms(
    format: str | VolumeFormat,
    keys: Sequence[str] = ("image", "label"),
    spacing: Sequence[float] | None = None,
    binarize: bool = True,
) -> Compose:
    """
    MONAI transforms that load one datalist item of ``format``: ``keys[0]`` is the image, the other keys are label
    maps (e.g. ``("image", "label", "gt")``). Keys missing from an item are skipped, so unlabeled items work.

    The image comes back as float32 ``[1, *S]`` (channel 0 of multi-channel images such as MSD prostate's T2/ADC;
    a single-channel image of such a format, e.g. T2 alone, is that channel),
    each label map as float32 ``[1, *S]`` binarised (``>= 0.5``, i.e. ``> 0`` for integer labels: the whole gland
    of MSD prostate's zones, 255 of the LA challenge). Both are MetaTensors carrying the file's affine. The on-disk
    axis order is kept (``x, y, z`` for ITK and NIfTI, as stored for HDF5), so slices along the last axis are the
    acquisition slices.

    Args:
        format: a key of :py:data:`FORMATS` or a :py:class:`VolumeFormat`.
        keys: the image key, then the label keys.
        spacing: voxel spacing (mm) of the files that store none: HDF5 (``uamt_h5``), NIfTI files whose header
            gives none (``msd_heart``, ``msd_prostate``; files with a spacing keep theirs); ``None``: unit spacing
            for HDF5, nibabel's 1 mm guess for such a NIfTI file (the data check refuses those).
        binarize: binarise the label maps (``False`` keeps their stored values, as float32).

    Returns:
        a ``Compose`` mapping ``{"image": path, "label": path, ...}`` to ``{"image": [1, *S], "label": [1, *S], ...}``.

    Raises:
        ValueError: for an unknown format, empty ``keys``, or a ``spacing`` :py:meth:`VolumeFormat.reader` refuses.

    Example::

        load = load_volume_transforms("msd_prostate", keys=("image", "label"))
        item = load({"image": "/data/imagesTr/prostate_00.nii.gz", "label": "/data/labelsTr/prostate_00.nii.gz"})
        item["image"].shape, item["label"].unique()  # (1, X, Y, Z), tensor([0., 1.])
    """
    spec = get_format(format)
    keys = list(keys)
    if not keys:
        raise ValueError("keys must name at least the image key.")
    image_key, label_keys = keys[0], keys[1:]
    if spec.reader_kind == "h5":
        # suffix-based selection: the HDF5 reader for .h5 files, MONAI's own readers for anything else (e.g. the
        # NIfTI initial labels written by the bootstrap)
        loaders = []
        for role, role_keys in (("image", [image_key]), ("label", label_keys)):
            if role_keys:
                loader = LoadImaged(role_keys, allow_missing_keys=True)
                loader.register(spec.reader(role, spacing))
                loaders.append(loader)
    else:
        loaders = [LoadImaged(keys, reader=spec.reader("image", spacing), allow_missing_keys=True)]
    xforms = [*loaders, EnsureChannelFirstd(keys, allow_missing_keys=True)]
    if spec.image_channels > 1:
        xforms.append(Lambdad(image_key, first_channel, allow_missing_keys=True))
    if label_keys and binarize:
        xforms.append(AsDiscreted(label_keys, threshold=0.5, allow_missing_keys=True))
    xforms.append(EnsureTyped(keys, dtype=torch.float32, allow_missing_keys=True))
    return Compose(xforms)
