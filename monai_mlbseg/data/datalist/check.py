"""
The thorough input check: the structure of a datalist and every file it names, before any work starts.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import logging
import os
import re
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.transforms import LoadImage
from tqdm.auto import tqdm

from ...utils.errors import InputError, Problem
from ..formats import VolumeFormat, get_format
from ..readers import (
    NIFTI_SUFFIXES,
    captured_stderr,
    declared_voxels,
    metaimage_header_problem,
    nifti_header,
    unspaced_axes,
)
from .build import PATH_KEYS, REQUIRED_SPLITS, SPLITS, from_decathlon, is_decathlon, item_location
from .paths import is_inside, resolve_path

__all__ = [
    "GEOMETRY_WARN_VOXELS",
    "GEOMETRY_MAX_VOXELS",
    "MIN_SPATIAL_SIZE",
    "MAX_ANISOTROPY",
    "check_datalist",
    "validate_datalist",
    "validate_inputs",
]

logger = logging.getLogger("monai_mlbseg.data.datalist")

#: splits whose items need a ``"label"``.
_LABELED_SPLITS = ("labeled", "test", "validation")
#: smallest accepted volume, in voxels per axis (in-plane, in-plane, slices): anything smaller is not a scan.
MIN_SPATIAL_SIZE = (16, 16, 4)
#: the memory checking a volume takes, in bytes per voxel: measured 15-17 for an image, 25-26 for a label
#: (docs/reliability.md, "Memory")
CHECK_BYTES_PER_VOXEL = 32


def _total_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _too_large(shape: tuple[int, ...], itemsize: int) -> str:
    voxels = int(np.prod(shape, dtype=np.float64))
    return (
        f"the header declares a volume of shape {shape} ({voxels * itemsize / 2**30:.1f} GiB as stored, "
        f"{voxels * 4 / 2**30:.1f} GiB as float32), more than this machine checks: at most {max_check_voxels():,} "
        f"voxels (half its {_total_memory() / 2**30:.0f} GiB of memory at {CHECK_BYTES_PER_VOXEL} bytes per voxel); "
        "a corrupt header, or a volume to crop or resample first"
    )


def max_check_voxels() -> int:
    """
    The largest volume (in voxels) the check reads: half of this machine's physical memory at
    :py:data:`CHECK_BYTES_PER_VOXEL` bytes per voxel. A file whose header declares more is refused from its header
    alone, before any voxel is read (``MLBSEG_MAX_CHECK_VOXELS`` overrides the limit).
    """
    override = os.environ.get("MLBSEG_MAX_CHECK_VOXELS")
    return int(override) if override else _total_memory() // 2 // CHECK_BYTES_PER_VOXEL


#: intensities of at least this magnitude are no-data values (a float32's largest value is 3.4e38), not signal
NO_DATA_MAGNITUDE = 1e30
#: a ratio of largest to smallest voxel spacing above this gets a warning (typical MRI: 1 to 10).
MAX_ANISOTROPY = 20.0


def validate_datalist(
    datalist: dict,
    format: str | VolumeFormat,
    data_dir: str | os.PathLike | None = None,
    *,
    require_unlabeled: bool = False,
    allow_outside: bool = False,
    progress: bool = True,
    spacing: Sequence[float] | None = None,
) -> dict:
    """
    :py:func:`check_datalist` (same arguments, same defaults), raising instead of returning: the bundles' check
    before any training starts.

    Returns:
        ``datalist`` unchanged.

    Raises:
        InputError: listing every problem (each names its file or case).

    Example::

        validate_datalist(training_datalist("/data/LA", "uamt_h5", train_list="train.list", num_labeled=8), "uamt_h5")
    """
    problems = check_datalist(
        datalist,
        format,
        data_dir,
        require_unlabeled=require_unlabeled,
        allow_outside=allow_outside,
        progress=progress,
        spacing=spacing,
    )
    if problems:
        raise InputError(problems, "the training data failed the checks (nothing was trained or written)")
    return datalist


def validate_inputs(
    items: Sequence[dict],
    format: str | VolumeFormat,
    keys: Sequence[str] = ("image",),
    progress: bool = False,
    spacing: Sequence[float] | None = None,
) -> Sequence[dict]:
    """
    Check the files of inference or evaluation items (``{"image": path, "label": path}``, absolute paths or relative
    to the working folder) with the same file checks as :py:func:`check_datalist`: the bundles' ``inference`` and
    ``evaluate`` configs call it before loading the network.

    Args:
        items: the items.
        format: a key of :py:data:`~monai_mlbseg.data.formats.FORMATS` or a ``VolumeFormat``.
        keys: the keys whose files are needed: ``("image",)`` for inference, ``("image", "label")`` for evaluation
            (an empty label is accepted: a test case without foreground is legitimate).
        progress: show a progress bar while reading the files.
        spacing: the voxel spacing (mm) of files that store none, as :py:func:`check_datalist` takes it.

    Returns:
        ``items`` unchanged.

    Raises:
        InputError: when there is no item, an item lacks a key, or a file is missing or fails a check.

    Example::

        validate_inputs([{"image": "/data/imagesTs/la_001.nii.gz"}], "msd_heart")
    """
    problems: list[Problem] = []
    if not items:
        problems.append(Problem("datalist", "no input to process (the test list is empty)"))
    entries = []
    for i, it in enumerate(items):
        missing = [k for k in keys if not (isinstance(it, dict) and isinstance(it.get(k), str) and it[k])]
        if missing:
            problems.append(Problem(f"input {item_location('test', i, it)}", f"needs {', '.join(map(repr, missing))}"))
        else:
            entries.append(("test", i, {k: it[k] for k in ("case_id", *keys) if k in it}))
    problems += _check_files(entries, os.getcwd(), get_format(format), True, progress, spacing)
    if problems:
        raise InputError(problems, "the input failed the checks (nothing was written)")
    return items


_FORMS_HINT = " (expected the lists labeled, unlabeled, test, or MONAI's decathlon form with 'training')"


def _structure(datalist: Any, spec: VolumeFormat, require_unlabeled: bool) -> list[Problem]:
    if not isinstance(datalist, dict):
        return [
            Problem(
                "datalist",
                f"must be a JSON object with the lists {', '.join(REQUIRED_SPLITS)}, got {type(datalist).__name__}",
            )
        ]
    problems = []
    if datalist.get("format", spec.name) != spec.name:
        problems.append(Problem("datalist", f"was made for format {datalist['format']!r}, checked as {spec.name!r}"))
    for split in SPLITS:
        if split not in datalist:
            if split in REQUIRED_SPLITS:
                hint = _FORMS_HINT if not any(k in datalist for k in SPLITS) else ""
                problems.append(Problem("datalist", f"missing the list {split!r}{hint}"))
            continue
        items = datalist[split]
        if not isinstance(items, list):
            problems.append(Problem("datalist", f"{split!r} must be a list of items, got {type(items).__name__}"))
            continue
        for i, it in enumerate(items):
            where = f"datalist {item_location(split, i, it)}"
            if not isinstance(it, dict):
                problems.append(Problem(where, f"an item must be an object with 'image', got {it!r}"))
                continue
            for key in PATH_KEYS:
                if key in it and (not isinstance(it[key], str) or not it[key]):
                    problems.append(Problem(where, f"{key!r} must be a file path, got {it[key]!r}"))
            if "image" not in it:
                problems.append(Problem(where, "item without 'image'"))
            if split in _LABELED_SPLITS and "label" not in it:
                problems.append(Problem(where, f"{split} items need a 'label'"))
            if split == "unlabeled" and "label" in it:
                problems.append(Problem(where, "unlabeled items carry their ground truth under 'gt', not 'label'"))
    labeled = datalist.get("labeled")
    if isinstance(labeled, list) and not labeled:
        problems.append(Problem("datalist", "no labeled cases (the clean set is empty)"))
    unlabeled = datalist.get("unlabeled")
    if require_unlabeled and isinstance(unlabeled, list) and not unlabeled:
        problems.append(Problem("datalist", "no unlabeled cases (allow them explicitly if that is intended)"))
    return problems


def _duplicates(entries: list[tuple[str, int, dict]], paths: dict[tuple[str, int, str], str]) -> list[Problem]:
    problems = []
    seen_case: dict[str, list[str]] = {}
    seen_image: dict[str, list[tuple[str, int, dict]]] = {}
    for split, i, it in entries:
        if "case_id" in it:
            seen_case.setdefault(str(it["case_id"]), []).append(f"{split}[{i}]")
        image = paths.get((split, i, "image"))
        if image is not None:
            seen_image.setdefault(image, []).append((split, i, it))
    for case, places in seen_case.items():
        if len(places) > 1:
            splits = {p.split("[")[0] for p in places}
            kind = "across splits" if len(splits) > 1 else "within a split"
            problems.append(Problem(f"case {case}", f"listed more than once ({kind}): {', '.join(places)}"))
    for image, items in seen_image.items():
        cases = {it.get("case_id") for _, _, it in items}
        if len(items) > 1 and (len(cases) > 1 or None in cases):  # the same case twice is reported above
            places = [item_location(split, i, it) for split, i, it in items]
            problems.append(Problem(image, f"image used by several cases: {', '.join(places)}"))
    return problems


def _gzip_problem(path: str, chunk: int = 1 << 20) -> str | None:
    """
    Decompress a gzip file to its end in chunks, so that its CRC and length trailer is verified (a reader that stops
    after the voxels never checks it); ``None`` when it is intact.
    """
    try:
        with gzip.open(path, "rb") as f:
            while f.read(chunk):
                pass
    except (OSError, EOFError, zlib.error) as e:
        return f"unreadable or corrupt file (its gzip data are damaged, in transfer or on disk: {e})"
    return None


def _sha256(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _same_file_in_two_splits(
    entries: list[tuple[str, int, dict]], paths: dict[tuple[str, int, str], str]
) -> list[Problem]:
    """
    Images that are one file under two names in two splits: the same file once links are resolved, or files with
    the same bytes (a copy under another case id). Only files of equal size in different splits are hashed. Images
    named by the same path are reported by :py:func:`_duplicates`.
    """
    images = [(split, i, it, paths[(split, i, "image")]) for split, i, it in entries if (split, i, "image") in paths]
    groups: dict[str, list[tuple[str, int, dict, str]]] = {}
    for entry in images:
        groups.setdefault(os.path.realpath(entry[3]), []).append(entry)
    by_size: dict[int, list[str]] = {}
    for real in groups:
        by_size.setdefault(os.path.getsize(real), []).append(real)
    by_content: dict[str, list[tuple[str, int, dict, str]]] = {}
    for reals in by_size.values():
        spans_splits = len({split for real in reals for split, *_ in groups[real]}) > 1
        for real in reals:
            key = _sha256(real) if len(reals) > 1 and spans_splits else real
            by_content.setdefault(key, []).extend(groups[real])
    problems = []
    for members in by_content.values():
        if len({split for split, *_ in members}) < 2 or len({path for *_, path in members}) < 2:
            continue
        same_path = len({os.path.realpath(path) for *_, path in members}) == 1
        how = "the same file (a link)" if same_path else "files with identical content"
        places = ", ".join(f"{item_location(split, i, it)} ({path})" for split, i, it, path in members)
        problems.append(
            Problem(members[0][3], f"{how} in more than one split: {places}; a case may not be trained on and held out")
        )
    return problems


def _short_error(e: BaseException) -> str:
    """One line of an exception: ITK's ``ITK ERROR: Class(0x..): text`` line, else the first meaningful line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for n, line in enumerate(lines):
        m = re.search(r"(?:ITK ERROR|itk::ERROR): \w+\(0x[0-9a-fA-F]+\): (.*)", line)
        if m:
            # NRRD's parser explains below the ITK line: keep its specific lines, not its "trouble" chain
            details = [re.sub(r"^\[\w+\] \w+: ", "", d) for d in lines[n + 1 :]]
            details = [d for d in details if not d.startswith("trouble") or "|" in d][-2:]
            return f"ITK: {m.group(1).rstrip(':')}" + (f": {'; '.join(details)}" if details else "")
    lines = [line for line in lines if not re.fullmatch(r"\S+:\d+:", line)]  # C++ source locations
    text = lines[0] if lines else ""
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _Volume(NamedTuple):
    """What the cross-file checks need of a file that was read and checked."""

    shape: tuple[int, ...]
    affine: np.ndarray
    has_foreground: bool


