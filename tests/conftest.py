"""Fixtures shared by the test folders (which mirror the package: ``tests/<subpackage>/test_<module or kind>.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.bundle_utils import TINY, copy_bundle, make_data
from tests.helpers import make_trainer as _make_trainer


@pytest.fixture
def make_trainer():
    """A factory of tiny stage-2 trainers on synthetic discs (:py:func:`tests.helpers.make_trainer`)."""
    return _make_trainer


@pytest.fixture
def la_run(tmp_path: Path) -> dict:
    """A private copy of the left-atrium bundle, a small UA-MT data set and the top-level ids of a tiny CPU run."""
    bundle = copy_bundle("mlbseg_la", tmp_path)
    data, split = make_data(tmp_path, "uamt_h5")
    ids = {"bundle_root": str(bundle), "dataset_dir": str(data), "split": split, **TINY}
    return {"bundle": bundle, "data": data, "split": split, "ids": ids}


@pytest.fixture
def restore_sys_path():
    """Undo the ``sys.path`` entries MONAI Label's bundle tasks add (the bundle folder, for its ``scripts``)."""
    before = list(sys.path)
    yield
    sys.path[:] = before
