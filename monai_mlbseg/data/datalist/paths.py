"""
Resolving a datalist's paths: reading a datalist JSON, resolving its relative paths against the data folder, and
the datalist of a training run.
"""

from __future__ import annotations

import copy
import json
import os
import unicodedata
from pathlib import Path
from typing import Any

from ...utils.errors import InputError, Problem
from ...utils.io import read_user_text
from ..formats import VolumeFormat
from .build import PATH_KEYS, SPLITS, build_datalist, from_decathlon, is_decathlon, item_location

__all__ = ["load_datalist", "resolve_datalist", "training_datalist", "is_inside", "resolve_path"]


def is_inside(path: str, root: str) -> bool:
    """Whether the normalised absolute ``path`` lies in ``root``."""
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives
        return False


def resolve_path(value: str, root: str) -> str:
    """
    ``value`` (relative to ``root``, or absolute; ``~`` expanded) as a normalised absolute path, lexically. When that
    path does not exist but its Unicode NFC or NFD form does (a folder copied from macOS keeps its names decomposed,
    a list typed elsewhere has them composed), the existing form is returned.
    """
    path = os.path.normpath(os.path.join(root, os.path.expanduser(value)))
    if not os.path.exists(path):
        for form in ("NFC", "NFD"):
            variant = unicodedata.normalize(form, path)
            if variant != path and os.path.exists(variant):
                return variant
    return path


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
    if not path.is_file():
        raise InputError([Problem(str(path), "datalist file not found")], "load_datalist")
    try:
        raw = json.loads(read_user_text(path, "datalist"))
    except json.JSONDecodeError as e:
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
                    it[key] = resolve_path(it[key], root)
                    if not allow_outside and not is_inside(it[key], root):
                        problems.append(
                            Problem(it[key], f"{item_location(split, i, it)} {key}: outside the data folder {root}")
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