def _rounded(values: np.ndarray) -> list[float]:
    """``values`` rounded to 4 decimals, as a list (for messages)."""
    return np.round(np.asarray(values, dtype=float), 4).tolist()


#: how to give the spacing of files that store none
_SPACING_HINT = (
    'give the spacing (prepare and check: --spacing SX,SY,SZ; the bundles: the config id "spacing") if you know it, '
    "or fix the header"
)


class _VolumeChecker:
    """Reads a file and checks it on its own; the summary feeds the image/label comparisons."""

    def __init__(self, spec: VolumeFormat, spacing: Sequence[float] | None = None) -> None:
        self.spec = spec
        self.spacing = spacing
        self.loader = LoadImage(image_only=True, ensure_channel_first=True)
        self.readers = {role: spec.reader(role, spacing) for role in ("image", "label")}
        # label maps from other sources (initial labels, MONAI Label) are binary {0, 1}; the format's own values too
        self.label_values = sorted(set(spec.label_values) | {0, 1})

    def __call__(self, path: str, role: str, what: str, problems: list[Problem]) -> _Volume | None:
        """Load and check one file; ``None`` (problems appended) when it is unusable."""
        declared = declared_voxels(path)
        if declared is not None and int(np.prod(declared[0], dtype=np.float64)) > max_check_voxels():
            problems.append(Problem(path, f"{what}: {_too_large(*declared)}"))
            return None
        if path.lower().endswith((".mhd", ".mha")):
            reason = metaimage_header_problem(path)
            if reason is not None:
                problems.append(Problem(path, f"{what}: {reason}"))
                return None
        if path.lower().endswith(".gz"):
            reason = _gzip_problem(path)
            if reason is not None:
                problems.append(Problem(path, f"{what}: {reason}"))
                return None
        try:
            reader = self.readers[role]
            with captured_stderr() as noise:  # ITK's parser writes its complaints to stderr
                img = self.loader(path, reader=reader if reader.verify_suffix(path) else None)
        except Exception as e:  # every reader error is a problem with the file
            native = [line.strip() for line in noise.getvalue().splitlines() if line.strip()]
            detail = f"; {native[0]}" if native else ""
            problems.append(Problem(path, f"{what}: unreadable or corrupt file ({_short_error(e)}{detail})"))
            return None
        spatial = tuple(int(s) for s in img.shape[1:])
        if len(spatial) != self.spec.spatial_dims:
            problems.append(Problem(path, f"{what}: {len(spatial)}D array of shape {spatial}, expected a 3D volume"))
            return None
        # the method reads channel 0 alone, so an image of that channel only is as good as the format's full image
        channels = {1, self.spec.image_channels} if role == "image" else {1}
        if img.shape[0] not in channels:
            expect = (
                "a 3D single-channel volume"
                if channels == {1}
                else f"{self.spec.image_channels} channels, or 1 (channel 0 alone, the only one the method uses)"
            )
            problems.append(
                Problem(path, f"{what}: {img.shape[0]} channels (shape {tuple(img.shape)}), expected {expect}")
            )
            return None
        small = [f"{s} < {m}" for s, m in zip(spatial, MIN_SPATIAL_SIZE) if s < m]
        if small and role == "image":
            problems.append(
                Problem(
                    path,
                    f"{what}: volume of shape {spatial} is too small for a scan ({', '.join(small)}; the minimum "
                    f"is {'x'.join(map(str, MIN_SPATIAL_SIZE))} voxels)",
                )
            )
            return None
        affine = np.asarray(img.affine, dtype=float)
        unusable = self._nifti_header_problem(path, affine) if path.lower().endswith(NIFTI_SUFFIXES) else None
        unusable = unusable or _unusable_geometry(affine)
        if unusable is not None:
            problems.append(Problem(path, f"{what}: {unusable}"))
            return None
        data = img.as_tensor()
        has_foreground = True
        if role == "image":
            finite = torch.isfinite(data) if data.dtype.is_floating_point else torch.ones_like(data, dtype=torch.bool)
            bad = int((~finite).sum())
            sentinels = int((data.abs() >= NO_DATA_MAGNITUDE).sum()) if data.dtype.is_floating_point else 0
            if bad:
                problems.append(Problem(path, f"{what}: {bad} NaN/inf intensities"))
            elif sentinels:
                extreme = float(data.abs().max())
                problems.append(
                    Problem(
                        path,
                        f"{what}: {sentinels} voxels of magnitude {extreme:.3g} or so, at least {NO_DATA_MAGNITUDE:g}: "
                        "no-data values (e.g. a float's largest value), not intensities; set them to the background "
                        "value or mask them before training",
                    )
                )
            elif bool(finite.any()) and float(data.max()) == float(data.min()):
                problems.append(
                    Problem(path, f"{what}: constant image (every voxel is {float(data.min()):g}): nothing to segment")
                )
            spacing = np.linalg.norm(np.asarray(img.affine, dtype=float)[:-1, :-1], axis=0)
            if spacing.min() > 0 and spacing.max() / spacing.min() > MAX_ANISOTROPY:
                logger.warning(
                    f"{path}: {what}: voxel spacing {np.round(spacing, 4).tolist()} is extremely anisotropic "
                    f"(ratio {spacing.max() / spacing.min():.0f} > {MAX_ANISOTROPY:g}); check the header"
                )
        else:
            values = torch.unique(data)
            expected = torch.tensor(self.label_values, dtype=values.dtype)
            unexpected = values[~torch.isin(values, expected)]
            if unexpected.numel():
                shown = ", ".join(f"{v:g}" for v in unexpected[:5].tolist())
                problems.append(
                    Problem(
                        path,
                        f"{what}: label values {shown}{', ...' if unexpected.numel() > 5 else ''} "
                        f"(format {self.spec.name} expects {', '.join(map(str, self.label_values))})",
                    )
                )
            has_foreground = bool((values > 0).any())
            if not bool((values == 0).any()):
                problems.append(
                    Problem(
                        path, f"{what}: no background voxel (the label is foreground everywhere): not a segmentation"
                    )
                )
        return _Volume(spatial, affine, has_foreground)

    def _nifti_header_problem(self, path: str, read: np.ndarray) -> str | None:
        """
        What the geometry of a NIfTI file's header, as written, lacks (``None``: nothing): a spacing (nibabel reads
        1 mm, unless ``spacing`` is given), a usable sform, or one that MONAI's reader keeps (``read``: its affine).
        """
        header = nifti_header(path)
        axes = unspaced_axes(header)
        if axes and self.spacing is None:
            pixdim = header["pixdim"][1 : min(int(header["dim"][0]), 3) + 1].tolist()
            which = "no voxel spacing" if len(axes) == len(pixdim) else f"axis {', '.join(map(str, axes))} no spacing"
            return (
                f"the header gives {which} (pixdim {pixdim}, no sform): a reader would guess 1 mm, which rescales the "
                f"anatomy against scans of another spacing; {_SPACING_HINT}"
            )
        if int(header["sform_code"]) == 0:
            return None
        sform = header.get_sform()
        unusable = _unusable_geometry(sform)
        if unusable is not None:
            return unusable
        if np.allclose(read, sform, rtol=1e-5, atol=1e-5):
            return None
        qform = "unset qform" if int(header["qform_code"]) == 0 else "qform"
        sform_spacing, read_spacing = (_rounded(np.linalg.norm(a[:-1, :-1], axis=0)) for a in (sform, read))
        return (
            f"MONAI's reader does not read the geometry of the header's sform: the sform's spacing {sform_spacing} "
            f"disagrees with pixdim {_rounded(header['pixdim'][1:4])}, so it reads the {qform} instead (spacing "
            f"{read_spacing}, origin {_rounded(read[:-1, -1])}); make the sform and pixdim agree"
        )


