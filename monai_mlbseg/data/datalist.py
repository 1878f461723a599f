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

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.transforms import LoadImage
from tqdm.auto import tqdm

from ..utils.errors import InputError, Problem
from .formats import FORMATS, VolumeFormat, get_format
from .readers import captured_stderr, metaimage_header_problem

__all__ = [
    "SPLITS",
    "REQUIRED_SPLITS",
    "PATH_KEYS",
    "read_case_list",
    "build_datalist",
    "load_datalist",
    "check_datalist",
    "validate_inputs",
    "is_decathlon",
    "from_decathlon",
    "MIN_SPATIAL_SIZE",
    "MAX_ANISOTROPY",
    "DECATHLON_KEYS",
]

logger = logging.getLogger(__name__)

#: the splits of a datalist, in order.
SPLITS = ("labeled", "unlabeled", "test", "validation")
#: the splits every datalist must have (possibly empty, see :py:func:`check_datalist`).
REQUIRED_SPLITS = ("labeled", "unlabeled", "test")
#: item keys holding file paths.
PATH_KEYS = ("image", "label", "gt")
#: splits whose items need a ``"label"``.
_LABELED_SPLITS = ("labeled", "test", "validation")
#: smallest accepted volume, in voxels per axis (in-plane, in-plane, slices): anything smaller is not a scan.
MIN_SPATIAL_SIZE = (16, 16, 4)
#: a ratio of largest to smallest voxel spacing above this gets a warning (typical MRI: 1 to 10).
MAX_ANISOTROPY = 20.0
#: keys of a MONAI decathlon datalist (``monai.data.load_decathlon_datalist``) and the split each feeds; entries of
#: ``training`` without a ``label`` are unlabeled.
DECATHLON_KEYS = {"training": "labeled", "unlabeled": "unlabeled", "validation": "validation", "test": "test"}


