"""Datalists: building splits (UA-MT lists, explicit ids), loading with path resolution, structural checks."""

from __future__ import annotations

import json
import os

import pytest

from monai_mlbseg.data import (
    FORMATS,
    build_datalist,
    check_datalist,
    load_datalist,
    load_volume_transforms,
    make_synthetic_dataset,
    read_case_list,
    write_case,
)
from monai_mlbseg.utils import InputError

# ITK (SWIG) warns on import under Python 3.11+
pytestmark = pytest.mark.filterwarnings("ignore:builtin type [Ss]wig:DeprecationWarning")

SHAPE = (24, 24, 12)


@pytest.fixture(scope="module")
def la_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("LA")
    make_synthetic_dataset(root, "uamt_h5", num_cases=6, shape=SHAPE, seed=0)
    return root  # train.list: case000..case004, test.list: case005


def _ids(items):
    return [it["case_id"] for it in items]


def test_uamt_lists(la_dir):
    dl = build_datalist(la_dir, "uamt_h5", train_list="train.list", test_list="test.list", num_labeled=2)
    assert dl["format"] == "uamt_h5"
    assert _ids(dl["labeled"]) == ["case000", "case001"]
    assert _ids(dl["unlabeled"]) == ["case002", "case003", "case004"]
    assert _ids(dl["test"]) == ["case005"] and dl["validation"] == []
    assert dl["labeled"][0] == {"case_id": "case000", "image": "case000/mri_norm2.h5", "label": "case000/mri_norm2.h5"}
    assert dl["unlabeled"][0] == {"case_id": "case002", "image": "case002/mri_norm2.h5", "gt": "case002/mri_norm2.h5"}
    assert dl["test"][0]["label"] == "case005/mri_norm2.h5"
    assert check_datalist(dl, "uamt_h5", la_dir) == []
    # an absolute list path works too, and explicit unlabeled ids override the rest of the list
    dl = build_datalist(
        la_dir, "uamt_h5", train_list=str(la_dir / "train.list"), num_labeled=1, unlabeled=["case004"], test="case005"
    )
    assert _ids(dl["labeled"]) == ["case000"] and _ids(dl["unlabeled"]) == ["case004"]
    # explicit labeled ids with a train list: the rest of the list is unlabeled; num_labeled cuts the given ids
    dl = build_datalist(la_dir, "uamt_h5", train_list="train.list", labeled="case004,case002,case000", num_labeled=2)
    assert _ids(dl["labeled"]) == ["case004", "case002"]
    assert _ids(dl["unlabeled"]) == ["case000", "case001", "case003"]


def test_explicit_ids(la_dir):
    dl = build_datalist(la_dir, "uamt_h5", labeled="case003, case001", test=("case000",), validation=["case002"])
    assert _ids(dl["labeled"]) == ["case003", "case001"]  # order kept
    assert _ids(dl["test"]) == ["case000"] and _ids(dl["validation"]) == ["case002"]
    assert _ids(dl["unlabeled"]) == ["case004", "case005"]  # every other discovered case
    dl = build_datalist(la_dir, "uamt_h5", labeled=["case003", "case001", "case002"], num_labeled=2)
    assert _ids(dl["labeled"]) == ["case003", "case001"]


def test_case_list_file_format(tmp_path):
    (tmp_path / "t.list").write_text("# header\n  a1  \n\nb2\r\nc3")
    assert read_case_list(tmp_path / "t.list") == ["a1", "b2", "c3"]
    with pytest.raises(InputError, match="nope.list"):
        read_case_list(tmp_path / "nope.list")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"train_list": "train.list"}, "needs num_labeled"),
        ({"train_list": "train.list", "num_labeled": 9}, "train.list: num_labeled=9 but the list has only 5"),
        ({"test": "case005", "test_list": "test.list"}, "either as ids or as test_list"),
        ({"num_labeled": 2}, "needs train_list or labeled"),
        ({"labeled": "case000", "num_labeled": 3}, "only 1 given"),
        ({"train_list": "missing.list", "num_labeled": 1}, "missing.list"),
        ({"num_labeled": "many", "labeled": "case000"}, "non-negative integer"),
    ],
)
def test_build_errors(la_dir, kwargs, message):
    with pytest.raises(InputError, match=message):
        build_datalist(la_dir, "uamt_h5", **kwargs)


