"""Labeled / unlabeled / test splits of a folder of scans, or of generated volumes, as datalists."""

from __future__ import annotations

from pathlib import Path

from monai_mlbseg.utils import InputError, Problem

from .datalist import build_datalist, read_case_list
from .formats import get_format
from .synthetic import make_synthetic_dataset

__all__ = ["folder_split", "synthetic_split"]


def folder_split(data_dir: Path, format: str, num_labeled: int, num_unlabeled: int, num_test: int) -> dict:
    """
    A labeled / unlabeled / test split of a folder of scans: UA-MT style when it holds ``train.list`` (its first
    ``num_labeled`` cases labeled, the next ``num_unlabeled`` unlabeled; test = the first ``num_test`` of
    ``test.list``, else the last ``num_test`` of ``train.list``), otherwise the discovered cases in order (labeled,
    unlabeled, then test).

    Args:
        data_dir: the folder (read only).
        format: its layout, a key of :py:data:`~monai_mlbseg.data.FORMATS`.
        num_labeled: labeled cases.
        num_unlabeled: unlabeled cases (at most).
        num_test: test cases (at most).

    Returns:
        the datalist (:py:func:`~monai_mlbseg.data.build_datalist`).

    Raises:
        InputError: naming the folder, when it has too few cases.

    Example::

        datalist = folder_split(Path("/data/LA"), "uamt_h5", num_labeled=4, num_unlabeled=16, num_test=16)
    """
    ids = read_case_list(data_dir / "train.list") if (data_dir / "train.list").is_file() else None
    if ids is not None and (data_dir / "test.list").is_file():
        test = read_case_list(data_dir / "test.list")[:num_test]
    else:
        ids = ids if ids is not None else list(get_format(format).discover(data_dir))
        ids, test = ids[: len(ids) - num_test], ids[len(ids) - num_test :]
    if len(ids) < num_labeled + 1 or not test:
        raise InputError(
            [
                Problem(
                    str(data_dir),
                    f"{len(ids) + len(test)} cases: too few for {num_labeled} labeled, unlabeled and test",
                )
            ],
            "demo data",
        )
    return build_datalist(
        data_dir,
        format,
        labeled=ids[:num_labeled],
        unlabeled=ids[num_labeled : num_labeled + num_unlabeled],
        test=test,
    )


def synthetic_split(
    data_dir: Path, anatomy: str, counts: tuple[int, int, int], volume_shape: tuple[int, ...], seed: int
) -> dict:
    """
    ``sum(counts)`` generated volumes in the UA-MT layout written to ``data_dir`` and their split, in that order,
    into ``counts`` = (labeled, unlabeled, test).

    Args:
        data_dir: the folder written.
        anatomy: a key of :py:data:`~monai_mlbseg.data.ANATOMIES`.
        counts: labeled, unlabeled and test volumes.
        volume_shape: the volumes' shape.
        seed: the generator's seed.

    Returns:
        the datalist (:py:func:`~monai_mlbseg.data.build_datalist`).

    Example::

        datalist = synthetic_split(Path("demo/data"), "la_demo", (4, 16, 16), (80, 72, 32), seed=0)
    """
    num_labeled, num_unlabeled, _ = counts
    ids = make_synthetic_dataset(
        data_dir, "uamt_h5", num_cases=sum(counts), shape=volume_shape, seed=seed, kind=anatomy
    )
    return build_datalist(
        data_dir,
        "uamt_h5",
        labeled=ids[:num_labeled],
        unlabeled=ids[num_labeled : num_labeled + num_unlabeled],
        test=ids[num_labeled + num_unlabeled :],
    )