def read_case_list(path: str | os.PathLike) -> list[str]:
    """
    Case ids of a UA-MT style list file (``train.list``, ``test.list``): one id per line; blank lines and lines
    starting with ``#`` are skipped, surrounding white space is removed.

    Raises:
        InputError: when the file cannot be read, or lists an id more than once (each repeat names the id and both
            line numbers).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError([Problem(str(path), f"cannot read the case list ({e.strerror or e})")], "case list") from e
    ids: list[str] = []
    first_line: dict[str, int] = {}
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        case = line.strip()
        if not case or case.startswith("#"):
            continue
        if case in first_line:
            problems.append(Problem(str(path), f"case id {case!r} listed twice: lines {first_line[case]} and {number}"))
            continue
        first_line[case] = number
        ids.append(case)
    if problems:
        raise InputError(problems, "case list")
    return ids


def _resolve_list_file(path: str | os.PathLike, data_dir: Path) -> Path:
    """A list file as given if it exists (absolute, or relative to the working folder), else inside ``data_dir``."""
    p = Path(path)
    if p.is_absolute() or p.exists() or not (data_dir / p).exists():
        return p
    return data_dir / p


def _ids(value: Any, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, (str, int)):
        value = [value]
    if not isinstance(value, Iterable):
        raise InputError([Problem(name, f"expected case ids, got {value!r}")], "case selection")
    out: list[str] = []
    for v in value:
        out.extend(s.strip() for s in str(v).split(",") if s.strip())
    problems = [
        Problem(name, f"case id {c!r} given twice: positions {out.index(c) + 1} and {i + 1}")
        for i, c in enumerate(out)
        if out.index(c) != i
    ]
    if problems:
        raise InputError(problems, "case selection")
    return out


def _no_cases_message(root: Path, spec: VolumeFormat) -> str:
    """Why no case was found, with the formats whose layout the folder does match."""
    matching = [name for name, other in FORMATS.items() if name != spec.name and other.discover(root)]
    hint = f"; the folder matches the {' / '.join(matching)} layout: choose that format" if matching else ""
    return f"no case in the {spec.name} layout ({spec.description}){hint}"


def build_datalist(
    data_dir: str | os.PathLike,
    format: str | VolumeFormat,
    *,
    labeled: Sequence[str] | str | None = None,
    unlabeled: Sequence[str] | str | None = None,
    test: Sequence[str] | str | None = None,
    validation: Sequence[str] | str | None = None,
    train_list: str | os.PathLike | None = None,
    test_list: str | os.PathLike | None = None,
    num_labeled: int | None = None,
) -> dict:
    """
    Build a datalist of the cases in ``data_dir`` (no files are read; see :py:func:`check_datalist`).

    Cases are chosen either by explicit case ids, or UA-MT style: the first ``num_labeled`` ids of ``train_list``
    are labeled and the rest of it unlabeled, ``test_list`` holds the test cases. Explicit ids take precedence over
    the lists. Without either, ``unlabeled`` is every discovered case not in another split. Case ids may be
    sequences or comma-separated strings. A requested case that is not found on disk gets the format's canonical
    paths, so that the check reports the missing file.

    Args:
        data_dir: the data folder.
        format: a key of :py:data:`~monai_mlbseg.data.formats.FORMATS` or a ``VolumeFormat``.
        labeled: ids of the labeled (clean) cases.
        unlabeled: ids of the unlabeled cases.
        test: ids of the test cases.
        validation: ids of validation cases (labeled, never trained on).
        train_list: UA-MT ``train.list`` (absolute, relative to the working folder, or inside ``data_dir``).
        test_list: UA-MT ``test.list``.
        num_labeled: how many of the first ``train_list`` ids are labeled (or the first of ``labeled``).

    Returns:
        ``{"format", "labeled", "unlabeled", "test", "validation"}`` with paths relative to ``data_dir``;
        unlabeled items carry ``"gt"`` where the case has a label file.

    Raises:
        InputError: for an unknown format, a missing data folder or list file, or an inconsistent selection
            (e.g. ``test`` together with ``test_list``, ``num_labeled`` larger than the list).

    Example::

        dl = build_datalist("/data/LA", "uamt_h5", train_list="train.list", test_list="test.list", num_labeled=8)
        len(dl["labeled"]), len(dl["unlabeled"]), len(dl["test"])  # 8, 72, 20
    """
    try:
        spec = get_format(format)
    except ValueError as e:
        raise InputError([Problem("format", str(e))], "datalist") from e
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError([Problem(str(root), "data folder not found")], "datalist")
    found = spec.discover(root)
    if not found:
        raise InputError([Problem(str(root), _no_cases_message(root, spec))], "datalist")
    sel = {
        "labeled": _ids(labeled, "labeled"),
        "unlabeled": _ids(unlabeled, "unlabeled"),
        "test": _ids(test, "test"),
        "validation": _ids(validation, "validation"),
    }
    problems: list[Problem] = []
    if num_labeled is not None:
        try:
            num_labeled = int(num_labeled)
            if num_labeled < 0:
                raise ValueError
        except (TypeError, ValueError):
            raise InputError([Problem("num_labeled", f"must be a non-negative integer, got {num_labeled!r}")]) from None
    if test_list is not None:
        if sel["test"] is not None:
            problems.append(Problem("test", "give the test cases either as ids or as test_list, not both"))
        else:
            sel["test"] = read_case_list(_resolve_list_file(test_list, root))
    if train_list is not None and sel["labeled"] is None:
        list_path = _resolve_list_file(train_list, root)
        train_ids = read_case_list(list_path)
        if num_labeled is None:
            problems.append(Problem("num_labeled", "train_list needs num_labeled (its first N cases are labeled)"))
        elif num_labeled > len(train_ids):
            problems.append(
                Problem(str(list_path), f"num_labeled={num_labeled} but the list has only {len(train_ids)} cases")
            )
        sel["labeled"] = train_ids[: num_labeled or 0]
    elif num_labeled is not None:
        if sel["labeled"] is None:
            problems.append(Problem("num_labeled", "num_labeled needs train_list or labeled (the first N are used)"))
        elif num_labeled > len(sel["labeled"]):
            problems.append(Problem("num_labeled", f"num_labeled={num_labeled} but only {len(sel['labeled'])} given"))
        else:
            sel["labeled"] = sel["labeled"][:num_labeled]
    if train_list is not None and sel["unlabeled"] is None:
        chosen = set(sel["labeled"] or ())
        sel["unlabeled"] = [c for c in read_case_list(_resolve_list_file(train_list, root)) if c not in chosen]
    if problems:
        raise InputError(problems, "datalist: inconsistent case selection")
    if sel["unlabeled"] is None:
        taken = {c for k in ("labeled", "test", "validation") for c in sel[k] or ()}
        sel["unlabeled"] = [c for c in found if c not in taken]

    def item(case: str, split: str) -> dict:
        image, label = found.get(case, (spec.image_path(case, True), spec.label_path(case)))
        out = {"case_id": case, "image": image}
        if split == "unlabeled":
            if label is not None:
                out["gt"] = label
        else:
            out["label"] = label if label is not None else spec.label_path(case)
        return out

    datalist: dict = {"format": spec.name}
    for split in SPLITS:
        datalist[split] = [item(c, split) for c in sel[split] or ()]
    return datalist


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives
        return False


def _resolve(value: str, root: str) -> str:
    return os.path.normpath(os.path.join(root, os.path.expanduser(value)))


def _case_ids(images: list[str]) -> list[str]:
    """Case ids of image paths: the file name without its extensions, or the path without them where names repeat
    (``case000/mri_norm2.h5`` -> ``case000/mri_norm2``)."""

    def strip(p: str) -> str:
        for ext in (".nii.gz", ".nii", ".h5", ".hdf5", ".nrrd", ".mhd", ".mha"):
            if p.lower().endswith(ext):
                return p[: -len(ext)]
        return p

    paths = [os.path.normpath(p) for p in images]
    stems = [os.path.basename(strip(p)) for p in sorted(set(paths))]
    return [
        stem if stems.count(stem) == 1 else strip(p)
        for stem, p in zip((os.path.basename(strip(p)) for p in paths), paths)
    ]


def is_decathlon(datalist: Any) -> bool:
    """Whether ``datalist`` is in MONAI's decathlon form (a ``"training"`` list; see :py:func:`from_decathlon`)."""
    return isinstance(datalist, dict) and "training" in datalist


