"""
Building a datalist: the cases of a data folder chosen by ids or UA-MT list files, and MONAI's decathlon form read
into this package's form.
"""

from __future__ import annotations

import logging
import os
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ...utils.errors import InputError, Problem
from ...utils.io import read_user_text
from ..formats import FORMATS, VolumeFormat, get_format

logger = logging.getLogger("monai_mlbseg.data.datalist")

__all__ = [
    "SPLITS",
    "REQUIRED_SPLITS",
    "PATH_KEYS",
    "DECATHLON_KEYS",
    "read_case_list",
    "build_datalist",
    "is_decathlon",
    "from_decathlon",
    "item_location",
]

#: the splits of a datalist, in order.
SPLITS = ("labeled", "unlabeled", "test", "validation")
#: the splits every datalist must have (possibly empty, see :py:func:`check_datalist`).
REQUIRED_SPLITS = ("labeled", "unlabeled", "test")
#: item keys holding file paths.
PATH_KEYS = ("image", "label", "gt")
#: keys of a MONAI decathlon datalist (``monai.data.load_decathlon_datalist``) and the split each feeds; entries of
#: ``training`` without a ``label`` are unlabeled.
DECATHLON_KEYS = {"training": "labeled", "unlabeled": "unlabeled", "validation": "validation", "test": "test"}


def read_case_list(path: str | os.PathLike) -> list[str]:
    """
    Case ids of a UA-MT style list file (``train.list``, ``test.list``): one id per line; blank lines and lines
    starting with ``#`` are skipped, surrounding white space is removed. The file may be UTF-8 (with or without a
    byte-order mark) or UTF-16 (:py:func:`~monai_mlbseg.utils.read_user_text`); ids are returned in Unicode NFC, so
    that an id typed on one system matches a folder name written by another.

    An empty list is returned with a warning naming the file; a run that needs its cases (inference and evaluation
    on an empty test list) is refused by its own check.

    Raises:
        InputError: when the file cannot be read or decoded, or lists an id more than once (each repeat names the id
            and both line numbers).
    """
    text = read_user_text(path, "case list")
    ids: list[str] = []
    first_line: dict[str, int] = {}
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        case = unicodedata.normalize("NFC", line.strip())
        if not case or case.startswith("#"):
            continue
        if case in first_line:
            problems.append(Problem(str(path), f"case id {case!r} listed twice: lines {first_line[case]} and {number}"))
            continue
        first_line[case] = number
        ids.append(case)
    if problems:
        raise InputError(problems, "case list")
    if not ids:
        logger.warning(f"{path}: the case list names no case (an empty file, e.g. a failed redirect?)")
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
        out.extend(unicodedata.normalize("NFC", s.strip()) for s in str(v).split(",") if s.strip())
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
    # case ids compared in Unicode NFC: a folder copied from macOS has decomposed (NFD) names
    found = {unicodedata.normalize("NFC", case): paths for case, paths in spec.discover(root).items()}
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


def item_location(split: str, index: int, item: Any) -> str:
    """Where an item is, for messages: ``"labeled[3] (case case003)"``."""
    case = item.get("case_id") if isinstance(item, dict) else None
    return f"{split}[{index}]" + (f" (case {case})" if case is not None else "")