#: image and label geometries that place every label voxel within this many image voxels of the image voxel of the
#: same index agree (headers written in float32, or by tools that round, differ by less)
GEOMETRY_WARN_VOXELS = 0.01
#: beyond this displacement (in image voxels) some label voxel lies nearer another image voxel than its own: the label
#: does not describe the image it is paired with, and the pair is refused; in between, a WARNING names it
GEOMETRY_MAX_VOXELS = 0.5


def _unusable_geometry(affine: np.ndarray) -> str | None:
    """Why a header's voxel-to-world matrix cannot place the volume (``None``: it can)."""
    if not np.isfinite(affine).all():
        return "the header's geometry (origin, orientation or spacing) holds NaN or inf values: fix the header"
    linear = affine[:-1, :-1]
    spacing = np.linalg.norm(linear, axis=0)
    if (spacing == 0).any():
        axes = ", ".join(str(i) for i in np.flatnonzero(spacing == 0))
        return f"singular orientation: the header gives axis {axes} no voxel spacing (a zero column of its matrix)"
    if abs(np.linalg.det(linear)) <= 1e-6 * float(np.prod(spacing)):
        return "singular orientation: two axes of the header's orientation matrix point the same way"
    return None


def _displacement(image_affine: np.ndarray, label_affine: np.ndarray, shape: tuple[int, ...]) -> tuple[float, float]:
    """
    How far the label's voxels lie from the image voxels of the same index: the corners of the voxel grid mapped
    through the label's affine and back through the image's inverse (the largest displacement of an affine map over
    a box is at a corner), as the largest displacement along an image axis in image voxels, and in mm.
    """
    corners = np.array(list(itertools.product(*[(0, s - 1) for s in shape])), dtype=float)
    grid = np.concatenate([corners, np.ones((len(corners), 1))], axis=1)
    world = grid @ label_affine.T
    voxels = np.abs((world @ np.linalg.inv(image_affine).T)[:, :-1] - corners).max()
    mm = np.linalg.norm(world[:, :-1] - (grid @ image_affine.T)[:, :-1], axis=1).max()
    return float(voxels), float(mm)