def from_decathlon(datalist: dict, source: str = "datalist") -> dict:
    """
    This package's datalist form of a datalist in MONAI's decathlon form (what ``monai.apps.DecathlonDataset``,
    ``monai.data.load_decathlon_datalist`` and MSD's ``dataset.json`` use).

    ``training`` entries with a ``label`` are labeled, those without one unlabeled; entries under ``unlabeled``
    are unlabeled (a ``label`` there is kept as ``gt``, for monitoring only); ``validation`` and ``test`` entries
    need a ``label`` (they are evaluated). An entry is ``{"image": path, "label": path}`` or just an image path;
    ``case_id`` defaults to the image's file name without extensions. Other keys (``name``, ``labels``,
    ``numTraining``, ...) are ignored.

    Args:
        datalist: the decathlon-form object.
        source: the file it came from, for the messages.

    Returns:
        ``{"labeled", "unlabeled", "test", "validation"}`` (plus ``format`` when given) with the paths as written.

    Raises:
        InputError: when it also holds this package's lists, a key is not a list, an entry has no image path, or a
            ``validation``/``test`` entry has no ``label``.

    Example::

        from_decathlon({"training": [{"image": "imagesTr/la_003.nii.gz", "label": "labelsTr/la_003.nii.gz"},
                                     {"image": "imagesTr/la_004.nii.gz"}],
                        "test": [{"image": "imagesTr/la_007.nii.gz", "label": "labelsTr/la_007.nii.gz"}]})
        # {"labeled": [{... "case_id": "la_003"}], "unlabeled": [{... "case_id": "la_004"}], "test": [...], ...}
    """
    mixed = [k for k in SPLITS if k in datalist and k not in DECATHLON_KEYS]
    if mixed:
        raise InputError(
            [Problem(source, f"mixes MONAI's decathlon form ('training') with the lists {', '.join(mixed)}")],
            "datalist",
        )
    problems: list[Problem] = []
    entries: list[tuple[str, int, dict]] = []
    for key in DECATHLON_KEYS:
        items = datalist.get(key, [])
        if not isinstance(items, list):
            problems.append(Problem(source, f"{key!r} must be a list of entries, got {type(items).__name__}"))
            continue
        for i, it in enumerate(items):
            it = {"image": it} if isinstance(it, str) else it
            if not isinstance(it, dict) or not isinstance(it.get("image"), str) or not it["image"]:
                problems.append(Problem(f"{source} {key}[{i}]", f"an entry needs an image path, got {it!r}"))
                continue
            if key in ("validation", "test") and "label" not in it:
                problems.append(
                    Problem(
                        f"{source} {key}[{i}] ({it['image']})",
                        f"{key} entries need a 'label' (they are evaluated); put unlabeled images under 'training' "
                        "without a label, or under 'unlabeled'",
                    )
                )
                continue
            entries.append((key, i, dict(it)))
    if problems:
        raise InputError(problems, "datalist in MONAI's decathlon form")
    out: dict = {"format": datalist["format"]} if "format" in datalist else {}
    out.update({split: [] for split in SPLITS})
    for (key, _, it), case in zip(entries, _case_ids([it["image"] for _, _, it in entries])):
        it.setdefault("case_id", case)
        split = DECATHLON_KEYS[key]
        if key == "training" and "label" not in it:
            split = "unlabeled"
        if split == "unlabeled" and "label" in it:
            it["gt"] = it.pop("label")
        out[split].append(it)
    return out