def test_build_errors_format_and_folder(tmp_path):
    with pytest.raises(InputError, match="unknown data format 'nifti'"):
        build_datalist(tmp_path, "nifti")
    with pytest.raises(InputError, match="nowhere: data folder not found"):
        build_datalist(tmp_path / "nowhere", "uamt_h5")


def test_build_names_the_layout_when_no_case_matches_and_suggests_the_right_format(la_dir, tmp_path):
    with pytest.raises(InputError, match=r"no case in the promise12 layout \(PROMISE12: .*uamt_h5 layout: choose"):
        build_datalist(la_dir, "promise12", labeled=["case000"])
    with pytest.raises(InputError) as err:
        build_datalist(tmp_path, "msd_heart")
    assert "no case in the msd_heart layout" in str(err.value) and "choose" not in str(err.value)


def test_unlabeled_without_ground_truth(tmp_path):
    import numpy as np

    from monai_mlbseg.data import synthetic_case

    for i in range(3):
        image, label = synthetic_case(np.random.default_rng(i), SHAPE)
        write_case(tmp_path, f"la_{i:03d}", image, label if i < 2 else None, "msd_heart")
    dl = build_datalist(tmp_path, "msd_heart", labeled="la_000")
    assert dl["unlabeled"] == [
        {"case_id": "la_001", "image": "imagesTr/la_001.nii.gz", "gt": "labelsTr/la_001.nii.gz"},
        {"case_id": "la_002", "image": "imagesTs/la_002.nii.gz"},
    ]
    assert check_datalist(dl, "msd_heart", tmp_path) == []


def test_load_datalist_resolves_paths(la_dir, tmp_path):
    dl = build_datalist(la_dir, "uamt_h5", train_list="train.list", test_list="test.list", num_labeled=2)
    path = tmp_path / "dl.json"
    path.write_text(json.dumps(dl))
    loaded = load_datalist(path, la_dir)
    assert loaded["labeled"][0]["image"] == os.path.join(str(la_dir), "case000", "mri_norm2.h5")
    assert loaded["unlabeled"][0]["gt"] == os.path.join(str(la_dir), "case002", "mri_norm2.h5")
    assert loaded["format"] == "uamt_h5" and dl["labeled"][0]["image"] == "case000/mri_norm2.h5"  # input untouched
    assert check_datalist(loaded, "uamt_h5", la_dir) == []  # absolute paths inside the folder are fine
    out = load_volume_transforms("uamt_h5", keys=("image", "label", "gt"))(loaded["unlabeled"][0])
    assert out["image"].shape == (1, *SHAPE) and out["gt"].shape == (1, *SHAPE)
    # default data folder: the folder of the JSON file
    (la_dir / "datalist_test.json").write_text(json.dumps(dl))
    try:
        assert load_datalist(la_dir / "datalist_test.json")["test"][0]["label"].startswith(str(la_dir))
    finally:
        (la_dir / "datalist_test.json").unlink()


def test_load_datalist_refuses_paths_outside(la_dir, tmp_path):
    dl = {
        "labeled": [{"case_id": "a", "image": "../elsewhere/a.h5", "label": "case000/mri_norm2.h5"}],
        "unlabeled": [{"case_id": "b", "image": "/etc/passwd"}],
        "test": [],
    }
    path = tmp_path / "dl.json"
    path.write_text(json.dumps(dl))
    with pytest.raises(InputError) as err:
        load_datalist(path, la_dir)
    where = [p.where for p in err.value.problems]
    assert os.path.normpath(os.path.join(str(la_dir), "..", "elsewhere", "a.h5")) in where and "/etc/passwd" in where
    assert "labeled[0] (case a) image: outside the data folder" in str(err.value)
    loaded = load_datalist(path, la_dir, allow_outside=True)
    assert loaded["unlabeled"][0]["image"] == "/etc/passwd"