def _differences(image_affine: np.ndarray, label_affine: np.ndarray) -> str:
    """What differs between two affines, in words: the spacings, the origins, the directions of the axes."""
    sa, sb = np.linalg.norm(image_affine[:-1, :-1], axis=0), np.linalg.norm(label_affine[:-1, :-1], axis=0)
    shift = float(np.abs(image_affine[:-1, -1] - label_affine[:-1, -1]).max())
    cosines = np.sum(image_affine[:-1, :-1] / sa * (label_affine[:-1, :-1] / sb), axis=0)
    angle = float(np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0))).max())
    parts = []
    if not np.allclose(sa, sb, rtol=1e-5, atol=0.0):
        parts.append(f"label spacing {np.round(sb, 4).tolist()} differs from image spacing {np.round(sa, 4).tolist()}")
    if shift > 1e-5:
        parts.append(f"label origin differs from the image's by up to {shift:.4g} mm")
    if angle > 1e-3:
        parts.append(f"label axes turned by up to {angle:.3g} degrees from the image's")
    return "; ".join(parts) or "the label's affine differs from the image's"


def _geometry(img: _Volume, lab: _Volume, img_path: str, lab_path: str, what: str) -> Problem | None:
    """
    The shapes must be equal; the label's voxels must lie within :py:data:`GEOMETRY_MAX_VOXELS` image voxels of the
    image voxels of the same index (a WARNING above :py:data:`GEOMETRY_WARN_VOXELS`).
    """
    if img.shape != lab.shape:
        return Problem(lab_path, f"{what}: label shape {lab.shape} differs from image shape {img.shape} ({img_path})")
    voxels, mm = _displacement(img.affine, lab.affine, img.shape)
    if voxels <= GEOMETRY_WARN_VOXELS:
        return None
    found = (
        f"{_differences(img.affine, lab.affine)}: a label voxel lies up to {voxels:.3g} image voxels ({mm:.3g} mm) "
        "from the image voxel of the same index"
    )
    if voxels <= GEOMETRY_MAX_VOXELS:
        logger.warning(
            f"{lab_path}: {what}: label and image ({img_path}) are slightly misaligned: {found}; accepted (at most "
            f"{GEOMETRY_MAX_VOXELS:g} voxel: every label voxel still lies on its own image voxel)"
        )
        return None
    return Problem(
        lab_path,
        f"{what}: label and image ({img_path}) are not aligned: {found}, more than the tolerance of "
        f"{GEOMETRY_MAX_VOXELS:g} voxel",
    )