def load_datalist(
    path: str | os.PathLike, data_dir: str | os.PathLike | None = None, allow_outside: bool = False
) -> dict:
    """
    Read a datalist JSON and resolve its paths (``image``, ``label``, ``gt`` of every item) to absolute paths.
    Both this package's form (see the module) and MONAI's decathlon form (see :py:func:`from_decathlon`) are read.

    Paths are resolved lexically (``..`` is collapsed, symbolic links are not followed), so a data folder may hold
    links to files elsewhere.

    Args:
        path: the JSON file.
        data_dir: the folder relative paths refer to; ``None``: the folder of the JSON file.
        allow_outside: accept paths that resolve outside ``data_dir``.

    Returns:
        a copy of the datalist with absolute paths.

    Raises:
        InputError: when the file is missing, not valid JSON, holds neither form's lists, or a path lies outside
            ``data_dir`` (each problem names the file and case).

    Example::

        dl = load_datalist("/data/LA/datalist.json")  # data_dir: /data/LA
        dl["labeled"][0]["image"]  # "/data/LA/case000/mri_norm2.h5"
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise InputError([Problem(str(path), "datalist file not found")], "load_datalist") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError([Problem(str(path), f"not a readable JSON file ({e})")], "load_datalist") from e
    if not isinstance(raw, dict):
        raise InputError([Problem(str(path), f"must hold a JSON object, got {type(raw).__name__}")], "load_datalist")
    if is_decathlon(raw):
        raw = from_decathlon(raw, str(path))
    elif not any(k in raw for k in SPLITS):
        keys = ", ".join(map(repr, raw)) or "none"
        raise InputError(
            [Problem(str(path), f"holds none of the lists {', '.join(SPLITS)} (or 'training', MONAI's decathlon form); "
             f"its keys: {keys}")],
            "load_datalist",
        )  # fmt: skip
    return resolve_datalist(raw, path.parent if data_dir is None else data_dir, allow_outside, f"load_datalist: {path}")


def resolve_datalist(
    datalist: dict, data_dir: str | os.PathLike, allow_outside: bool = False, context: str = "datalist"
) -> dict:
    """
    A copy of ``datalist`` with every path (``image``, ``label``, ``gt``) resolved against ``data_dir``.

    Raises:
        InputError: when a path lies outside ``data_dir`` and ``allow_outside`` is false.
    """
    root = os.path.abspath(os.fspath(data_dir))
    out = copy.deepcopy(datalist)
    problems = []
    for split, items in out.items():
        if not isinstance(items, list):
            continue
        for i, it in enumerate(items):
            if not isinstance(it, dict):
                continue
            for key in PATH_KEYS:
                if isinstance(it.get(key), str):
                    it[key] = _resolve(it[key], root)
                    if not allow_outside and not _inside(it[key], root):
                        problems.append(
                            Problem(it[key], f"{_where(split, i, it)} {key}: outside the data folder {root}")
                        )
    if problems:
        raise InputError(problems, context)
    return out


def training_datalist(
    dataset_dir: str | os.PathLike,
    format: str | VolumeFormat,
    datalist_file: str | os.PathLike | None = None,
    allow_outside: bool = False,
    split: str | None = None,
    missing_ok: bool = False,
    **selection: Any,
) -> dict | list:
    """
    The datalist of a training run, with absolute paths: the JSON written by ``prepare`` when ``datalist_file`` is
    given, else :py:func:`build_datalist` of ``dataset_dir`` with ``selection`` (``train_list``, ``test_list``,
    ``num_labeled``, ``labeled``, ``test``, ...). This is what the bundles call, once per split.

    Args:
        dataset_dir: the data folder.
        format: its on-disk layout.
        datalist_file: a datalist JSON (relative paths resolve against ``dataset_dir``).
        allow_outside: accept paths outside ``dataset_dir``.
        split: return only this split's list (``"labeled"``, ``"unlabeled"``, ``"test"``, ``"validation"``).
        missing_ok: with ``split``, return an empty list when there is neither a ``datalist_file`` nor a
            ``dataset_dir`` (e.g. MONAI Label hands the labeled pairs over directly and no data folder exists).
        selection: case selection, see :py:func:`build_datalist`.

    Raises:
        InputError: the data folder or datalist file is missing or invalid, or the selection is inconsistent.
    """
    if datalist_file:
        datalist = load_datalist(datalist_file, dataset_dir, allow_outside)
    elif not os.path.isdir(dataset_dir):
        if missing_ok and split is not None:
            return []
        raise InputError([Problem(str(dataset_dir), "data folder not found")], "training data")
    else:
        datalist = resolve_datalist(build_datalist(dataset_dir, format, **selection), dataset_dir, allow_outside)
    if split is None:
        return datalist
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    return list(datalist.get(split, []))


def validate_datalist(
    datalist: dict,
    format: str | VolumeFormat,
    data_dir: str | os.PathLike = "/",
    require_unlabeled: bool = False,
    allow_outside: bool = True,
    progress: bool = True,
) -> dict:
    """
    :py:func:`check_datalist`, raising instead of returning: the bundles' check before any training starts.

    Returns:
        ``datalist`` unchanged.

    Raises:
        InputError: listing every problem (each names its file or case).
    """
    problems = check_datalist(datalist, data_dir, format, allow_outside, require_unlabeled, progress)
    if problems:
        raise InputError(problems, "the training data failed the checks (nothing was trained or written)")
    return datalist


def validate_inputs(
    items: Sequence[dict],
    format: str | VolumeFormat,
    keys: Sequence[str] = ("image",),
    progress: bool = False,
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
            problems.append(Problem(f"input {_where('test', i, it)}", f"needs {', '.join(map(repr, missing))}"))
        else:
            entries.append(("test", i, {k: it[k] for k in ("case_id", *keys) if k in it}))
    problems += _check_files(entries, os.getcwd(), get_format(format), True, progress)
    if problems:
        raise InputError(problems, "the input failed the checks (nothing was written)")
    return items


def _where(split: str, index: int, item: Any) -> str:
    case = item.get("case_id") if isinstance(item, dict) else None
    return f"{split}[{index}]" + (f" (case {case})" if case is not None else "")


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
            where = f"datalist {_where(split, i, it)}"
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
            places = [_where(split, i, it) for split, i, it in items]
            problems.append(Problem(image, f"image used by several cases: {', '.join(places)}"))
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


class _VolumeChecker:
    """Reads a file and checks it on its own; the summary feeds the image/label comparisons."""

    def __init__(self, spec: VolumeFormat) -> None:
        self.spec = spec
        self.loader = LoadImage(image_only=True, ensure_channel_first=True)
        self.readers = {role: spec.reader(role) for role in ("image", "label")}
        # label maps from other sources (initial labels, MONAI Label) are binary {0, 1}; the format's own values too
        self.label_values = sorted(set(spec.label_values) | {0, 1})

    def __call__(self, path: str, role: str, what: str, problems: list[Problem]) -> _Volume | None:
        """Load and check one file; ``None`` (problems appended) when it is unusable."""
        if path.lower().endswith((".mhd", ".mha")):
            reason = metaimage_header_problem(path)
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
        channels = self.spec.image_channels if role == "image" else 1
        if img.shape[0] != channels:
            expect = "a 3D single-channel volume" if channels == 1 else f"{channels} channels"
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
        data = img.as_tensor()
        has_foreground = True
        if role == "image":
            finite = torch.isfinite(data) if data.dtype.is_floating_point else torch.ones_like(data, dtype=torch.bool)
            bad = int((~finite).sum())
            if bad:
                problems.append(Problem(path, f"{what}: {bad} NaN/inf intensities"))
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
        return _Volume(spatial, np.asarray(img.affine, dtype=float), has_foreground)


def _geometry(img: _Volume, lab: _Volume, img_path: str, lab_path: str, what: str) -> Problem | None:
    if img.shape != lab.shape:
        return Problem(lab_path, f"{what}: label shape {lab.shape} differs from image shape {img.shape} ({img_path})")
    a, b = img.affine, lab.affine
    if a.shape != b.shape or np.allclose(a, b, rtol=1e-4, atol=1e-3):
        return None
    sa, sb = np.linalg.norm(a[:-1, :-1], axis=0), np.linalg.norm(b[:-1, :-1], axis=0)
    if not np.allclose(sa, sb, rtol=1e-4, atol=1e-4):
        msg = f"label spacing {np.round(sb, 4).tolist()} differs from image spacing {np.round(sa, 4).tolist()}"
    else:
        msg = "label affine (origin/orientation) differs from the image's"
    return Problem(lab_path, f"{what}: {msg} ({img_path})")


def check_datalist(
    datalist: Any,
    data_dir: str | os.PathLike,
    format: str | VolumeFormat,
    allow_outside: bool = False,
    require_unlabeled: bool = True,
    progress: bool = False,
) -> list[Problem]:
    """
    Check a datalist and every file it names before any work starts. Every problem names the file or case.

    Checked: the structure (an object with the lists ``labeled``, ``unlabeled``, ``test``; items with ``image``;
    ``label`` in labeled/test/validation items, ``gt`` not ``label`` in unlabeled ones); at least one labeled case
    and (with ``require_unlabeled``) one unlabeled case; case ids (and images) listed twice, within a split or
    across splits; paths outside ``data_dir``; missing files; unreadable or corrupt files (truncated NIfTI, HDF5
    without ``image``/``label``, missing ``.raw``, a MetaImage header with a missing or inconsistent ``NDims``,
    ``DimSize`` or ``ElementType``); 2D files, or extra channels where a 3D single-channel volume is expected (MSD
    prostate images have 2); images smaller than :py:data:`MIN_SPATIAL_SIZE`; constant images (zero intensity range,
    e.g. a labeled case whose image is blank while its label has foreground); NaN/inf intensities; label values
    other than the format's; empty labels in the labeled set; image/label shape, spacing or affine mismatches.
    A voxel spacing more anisotropic than :py:data:`MAX_ANISOTROPY` is logged as a warning. A datalist in MONAI's
    decathlon form is checked as :py:func:`from_decathlon` reads it.

    Each file is read once (a file used by several items is checked once per role).

    Args:
        datalist: the datalist, with paths relative to ``data_dir`` or absolute (as from :py:func:`load_datalist`).
        data_dir: the data folder.
        format: a key of :py:data:`~monai_mlbseg.data.formats.FORMATS` or a ``VolumeFormat``.
        allow_outside: accept files outside ``data_dir``.
        require_unlabeled: an empty ``unlabeled`` list is a problem.
        progress: show a progress bar while reading the files.

    Returns:
        the problems found (empty when the datalist is usable).

    Example::

        problems = check_datalist(build_datalist("/data/LA", "uamt_h5", labeled="a,b"), "/data/LA", "uamt_h5")
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
    return problems + _check_files(entries, os.fspath(data_dir), spec, allow_outside, progress)


