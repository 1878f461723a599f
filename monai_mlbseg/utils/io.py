"""Atomic file output: write to a temporary file in the target folder, then rename over the target.

A reader never sees a half-written file: after a crash the target is either absent, its previous version, or
complete. Temporary files keep the target's name as suffix (so format detection by extension still works) and are
removed when the writer fails.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import hashlib
import inspect
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, Problem

__all__ = [
    "atomic_path",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "DIGEST_SUFFIX",
    "digest_path",
    "digest_problem",
    "file_digest",
    "recorded_source",
    "write_digest",
    "writing",
    "run_fingerprint",
    "describe_settings",
    "read_user_text",
    "TEMP_MARKER",
]

#: part of every temporary file name, so leftovers of a killed process can be recognised (and ignored).
TEMP_MARKER = ".partial-"


def _utf16_without_bom(data: bytes) -> str | None:
    """``"utf-16-le"`` / ``"utf-16-be"`` when every other byte of ``data`` is NUL (ASCII text saved as UTF-16)."""
    if len(data) < 2 or len(data) % 2:
        return None
    if not any(data[1::2]) and all(data[0::2]):
        return "utf-16-le"
    if not any(data[0::2]) and all(data[1::2]):
        return "utf-16-be"
    return None


def read_user_text(path: str | os.PathLike, what: str = "text file") -> str:
    """
    The text of a file a user wrote (a case list, a datalist), whatever editor saved it: UTF-8 with or without a
    byte-order mark (Windows Notepad writes one), UTF-16 with a byte-order mark (PowerShell's ``>``) or, for ASCII
    content, without one.

    Args:
        path: the file.
        what: what the file is, for the error message.

    Returns:
        the decoded text, without the byte-order mark.

    Raises:
        InputError: when the file cannot be read, or is not UTF-8 or UTF-16 text (the message names the file, the
            offset of the first byte that does not decode, and how to fix it).

    Example::

        ids = read_user_text("train.list", "case list").splitlines()
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError([Problem(str(path), f"cannot read the {what} ({e.strerror or e})")], what) from e
    for bom, encoding in (
        (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"),
        (codecs.BOM_UTF16_BE, "utf-16-be"),
    ):
        if data.startswith(bom):
            data, forced = data[len(bom) :], encoding
            break
    else:
        forced = _utf16_without_bom(data)
    try:
        return data.decode(forced or "utf-8")
    except UnicodeDecodeError as e:
        found = f"byte 0x{data[e.start]:02x} at offset {e.start}" if e.start < len(data) else "a truncated character"
        message = (
            f"the {what} is not {forced or 'UTF-8'} text ({found} does not decode); save it as UTF-8 (or UTF-16 with "
            "a byte-order mark)"
        )
        raise InputError([Problem(str(path), message)], what) from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """
    Context manager yielding a temporary path next to ``path``; on success it is renamed to ``path``.

    Args:
        path: the final file.

    Example::

        with atomic_path("out/mask.nii.gz") as tmp:
            nibabel.save(img, tmp)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{uuid.uuid4().hex[:12]}{TEMP_MARKER}{target.name}"
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8). Returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically. Returns the path."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


#: the suffix of the file that records a written file's content digest, next to it
DIGEST_SUFFIX = ".sha256"


def digest_path(path: str | os.PathLike) -> Path:
    """The digest record of ``path``: ``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_digest(path: str | os.PathLike, digest: str | None = None, source: str | None = None) -> Path:
    """
    Record ``path``'s content digest (``digest``, or computed) in :py:func:`digest_path`, atomically, with the
    digest of the file it was made from (``source``, e.g. the image of an initial label) when given.
    """
    digest = file_digest(path) if digest is None else digest
    text = f"{digest}  {Path(path).name}\n" + (f"source {source}\n" if source else "")
    return atomic_write_text(digest_path(path), text)


def recorded_source(path: str | os.PathLike) -> str | None:
    """The digest of the file ``path`` was made from, as :py:func:`write_digest` recorded it; ``None`` if none."""
    try:
        lines = digest_path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    sources = [line.split()[1] for line in lines[1:] if line.startswith("source ") and len(line.split()) == 2]
    return sources[0] if sources else None


def digest_problem(path: str | os.PathLike) -> str | None:
    """
    What is wrong with ``path`` against its recorded digest: ``None`` when it matches or when no digest was recorded
    (a file of an earlier version, or one whose writer was killed between the rename and the record: complete, since
    it was renamed into place whole), else a sentence for an error message.
    """
    record = digest_path(path)
    try:
        recorded = record.read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        return None if not record.exists() else f"its digest record {record.name} is unreadable"
    try:
        actual = file_digest(path)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if actual != recorded:
        return (
            f"its content does not match the digest recorded when it was written ({record.name}): the file was "
            "damaged or changed since"
        )
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """
    Within the block, an error writing ``path`` names it: an ``OSError`` without a file name gets ``path``, and
    ``torch.save``'s stream error (``RuntimeError: ... PytorchStreamWriter failed writing file ... iostream error``,
    which carries no errno) becomes ``OSError(ENOSPC)`` when the device holding ``path`` has less than 1 MiB free.

    Example::

        with writing("models/model.pt"):
            torch.save(state, tmp)
    """
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    except RuntimeError as e:
        text = str(e)
        if "PytorchStreamWriter" in text or "iostream error" in text:
            try:
                full = shutil.disk_usage(Path(path).parent).free < (1 << 20)
            except OSError:
                full = False
            if full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """
    ``torch.save`` to ``path`` atomically, with its content digest recorded next to it (:py:func:`write_digest`):
    the previous record is removed before the rename and the new one written after it, so a kill at any instant
    leaves the previous file with its record, or a complete file without one, never a file with a wrong record.
    Returns the path.
    """
    with writing(path), atomic_path(path) as tmp:
        torch.save(obj, tmp)
        digest = file_digest(tmp)
        digest_path(path).unlink(missing_ok=True)
    write_digest(path, digest)
    return Path(path)


def run_fingerprint(*parts: Any, length: int = 10) -> str:
    """
    A short, stable hash of JSON-serialisable ``parts`` (data lists, settings), used to key a run's work folder:
    rerunning with the same inputs finds (and resumes) the same folder, different inputs get a new one.

    Example::

        work = Path("work") / run_fingerprint(labeled_items, unlabeled_items, {"features": [64, 128]})
    """
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def describe_settings(value: Any) -> Any:
    """
    A JSON-compatible description of a setting: numbers, strings, ``None`` and booleans as they are, sequences as
    lists, mappings key by key, and any other object as its class name with the attributes named like its
    constructor's arguments (for instance a :py:class:`~monai_mlbseg.transforms.StrongIntensityAugment` and its
    strengths, not its random state), so that two runs can be compared setting by setting.

    Args:
        value: the setting.

    Returns:
        its description.

    Example::

        describe_settings({"mt_confidence": 0.95, "student_augment": StrongIntensityAugment()})
        # {"mt_confidence": 0.95, "student_augment": {"_target_": "...StrongIntensityAugment", "contrast": 0.25, ...}}
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): describe_settings(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe_settings(v) for v in value]
    kind = type(value)
    arguments = inspect.signature(kind.__init__).parameters
    built_with = {k: getattr(value, k) for k in arguments if k != "self" and hasattr(value, k)}
    return {"_target_": f"{kind.__module__}.{kind.__qualname__}", **describe_settings(built_with)}