def check_datalist(
    datalist: Any,
    format: str | VolumeFormat,
    data_dir: str | os.PathLike | None = None,
    *,
    require_unlabeled: bool = False,
    allow_outside: bool = False,
    progress: bool = True,
    spacing: Sequence[float] | None = None,
) -> list[Problem]:
    """
    Check a datalist and every file it names before any work starts. Every problem names the file or case.

    Checked: the structure (an object with the lists ``labeled``, ``unlabeled``, ``test``; items with ``image``;
    ``label`` in labeled/test/validation items, ``gt`` not ``label`` in unlabeled ones); at least one labeled case
    and (with ``require_unlabeled``) one unlabeled case; case ids (and images) listed twice, within a split or
    across splits; the same image file in two splits under other names (a link, or a copy with identical bytes);
    paths outside ``data_dir``; missing files; unreadable or corrupt files (truncated NIfTI, a ``.gz``
    file whose CRC or length does not match, HDF5 without ``image``/``label``, missing ``.raw``, a MetaImage header
    with a missing or inconsistent ``NDims``, ``DimSize`` or ``ElementType``, a data file not exactly the size the
    header implies, a compressed one whose zlib checksum fails); 2D files, or extra channels where a 3D
    single-channel volume is expected (MSD prostate images have 2, or 1: channel 0, T2, alone); images smaller than
    :py:data:`MIN_SPATIAL_SIZE`; constant images (zero intensity range, e.g. a labeled case whose image is blank
    while its label has foreground); NaN/inf intensities; no-data values (magnitude at least
    :py:data:`NO_DATA_MAGNITUDE`, whose min-max range overflows); labels with no background voxel; label values
    other than the format's; empty labels in the labeled set; a header geometry that cannot place the volume (NaN or
    inf, an axis without spacing, a singular orientation; for NIfTI the header as written, also where MONAI's reader
    would read another geometry than its sform) in any file; a NIfTI header without spacing (``pixdim`` 0, no sform),
    unless ``spacing`` gives it; image/label shape mismatches; image/label spacing, origin or orientation mismatches
    that move a label voxel more than :py:data:`GEOMETRY_MAX_VOXELS` image voxels from the image voxel of the same
    index (the message gives the displacement in voxels and mm, and what differs).
    A voxel spacing more anisotropic than :py:data:`MAX_ANISOTROPY`, and an image/label displacement above
    :py:data:`GEOMETRY_WARN_VOXELS` (up to :py:data:`GEOMETRY_MAX_VOXELS`), are logged as warnings. A datalist in
    MONAI's decathlon form is checked as :py:func:`from_decathlon` reads it.

    Each file is read once (a file used by several items is checked once per role).

    :py:func:`check_datalist` and :py:func:`validate_datalist` take the same arguments in the same order with the
    same defaults.

    Args:
        datalist: the datalist, with paths relative to ``data_dir`` or absolute (as from :py:func:`load_datalist`).
        format: a key of :py:data:`~monai_mlbseg.data.formats.FORMATS` or a ``VolumeFormat``.
        data_dir: the data folder; ``None``: no data folder, relative paths refer to the working folder and files
            may lie anywhere (a datalist already resolved by :py:func:`load_datalist` or
            :py:func:`training_datalist`).
        require_unlabeled: an empty ``unlabeled`` list is a problem (semi-supervised training needs one; a
            supervised run does not).
        allow_outside: accept files outside ``data_dir``.
        progress: show a progress bar while reading the files.
        spacing: the voxel spacing (mm, one per spatial axis) of the files that store none: HDF5 files and NIfTI
            files whose header gives none, which are read with it (as
            :py:func:`~monai_mlbseg.data.formats.load_volume_transforms` reads them given the same ``spacing``);
            ``None``: such a NIfTI file is a problem. A spacing for a format whose files always store one (NRRD,
            MetaImage) is a problem.

    Returns:
        the problems found (empty when the datalist is usable).

    Example::

        problems = check_datalist(build_datalist("/data/LA", "uamt_h5", labeled="a,b"), "uamt_h5", "/data/LA")
        if problems:
            raise InputError(problems, "datalist check failed")
    """
    try:
        spec = get_format(format)
    except ValueError as e:
        return [Problem("format", str(e))]
    if is_decathlon(datalist):
        try:
            datalist = from_decathlon(datalist)
        except InputError as e:
            return e.problems
    problems = _structure(datalist, spec, require_unlabeled)
    if not isinstance(datalist, dict):
        return problems
    entries = [
        (split, i, it)
        for split in SPLITS
        if isinstance(datalist.get(split), list)
        for i, it in enumerate(datalist[split])
        if isinstance(it, dict) and isinstance(it.get("image"), str) and it["image"]
    ]
    root = os.getcwd() if data_dir is None else os.fspath(data_dir)
    return problems + _check_files(entries, root, spec, allow_outside or data_dir is None, progress, spacing)


