"""
The on-disk layouts of the supported data sets: where the files of a case are, and what values they hold.

Only file-layout and value conventions live here; splits, spacings and intensity rules are dataset choices and
belong in a bundle config. Each :py:class:`VolumeFormat` discovers the cases of a data folder, names the MONAI
reader of each file, and :py:func:`load_volume_transforms` builds the MONAI pipeline that loads a datalist item.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.data import ImageReader, ITKReader, NibabelReader
from monai.transforms import AsDiscreted, Compose, EnsureChannelFirstd, EnsureTyped, Lambdad, LoadImaged

from ..utils.io import TEMP_MARKER
from .readers import H5ImageReader

__all__ = ["VolumeFormat", "FORMATS", "get_format", "load_volume_transforms", "first_channel"]


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
            case = p.name[: -len(".nii.gz")]
            if not (p.is_file() and _visible(p.name) and p.name.endswith(".nii.gz")) or case in out:
                continue
            label = f"labelsTr/{p.name}"
            out[case] = (f"{folder}/{p.name}", label if labeled and (root / label).is_file() else None)
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
        return ITKReader() if kind == "itk" else NibabelReader()

    return make


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
        default_case_id: ``index -> case id`` in the naming style of the data set (for synthetic data).
        image_channels: channels of the stored image (the method uses channel 0); default 1.
        label_values: the values a label file may hold (anything above 0 is foreground); default ``(0, 1)``.
        spatial_dims: spatial dimensions of the images; default 3.
        has_geometry: whether the files store spacing/orientation (HDF5 does not); default ``True``.
    """

    name: str
    description: str
    anatomy: str
    reader_kind: str
    image_path: Callable[[str, bool], str]
    label_path: Callable[[str], str]
    discover_fn: Callable[[Path], dict[str, tuple[str, str | None]]]
    default_case_id: Callable[[int], str]
    image_channels: int = 1
    label_values: tuple[int, ...] = (0, 1)
    spatial_dims: int = 3
    has_geometry: bool = True

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
            spacing: voxel spacing for formats without geometry (``has_geometry`` false).

        Raises:
            ValueError: when ``spacing`` is given for a format whose files store their own geometry.
        """
        if spacing is not None and self.has_geometry:
            raise ValueError(
                f"format {self.name!r} stores its own geometry; spacing only applies to formats without it "
                f"({', '.join(k for k, f in FORMATS.items() if not f.has_geometry)})."
            )
        return _reader_factory(self.reader_kind)(role, spacing)


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
        default_case_id=lambda i: f"case{i:03d}",
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
        default_case_id=lambda i: f"case{i:03d}",
    ),
    "msd_heart": VolumeFormat(
        name="msd_heart",
        description="MSD Task02_Heart: D/imagesTr/la_NNN.nii.gz, D/labelsTr/la_NNN.nii.gz {0,1}, D/imagesTs",
        anatomy="la",
        reader_kind="nibabel",
        image_path=lambda c, labeled: f"{'imagesTr' if labeled else 'imagesTs'}/{c}.nii.gz",
        label_path=lambda c: f"labelsTr/{c}.nii.gz",
        discover_fn=_discover_msd,
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
        default_case_id=lambda i: f"Case{i:02d}",
    ),
    "msd_prostate": VolumeFormat(
        name="msd_prostate",
        description="MSD Task05_Prostate: D/imagesTr/prostate_NN.nii.gz (x,y,z,2: T2, ADC), D/labelsTr {0,1,2}",
        anatomy="prostate",
        image_channels=2,
        label_values=(0, 1, 2),
        reader_kind="nibabel",
        image_path=lambda c, labeled: f"{'imagesTr' if labeled else 'imagesTs'}/{c}.nii.gz",
        label_path=lambda c: f"labelsTr/{c}.nii.gz",
        discover_fn=_discover_msd,
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

    The image comes back as float32 ``[1, *S]`` (channel 0 of multi-channel images such as MSD prostate's T2/ADC),
    each label map as float32 ``[1, *S]`` binarised (``>= 0.5``, i.e. ``> 0`` for integer labels: the whole gland
    of MSD prostate's zones, 255 of the LA challenge). Both are MetaTensors carrying the file's affine. The on-disk
    axis order is kept (``x, y, z`` for ITK and NIfTI, as stored for HDF5), so slices along the last axis are the
    acquisition slices.

    Args:
        format: a key of :py:data:`FORMATS` or a :py:class:`VolumeFormat`.
        keys: the image key, then the label keys.
        spacing: voxel spacing for formats without geometry (``uamt_h5``); ``None``: unit spacing.
        binarize: binarise the label maps (``False`` keeps their stored values, as float32).

    Returns:
        a ``Compose`` mapping ``{"image": path, "label": path, ...}`` to ``{"image": [1, *S], "label": [1, *S], ...}``.

    Raises:
        ValueError: for an unknown format, empty ``keys``, or ``spacing`` with a format that stores geometry.

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