def test_load_datalist_bad_files(tmp_path):
    with pytest.raises(InputError, match="missing.json: datalist file not found"):
        load_datalist(tmp_path / "missing.json", tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="bad.json: not a readable JSON"):
        load_datalist(tmp_path / "bad.json", tmp_path)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(InputError, match="list.json: must hold a JSON object"):
        load_datalist(tmp_path / "list.json", tmp_path)


# ---- structural problems of a datalist (check_datalist directly; prepare builds well-formed ones) ----


def _good(la_dir):
    return build_datalist(la_dir, "uamt_h5", train_list="train.list", test_list="test.list", num_labeled=2)


def _messages(problems):
    return [str(p) for p in problems]


def test_check_not_a_dict(la_dir):
    msgs = _messages(check_datalist([{"image": "x"}], "uamt_h5", la_dir))
    assert msgs == ["datalist: must be a JSON object with the lists labeled, unlabeled, test, got list"]


def test_check_missing_keys(la_dir):
    msgs = _messages(check_datalist({"labeled": _good(la_dir)["labeled"]}, "uamt_h5", la_dir))
    assert "datalist: missing the list 'unlabeled'" in msgs and "datalist: missing the list 'test'" in msgs


def test_check_empty_datalist(la_dir):
    empty = {"labeled": [], "unlabeled": [], "test": []}
    msgs = _messages(check_datalist(empty, "uamt_h5", la_dir, require_unlabeled=True))
    assert any("no labeled cases" in m for m in msgs) and any("no unlabeled cases" in m for m in msgs)
    no_unlabeled = {**_good(la_dir), "unlabeled": []}
    assert check_datalist(no_unlabeled, "uamt_h5", la_dir, require_unlabeled=False) == []
    assert check_datalist(no_unlabeled, "uamt_h5", la_dir) == []  # the default: a supervised run is legitimate


def test_check_and_validate_take_the_same_arguments(la_dir, tmp_path, monkeypatch):
    import inspect

    from monai_mlbseg.data import resolve_datalist, validate_datalist

    check_sig, validate_sig = inspect.signature(check_datalist), inspect.signature(validate_datalist)
    assert [(p.name, p.default, p.kind) for p in check_sig.parameters.values()] == [
        (p.name, p.default, p.kind) for p in validate_sig.parameters.values()
    ]
    assert list(check_sig.parameters)[:3] == ["datalist", "format", "data_dir"]
    absolute = resolve_datalist(_good(la_dir), la_dir)
    monkeypatch.chdir(tmp_path)  # without data_dir, absolute paths anywhere are accepted
    assert check_datalist(absolute, "uamt_h5") == [] and validate_datalist(absolute, "uamt_h5") is absolute
    assert check_datalist(absolute, "uamt_h5", tmp_path)  # given a data folder, they lie outside it
    with pytest.raises(InputError, match="failed the checks"):
        validate_datalist(absolute, "uamt_h5", tmp_path)


def test_check_refuses_a_spacing_the_files_cannot_take(la_dir, tmp_path):
    dl = _good(la_dir)
    assert check_datalist(dl, "uamt_h5", la_dir, spacing=(0.625, 0.625, 0.625)) == []
    assert _messages(check_datalist(dl, "uamt_h5", la_dir, spacing=(0.625, 0.625))) == [
        "spacing: spacing must be 3 positive numbers (mm), got (0.625, 0.625)."
    ]
    ids = make_synthetic_dataset(tmp_path, "promise12", num_cases=3, shape=SHAPE, seed=1)
    promise = build_datalist(tmp_path, "promise12", labeled=ids[:1], test=ids[2:])
    msgs = _messages(check_datalist(promise, "promise12", tmp_path, spacing=(1.0, 1.0, 1.0)))
    assert len(msgs) == 1 and msgs[0].startswith("spacing: format 'promise12' reads files that always store their")


