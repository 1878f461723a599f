"""A run's data manifest: keyed by names and content, location-free, cached by size and time, and it notices
changed files."""

import json
import logging
import os
import shutil

import pytest

from monai_mlbseg.utils import DIGEST_CACHE_FILE, MANIFEST_FILE, DataManifest, InputError
from monai_mlbseg.utils import manifest as manifest_module


def project(root):
    """A data folder of two labeled and one unlabeled case, and the data lists naming them."""
    data = root / "data"
    data.mkdir(parents=True)
    for name in ("a_img", "a_lab", "b_img", "b_lab", "c_img"):
        (data / f"{name}.nii.gz").write_bytes(name.encode() * 100)
    return data, lists(data)


def lists(data):
    labeled = [
        {"case_id": c, "image": str(data / f"{c}_img.nii.gz"), "label": str(data / f"{c}_lab.nii.gz")} for c in "ab"
    ]
    return {"labeled": labeled, "unlabeled": [{"case_id": "c", "image": str(data / "c_img.nii.gz")}]}


def count_reads(monkeypatch):
    reads = []
    digest = manifest_module.file_digest
    monkeypatch.setattr(manifest_module, "file_digest", lambda path: reads.append(os.fspath(path)) or digest(path))
    return reads


def test_the_key_follows_the_content_not_the_location(tmp_path):
    data, splits = project(tmp_path / "p1")
    first = DataManifest(splits, root=data)
    assert sorted(first.files) == ["a_img.nii.gz", "a_lab.nii.gz", "b_img.nii.gz", "b_lab.nii.gz", "c_img.nii.gz"]
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(data, moved, copy_function=shutil.copyfile)  # new paths and new modification times
    assert DataManifest(lists(moved), root=moved).key == first.key, "moving the project keeps the run"

    (data / "a_lab.nii.gz").write_bytes(b"corrected label")
    edited = DataManifest(splits, root=data)
    assert edited.key != first.key and edited.layout == first.layout, "a label edited in place is a new run"
    swapped = {"labeled": splits["unlabeled"], "unlabeled": splits["labeled"]}
    assert DataManifest(swapped, root=data).key != edited.key, "the split of each file is part of the key"


def test_digests_are_cached_by_size_and_modification_time(tmp_path, monkeypatch):
    data, splits = project(tmp_path)
    reads = count_reads(monkeypatch)
    first = DataManifest(splits, root=data, cache_dir=tmp_path / "work")
    assert len(reads) == 5 and not (tmp_path / "work").exists(), "nothing is written before the data check passed"
    first.record(tmp_path / "work" / first.key)
    assert (tmp_path / "work" / DIGEST_CACHE_FILE).is_file()
    reads.clear()
    again = DataManifest(splits, root=data, cache_dir=tmp_path / "work")
    assert reads == [], "nothing is read again when sizes and times are as cached"
    path = data / "b_img.nii.gz"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    touched = DataManifest(splits, root=data, cache_dir=tmp_path / "work")
    assert reads == [str(path)] and touched.key == again.key, "a touched file is read again, same content"


def test_changed_files_are_named_and_a_touch_is_not_a_change(tmp_path):
    data, splits = project(tmp_path)
    manifest = DataManifest(splits, root=data)
    path = data / "a_img.nii.gz"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert manifest.changed() == {}
    manifest.verify()
    path.write_bytes(b"another volume")
    (data / "c_img.nii.gz").unlink()
    assert manifest.changed() == {"a_img.nii.gz": "content", "c_img.nii.gz": "removed"}
    with pytest.raises(InputError) as refused:
        manifest.verify("stage 2")
    text = str(refused.value)
    assert str(path) in text and "changed while stage 2 was using it (content)" in text
    assert str(data / "c_img.nii.gz") in text and "a new run" in text


def test_a_missing_file_is_recorded_for_the_data_check_to_report(tmp_path):
    data, splits = project(tmp_path)
    (data / "b_lab.nii.gz").unlink()
    manifest = DataManifest(splits, root=data)
    assert "sha256" not in manifest.files["b_lab.nii.gz"] and manifest.files["b_lab.nii.gz"]["problem"]
    assert manifest.changed() == {}


def test_a_new_run_on_changed_data_names_the_files_and_how_to_keep_stage_1(tmp_path, caplog):
    data, splits = project(tmp_path)
    work = tmp_path / "work"
    old = DataManifest(splits, root=data, cache_dir=work)
    written = old.record(work / old.key)
    assert json.loads(written.read_text())["key"] == old.key and written.name == MANIFEST_FILE
    (data / "c_img.nii.gz").write_bytes(b"replaced unlabeled volume")
    new = DataManifest(splits, root=data, cache_dir=work)
    with caplog.at_level(logging.WARNING):
        new.record(work / new.key)
    said = caplog.text
    assert "the data changed since the run in" in said and str(work / old.key) in said
    assert "c_img.nii.gz" in said and "a_img" not in said and f"--stage1_dir {work / old.key}" in said
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        new.record(work / new.key)
    assert caplog.text == "", "a run resumed in its own folder says nothing"


def test_digest_of_gives_the_recorded_digest_of_a_data_file(tmp_path):
    data, splits = project(tmp_path)
    manifest = DataManifest(splits, root=data)
    assert manifest.digest_of(data / "c_img.nii.gz") == manifest.files["c_img.nii.gz"]["sha256"]
    assert manifest.digest_of(tmp_path / "not_in_the_run.nii.gz") is None
