"""
``python -m monai_mlbseg prepare``: build a datalist of a data folder, check every file, write it; and
``python -m monai_mlbseg check``: check an existing datalist and every file it names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..utils.errors import InputError, Problem
from ..utils.io import atomic_write_text
from .datalist import SPLITS, build_datalist, check_datalist, load_datalist
from .formats import FORMATS

__all__ = ["prepare", "check"]


_USE_OUTPUT = "write the datalist elsewhere with --output FILE"


def _unwritable(out: Path) -> Problem | None:
    """Why ``out`` cannot be written (its folder, or the nearest existing folder above it), if it cannot."""
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return Problem(str(folder), f"is not a folder, cannot write {out.name}; {_USE_OUTPUT}")
    if not os.access(folder, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        return Problem(str(folder), f"is not writable, cannot write {out.name}; {_USE_OUTPUT}")
    return None


def _counts(datalist: dict) -> str:
    counts = ", ".join(f"{len(datalist.get(s, []))} {s}" for s in SPLITS if datalist.get(s) or s != "validation")
    with_gt = sum("gt" in it for it in datalist.get("unlabeled", []) if isinstance(it, dict))
    return counts + (f" ({with_gt} of the unlabeled with ground truth for monitoring)" if with_gt else "")


def _spacing_note(spacing: Sequence[float] | None) -> str:
    """The reminder that a spacing given to ``prepare`` or ``check`` is not recorded in the datalist."""
    if spacing is None:
        return ""
    return f'; files that store no spacing read as {list(spacing)} mm: give the bundles the same "spacing"'


def prepare(
    data_dir: str,
    format: str = "uamt_h5",
    output: str | None = None,
    labeled: Sequence[str] | str | None = None,
    unlabeled: Sequence[str] | str | None = None,
    test: Sequence[str] | str | None = None,
    validation: Sequence[str] | str | None = None,
    train_list: str | None = None,
    test_list: str | None = None,
    num_labeled: int | None = None,
    allow_outside: bool = False,
    allow_no_unlabeled: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    spacing: Sequence[float] | None = None,
) -> str:
    """
    Build the datalist of ``data_dir`` (see :py:func:`~monai_mlbseg.data.datalist.build_datalist`), check it and
    every file it names (see :py:func:`~monai_mlbseg.data.datalist.check_datalist`), and write it as JSON.

    Nothing is written when anything is wrong: all problems are reported at once. An existing output with the
    same content is left as is; a different one is only replaced with ``overwrite``.

    Args:
        data_dir: the data folder.
        format: the on-disk layout (``uamt_h5``, ``la_raw``, ``msd_heart``, ``promise12``, ``msd_prostate``).
        output: the datalist file; default ``<data_dir>/datalist.json``.
        labeled: labeled (clean) case ids: a list or a comma-separated string.
        unlabeled: unlabeled case ids; default: the rest of ``train_list``, else every case in no other split.
        test: test case ids.
        validation: validation case ids.
        train_list: UA-MT ``train.list``; its first ``num_labeled`` cases are labeled, the rest unlabeled.
        test_list: UA-MT ``test.list``.
        num_labeled: number of labeled cases taken from ``train_list`` (or from ``labeled``).
        allow_outside: accept files outside ``data_dir``.
        allow_no_unlabeled: accept an empty unlabeled set (supervised training only).
        overwrite: replace an existing, different output file.
        progress: show progress while checking the files.
        spacing: the voxel spacing (mm) of the files that store none (``--spacing SX,SY,SZ``): HDF5 files, and NIfTI
            files whose header gives none, which are refused without it. The bundles need the same spacing (their
            config id ``spacing``); the datalist does not record it.

    Returns:
        the path of the datalist file.

    Raises:
        InputError: listing every problem found (each names the file or case); nothing has been written.

    Example::

        python -m monai_mlbseg prepare /data/LA --format uamt_h5 --train_list train.list --test_list test.list \\
            --num_labeled 8
        python -m monai_mlbseg prepare /data/PROMISE12 --format promise12 --labeled Case29,Case14,Case05 \\
            --test Case16,Case35,Case34
        python -m monai_mlbseg prepare /data/Task02_Heart --format msd_heart --labeled la_003,la_004 \\
            --test la_005 --spacing 1.25,1.25,1.37
    """
    data_path = Path(os.path.expanduser(str(data_dir)))
    out = data_path / "datalist.json" if output is None else Path(os.path.expanduser(str(output)))
    try:
        datalist = build_datalist(
            data_path,
            format,
            labeled=labeled,
            unlabeled=unlabeled,
            test=test,
            validation=validation,
            train_list=train_list,
            test_list=test_list,
            num_labeled=num_labeled,
        )
    except InputError as e:
        raise InputError(e.problems, f"prepare: cannot build the datalist of {data_path}") from None
    text = json.dumps(datalist, indent=2) + "\n"
    existing = None
    if out.exists():
        try:
            existing = out.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            existing = ""
    problems = []
    if existing is not None and existing != text and not overwrite:
        problems.append(Problem(str(out), "exists with a different datalist; pass overwrite=True to replace it"))
    unwritable = _unwritable(out) if existing != text else None
    if unwritable is not None:
        problems.append(unwritable)
    problems += check_datalist(
        datalist,
        format,
        data_path,
        allow_outside=allow_outside,
        require_unlabeled=not allow_no_unlabeled,
        progress=progress,
        spacing=spacing,
    )
    if problems:
        raise InputError(problems, f"prepare: {data_path} failed the datalist check, nothing written")
    if existing != text:
        try:
            atomic_write_text(out, text)
        except OSError as e:
            problem = Problem(str(out.parent), f"cannot write {out.name} ({e.strerror or e}); {_USE_OUTPUT}")
            raise InputError([problem], "prepare: nothing written") from None
    print(f"prepare: wrote {out} [{datalist['format']}]: {_counts(datalist)}{_spacing_note(spacing)}")
    return str(out)


def check(
    datalist: str,
    data_dir: str | None = None,
    format: str | None = None,
    allow_outside: bool = False,
    allow_no_unlabeled: bool = False,
    progress: bool = True,
    spacing: Sequence[float] | None = None,
) -> str:
    """
    Check an existing datalist JSON and every file it names, with the checks of ``prepare``
    (:py:func:`~monai_mlbseg.data.datalist.check_datalist`), without writing anything. Both this package's form
    and MONAI's decathlon form (``{"training": [{"image", "label"}], "validation": [...], "test": [...]}``, see
    :py:func:`~monai_mlbseg.data.datalist.from_decathlon`) are read.

    Args:
        datalist: the datalist file.
        data_dir: the folder its relative paths refer to; default: the datalist's folder.
        format: the on-disk layout; default: the ``format`` the datalist records (decathlon-form files record none).
        allow_outside: accept files outside ``data_dir``.
        allow_no_unlabeled: accept an empty unlabeled set (supervised training only).
        progress: show progress while checking the files.
        spacing: the voxel spacing (mm) of the files that store none (``--spacing SX,SY,SZ``), as for ``prepare``.

    Returns:
        the path of the datalist file.

    Raises:
        InputError: listing every problem found (each names the file or case).

    Example::

        python -m monai_mlbseg check /data/Task02_Heart/datalist.json --format msd_heart
    """
    path = Path(os.path.expanduser(str(datalist)))
    root = path.parent if data_dir is None else Path(os.path.expanduser(str(data_dir)))
    try:
        loaded = load_datalist(path, root, allow_outside)
    except InputError as e:
        raise InputError(e.problems, f"check: cannot read the datalist {path}") from None
    fmt = format or loaded.get("format")
    if fmt is None:
        problem = Problem(str(path), f"records no format: give --format (one of {', '.join(FORMATS)})")
        raise InputError([problem], f"check: {path}")
    problems = check_datalist(
        loaded,
        fmt,
        root,
        allow_outside=allow_outside,
        require_unlabeled=not allow_no_unlabeled,
        progress=progress,
        spacing=spacing,
    )
    if problems:
        raise InputError(problems, f"check: {path} failed the datalist check")
    print(f"check: {path} is usable [{fmt}]: {_counts(loaded)}{_spacing_note(spacing)}")
    return str(path)