def _check_files(
    entries: list[tuple[str, int, dict]],
    data_dir: str,
    spec: VolumeFormat,
    allow_outside: bool,
    progress: bool,
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
            path = _resolve(value, root)
            what = f"{_where(split, i, it)} {key}"
            if not allow_outside and not _inside(path, root):
                problems.append(Problem(path, f"{what}: outside the data folder {root}"))
            elif not os.path.isfile(path):
                problems.append(Problem(path, f"{what}: file not found"))
            else:
                paths[(split, i, key)] = path
    problems.extend(_duplicates(entries, paths))
    check = _VolumeChecker(spec)
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
                    volumes[(path, role)] = check(path, role, f"{_where(split, i, it)} {key}", problems)
                    bar.update()
                loaded[key] = volumes[(path, role)]
            img = loaded.get("image")
            for key in ("label", "gt"):
                lab = loaded.get(key)
                if lab is None:
                    continue
                what = f"{_where(split, i, it)} {key}"
                if split == "labeled" and not lab.has_foreground:
                    problems.append(Problem(paths[(split, i, key)], f"{what}: empty label (no foreground voxel)"))
                if img is not None:
                    p = _geometry(img, lab, paths[(split, i, "image")], paths[(split, i, key)], what)
                    if p is not None:
                        problems.append(p)
    return problems