def _check_files(
    entries: list[tuple[str, int, dict]],
    data_dir: str,
    spec: VolumeFormat,
    allow_outside: bool,
    progress: bool,
    spacing: Sequence[float] | None,
) -> list[Problem]:
    """The file checks of :py:func:`check_datalist` for ``(split, index, item)`` entries."""
    problems: list[Problem] = []
    root = os.path.abspath(data_dir)
    # resolve paths, refuse those outside the data folder, find missing files
    paths: dict[tuple[str, int, str], str] = {}
    for split, i, it in entries:
        for key in PATH_KEYS:
            value = it.get(key)
            if not isinstance(value, str) or not value:
                continue
            path = resolve_path(value, root)
            what = f"{item_location(split, i, it)} {key}"
            if not allow_outside and not is_inside(path, root):
                problems.append(Problem(path, f"{what}: outside the data folder {root}"))
            elif not os.path.isfile(path):
                problems.append(Problem(path, f"{what}: file not found"))
            else:
                paths[(split, i, key)] = path
    problems.extend(_duplicates(entries, paths))
    problems.extend(_same_file_in_two_splits(entries, paths))
    try:
        check = _VolumeChecker(spec, spacing)
    except ValueError as e:
        return [*problems, Problem("spacing", str(e))]
    volumes: dict[tuple[str, str], _Volume | None] = {}
    n_files = len({(p, k == "image") for (_, _, k), p in paths.items()})
    with tqdm(total=n_files, desc="checking files", unit="file", disable=not progress) as bar:
        for split, i, it in entries:
            loaded = {}
            for key in PATH_KEYS:
                path = paths.get((split, i, key))
                if path is None:
                    continue
                role = "image" if key == "image" else "label"
                if (path, role) not in volumes:
                    volumes[(path, role)] = check(path, role, f"{item_location(split, i, it)} {key}", problems)
                    bar.update()
                loaded[key] = volumes[(path, role)]
            img = loaded.get("image")
            for key in ("label", "gt"):
                lab = loaded.get(key)
                if lab is None:
                    continue
                what = f"{item_location(split, i, it)} {key}"
                if split == "labeled" and not lab.has_foreground:
                    problems.append(Problem(paths[(split, i, key)], f"{what}: empty label (no foreground voxel)"))
                if img is not None:
                    p = _geometry(img, lab, paths[(split, i, "image")], paths[(split, i, key)], what)
                    if p is not None:
                        problems.append(p)
    return problems