def test_validate_inputs_refuses_a_test_image_without_spacing_unless_given(tmp_path):
    from monai_mlbseg.data import validate_inputs
    from tests.nifti_headers import write_without_spacing

    ids = make_synthetic_dataset(tmp_path, "msd_heart", num_cases=2, shape=SHAPE, seed=1)
    image = tmp_path / "imagesTr" / f"{ids[1]}.nii.gz"
    write_without_spacing(image)
    items = [{"image": str(tmp_path / "imagesTr" / f"{i}.nii.gz")} for i in ids]
    with pytest.raises(InputError) as err:
        validate_inputs(items, "msd_heart")
    assert [p.where for p in err.value.problems] == [str(image)]
    assert "the header gives no voxel spacing" in err.value.problems[0].what
    assert validate_inputs(items, "msd_heart", spacing=(1.25, 1.25, 1.37)) is items


def test_check_items_without_image_or_label(la_dir):
    dl = _good(la_dir)
    dl["labeled"].append({"case_id": "noimg", "label": "case004/mri_norm2.h5"})
    dl["test"].append({"case_id": "nolab", "image": "case004/mri_norm2.h5"})
    dl["unlabeled"].append("case004/mri_norm2.h5")
    dl["unlabeled"].append({"case_id": "lab", "image": "case003/mri_norm2.h5", "label": "case003/mri_norm2.h5"})
    dl["validation"] = "case004"
    msgs = _messages(check_datalist(dl, "uamt_h5", la_dir))
    assert "datalist labeled[2] (case noimg): item without 'image'" in msgs
    assert "datalist test[1] (case nolab): test items need a 'label'" in msgs
    assert any(m.startswith("datalist unlabeled[3]: an item must be an object") for m in msgs)
    assert any(m.startswith("datalist unlabeled[4] (case lab): unlabeled items carry") for m in msgs)
    assert "datalist: 'validation' must be a list of items, got str" in msgs


def test_check_same_image_under_two_case_ids(la_dir):
    dl = _good(la_dir)
    dl["unlabeled"].append({"case_id": "copy_of_test", "image": "case005/mri_norm2.h5"})
    problems = check_datalist(dl, "uamt_h5", la_dir)
    assert len(problems) == 1 and problems[0].where == str(la_dir / "case005" / "mri_norm2.h5")
    assert problems[0].what == "image used by several cases: unlabeled[3] (case copy_of_test), test[0] (case case005)"


def test_check_format_mismatch(la_dir):
    msgs = _messages(check_datalist(_good(la_dir), "msd_heart", la_dir))
    assert msgs[0] == "datalist: was made for format 'uamt_h5', checked as 'msd_heart'"
    assert check_datalist(_good(la_dir), "bogus", la_dir)[0].where == "format"


def test_check_outside_and_allow_outside(la_dir, tmp_path):
    other = tmp_path / "other"
    make_synthetic_dataset(other, "uamt_h5", num_cases=1, shape=SHAPE, seed=5, case_ids=["ext"])
    dl = _good(la_dir)
    dl["unlabeled"].append({"case_id": "ext", "image": str(other / "ext" / "mri_norm2.h5")})
    problems = check_datalist(dl, "uamt_h5", la_dir)
    assert [p.where for p in problems] == [str(other / "ext" / "mri_norm2.h5")]
    assert "unlabeled[3] (case ext) image: outside the data folder" in problems[0].what
    assert check_datalist(dl, "uamt_h5", la_dir, allow_outside=True) == []


def test_check_all_formats_clean(tmp_path):
    for fmt in FORMATS:
        ids = make_synthetic_dataset(tmp_path / fmt, fmt, num_cases=3, shape=SHAPE, seed=1)
        dl = build_datalist(tmp_path / fmt, fmt, labeled=ids[:1], test=ids[2:])
        assert check_datalist(dl, fmt, tmp_path / fmt, progress=True) == [], fmt
