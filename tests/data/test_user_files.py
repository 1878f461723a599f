"""
Inputs that real folders contain: list files saved by other editors (a byte-order mark, UTF-16), names in another
Unicode form (a folder copied from macOS), and a test case that is a training case under another name (a link, or
a copy with the same bytes). Each is read, or refused naming both entries, by ``prepare``, ``check`` and the library.
"""

from __future__ import annotations

import codecs
import json
import os
import shutil
import unicodedata

import pytest

from monai_mlbseg.__main__ import main
from monai_mlbseg.data import build_datalist, check_datalist, load_datalist, make_synthetic_dataset, read_case_list
from monai_mlbseg.utils import InputError, read_user_text

# ITK (SWIG) warns on import under Python 3.11+
pytestmark = pytest.mark.filterwarnings("ignore:builtin type [Ss]wig:DeprecationWarning")

IDS = ["case000", "case001", "cäse002"]


@pytest.mark.parametrize(
    "encode",
    [
        lambda t: t.encode("utf-8"),
        lambda t: codecs.BOM_UTF8 + t.encode("utf-8"),  # Windows Notepad
        lambda t: codecs.BOM_UTF16_LE + t.encode("utf-16-le"),  # PowerShell's >
        lambda t: codecs.BOM_UTF16_BE + t.encode("utf-16-be"),
    ],
    ids=["utf8", "utf8-bom", "utf16le-bom", "utf16be-bom"],
)
def test_a_case_list_is_read_whatever_editor_saved_it(tmp_path, encode):
    path = tmp_path / "train.list"
    path.write_bytes(encode("case000\r\ncase001\r\n  cäse002 \r\n# comment\r\n"))
    assert read_case_list(path) == ["case000", "case001", "cäse002"]


def test_an_ascii_list_saved_as_utf16_without_a_mark_is_read(tmp_path):
    path = tmp_path / "train.list"
    path.write_bytes("case000\ncase001\n".encode("utf-16-le"))
    assert read_case_list(path) == ["case000", "case001"]


def test_text_that_is_neither_utf8_nor_utf16_is_refused_naming_the_file_and_the_byte(tmp_path):
    path = tmp_path / "train.list"
    path.write_bytes("case000\ncäse001\n".encode("latin-1"))
    with pytest.raises(InputError) as raised:
        read_case_list(path)
    message = str(raised.value)
    assert str(path) in message and "not UTF-8 text" in message and "0xe4 at offset 9" in message
    assert "save it as UTF-8" in message
    assert read_user_text(_write(tmp_path / "ok.txt", codecs.BOM_UTF8 + b"x")) == "x"


def _write(path, data):
    path.write_bytes(data)
    return path


def test_a_datalist_json_with_a_byte_order_mark_is_read(tmp_path):
    make_synthetic_dataset(tmp_path / "LA", "uamt_h5", num_cases=4, shape=(24, 24, 8), seed=0)
    datalist = build_datalist(tmp_path / "LA", "uamt_h5", labeled="case000", test="case003")
    path = tmp_path / "LA" / "datalist.json"
    path.write_bytes(codecs.BOM_UTF8 + json.dumps(datalist).encode("utf-8"))
    assert [it["case_id"] for it in load_datalist(path)["labeled"]] == ["case000"]
    path.write_bytes(codecs.BOM_UTF16_LE + json.dumps(datalist).encode("utf-16-le"))
    assert [it["case_id"] for it in load_datalist(path)["test"]] == ["case003"]


@pytest.fixture
def macos_copy(tmp_path):
    """A UA-MT folder whose case folders have decomposed (NFD) names, and lists typed in composed (NFC) form."""
    data = tmp_path / "LA"
    make_synthetic_dataset(data, "uamt_h5", num_cases=4, shape=(24, 24, 8), seed=0)
    names = ["Fälle0", "Fälle1", "Fälle2", "Fälle3"]
    for old, new in zip(["case000", "case001", "case002", "case003"], names):
        os.rename(data / old, data / unicodedata.normalize("NFD", new))
    (data / "train.list").write_text("\n".join(unicodedata.normalize("NFC", n) for n in names[:3]) + "\n")
    (data / "test.list").write_text(unicodedata.normalize("NFC", names[3]) + "\n")
    return data


def test_case_ids_match_folder_names_in_another_unicode_form(macos_copy, tmp_path):
    datalist = build_datalist(macos_copy, "uamt_h5", train_list="train.list", test_list="test.list", num_labeled=1)
    assert datalist["labeled"][0]["case_id"] == unicodedata.normalize("NFC", "Fälle0")
    assert check_datalist(datalist, "uamt_h5", macos_copy, progress=False) == [], "every file found"
    out = tmp_path / "datalist.json"
    main(["prepare", "--data_dir", str(macos_copy), "--train_list", "train.list", "--test_list", "test.list",
          "--num_labeled", "1", "--output", str(out), "--progress", "False"])  # fmt: skip
    assert json.loads(out.read_text())["labeled"][0]["case_id"] == unicodedata.normalize("NFC", "Fälle0")
    first, second = "Fälle0/mri_norm2.h5", "Fälle1/mri_norm2.h5"
    typed = {"format": "uamt_h5", "labeled": [{"case_id": "a", "image": first, "label": first}],
             "unlabeled": [{"image": second}], "test": []}  # fmt: skip
    (macos_copy / "typed.json").write_text(json.dumps(typed, ensure_ascii=False))  # NFC paths, NFD folders
    main(["check", str(macos_copy / "typed.json"), "--progress", "False"])


@pytest.fixture
def uamt(tmp_path):
    data = tmp_path / "LA"
    make_synthetic_dataset(data, "uamt_h5", num_cases=5, shape=(24, 24, 8), seed=0)
    return data


@pytest.mark.parametrize("how", ["link", "copy"])
def test_a_test_case_that_is_a_training_case_under_another_name_is_refused(uamt, capsys, how):
    """The same file by resolved path (a symbolic link) or by content (a byte-identical copy) in two splits."""
    if how == "link":
        (uamt / "case004").rename(uamt / "gone")
        os.symlink(uamt / "case001", uamt / "case004", target_is_directory=True)
    else:
        shutil.copy(uamt / "case001" / "mri_norm2.h5", uamt / "case004" / "mri_norm2.h5")
    before = sorted(p.relative_to(uamt) for p in uamt.rglob("*"))
    datalist = build_datalist(uamt, "uamt_h5", labeled="case000,case001", unlabeled="case002,case003", test="case004")
    problems = check_datalist(datalist, "uamt_h5", uamt, progress=False)
    what = "the same file (a link)" if how == "link" else "files with identical content"
    assert [p.what.split(":")[0] for p in problems] == [f"{what} in more than one split"]
    assert "labeled[1] (case case001)" in problems[0].what and "test[0] (case case004)" in problems[0].what
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--data_dir", str(uamt), "--labeled", "case000,case001", "--unlabeled", "case002,case003",
              "--test", "case004", "--progress", "False"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert what in err and "case004" in err and "case001" in err and "Traceback" not in err
    assert sorted(p.relative_to(uamt) for p in uamt.rglob("*")) == before, "nothing was written"
    (uamt / "datalist.json").write_text(json.dumps(datalist))
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(uamt / "datalist.json"), "--progress", "False"])
    assert exit_info.value.code == 2 and what in capsys.readouterr().err


def test_distinct_cases_of_equal_size_are_not_taken_for_copies(uamt):
    datalist = build_datalist(uamt, "uamt_h5", labeled="case000,case001", unlabeled="case002,case003", test="case004")
    sizes = [os.path.getsize(uamt / f"case00{i}" / "mri_norm2.h5") for i in range(5)]
    assert len(set(sizes)) < len(sizes), "some files share a size, so their contents are compared"
    assert check_datalist(datalist, "uamt_h5", uamt, progress=False) == []


def test_an_empty_list_file_is_named_in_a_warning_and_inference_on_it_is_refused(tmp_path, caplog):
    from monai_mlbseg.data import validate_inputs

    make_synthetic_dataset(tmp_path / "LA", "uamt_h5", num_cases=3, shape=(24, 24, 8), seed=0)
    (tmp_path / "LA" / "test.list").write_bytes(b"")  # a failed redirect
    with caplog.at_level("WARNING", logger="monai_mlbseg.data.datalist"):
        datalist = build_datalist(tmp_path / "LA", "uamt_h5", labeled="case000", test_list="test.list")
    assert datalist["test"] == []
    assert any(str(tmp_path / "LA" / "test.list") in r.message and "names no case" in r.message for r in caplog.records)
    with pytest.raises(InputError, match="no input to process"):
        validate_inputs(datalist["test"], "uamt_h5")


def test_an_intact_compressed_metaimage_is_accepted_and_its_checksum_read(tmp_path):
    import zlib

    from monai_mlbseg.data import readers

    data = tmp_path / "P"
    ids = make_synthetic_dataset(data, "promise12", num_cases=4, shape=(24, 24, 8), seed=0)
    header = data / f"{ids[1]}.mhd"
    raw = header.with_suffix(".raw")
    size = raw.stat().st_size
    raw.write_bytes(zlib.compress(raw.read_bytes()))
    header.write_text(header.read_text().replace("ElementDataFile", "CompressedData = True\nElementDataFile"))
    assert readers.metaimage_header_problem(header) is None
    datalist = build_datalist(data, "promise12", labeled=f"{ids[0]},{ids[1]}", test=ids[3])
    assert check_datalist(datalist, "promise12", data, progress=False) == []
    raw.write_bytes(zlib.compress(b"\0" * (size + (4 << 20))))  # more than declared: stops reading early
    assert "holds more than the" in readers.metaimage_header_problem(header)
    raw.write_bytes(zlib.compress(b"\0" * (size // 2)))
    assert "holds" in readers.metaimage_header_problem(
        header
    ) and f"needs exactly {size}" in readers.metaimage_header_problem(header)


def _limited(gib):
    """A ``preexec_fn`` capping the child's address space at ``gib`` GiB: a regression that reads a huge declared
    volume then fails the test with a MemoryError instead of exhausting the machine."""
    import resource

    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (gib << 30, gib << 30))

    return apply


def _huge_h5(path):
    import h5py

    with h5py.File(path, "w") as f:  # declared 16 GiB, nothing written: a file of a few KiB
        f.create_dataset("image", shape=(2048, 2048, 1024), dtype="f4", chunks=(64, 64, 64))
        f.create_dataset("label", shape=(2048, 2048, 1024), dtype="u1", chunks=(64, 64, 64))


def _huge_nifti(path):
    import gzip

    import nibabel as nib
    import numpy as np

    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 256))  # 16 GiB of float32 declared, 1 KiB of data stored
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), code=1)
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4 + b"\0" * 1024)


@pytest.mark.parametrize("fmt, make", [("uamt_h5", _huge_h5), ("msd_heart", _huge_nifti)], ids=["h5", "nifti"])
def test_a_header_declaring_a_huge_volume_is_refused_from_the_header_under_a_memory_cap(tmp_path, fmt, make):
    import subprocess
    import sys

    from monai_mlbseg.data.datalist.check import CHECK_BYTES_PER_VOXEL, max_check_voxels

    data = tmp_path / "data"
    ids = make_synthetic_dataset(data, fmt, num_cases=4, shape=(24, 24, 8), seed=0)
    target = data / ids[1] / "mri_norm2.h5" if fmt == "uamt_h5" else data / "imagesTr" / f"{ids[1]}.nii.gz"
    make(target)
    assert target.stat().st_size < 1 << 20 and max_check_voxels() * CHECK_BYTES_PER_VOXEL < 2**40
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    result = subprocess.run(
        [sys.executable, "-m", "monai_mlbseg", "prepare", "--data_dir", str(data), "--format", fmt,
         "--labeled", f"{ids[0]},{ids[1]}", "--test", ids[3], "--progress", "False"],
        capture_output=True, text=True, timeout=300, preexec_fn=_limited(4),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr
    assert str(target) in result.stderr and "the header declares a volume of shape" in result.stderr
    assert "more than this machine checks" in result.stderr
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before, "nothing was written"


@pytest.mark.parametrize("which", ["all", "images"])
def test_uncompressed_nifti_is_a_case_for_prepare_as_for_check(tmp_path, which):
    """MSD layout with ``.nii`` files (all of them, or the images only): prepare finds the cases, check accepts them."""
    import gzip

    data = tmp_path / "heart"
    ids = make_synthetic_dataset(data, "msd_heart", num_cases=4, shape=(24, 24, 8), seed=0)
    folders = ("imagesTr", "labelsTr") if which == "all" else ("imagesTr",)
    for folder in folders:
        for path in (data / folder).glob("*.nii.gz"):
            path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
            path.unlink()
    out = tmp_path / "datalist.json"
    main(["prepare", "--data_dir", str(data), "--format", "msd_heart", "--labeled", f"{ids[0]},{ids[1]}",
          "--test", ids[3], "--output", str(out), "--progress", "False"])  # fmt: skip
    written = json.loads(out.read_text())
    assert written["labeled"][0]["image"].endswith(".nii")
    assert written["labeled"][0]["label"].endswith(".nii" if which == "all" else ".nii.gz")
    assert [it["case_id"] for it in written["unlabeled"]] == [ids[2]]
    main(["check", str(out), "--data_dir", str(data), "--progress", "False"])


def _copy_of_a_training_case(data):
    shutil.copy(data / "la_b" / "mri_norm2.h5", data / "la_e" / "mri_norm2.h5")
    return "la_e", "files with identical content in more than one split"


def _label_without_background(data):
    import h5py

    with h5py.File(data / "la_a" / "mri_norm2.h5", "a") as f:
        f["label"][...] = 1
    return "la_a", "no background voxel"


def _no_data_values(data):
    import h5py
    import numpy as np

    with h5py.File(data / "la_c" / "mri_norm2.h5", "a") as f:
        image = f["image"][()].astype("f4")
        image[0, 0, :] = np.finfo(np.float32).max
        del f["image"]
        f.create_dataset("image", data=image)
    return "la_c", "no-data values"


def _huge_declaration(data):
    _huge_h5(data / "la_d" / "mri_norm2.h5")
    return "la_d", "the header declares a volume of shape (2048, 2048, 1024)"


def _damaged_gzip(data):
    path = data / "imagesTr" / "la_003.nii.gz"
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0xFF
    path.write_bytes(bytes(raw))
    return "la_003", "gzip data are damaged"


def _nan_origin_of_a_test_image(data):
    import nibabel as nib
    import numpy as np

    path = data / "imagesTr" / "la_007.nii.gz"
    img = nib.load(str(path))
    header = img.header.copy()
    header["srow_x"][3] = np.nan
    header.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, header=header), str(path))
    return "la_007", "holds NaN or inf values"


def _long_metaimage_data(data):
    raw = data / "Case01.raw"
    raw.write_bytes(raw.read_bytes() + b"\0" * 64)
    return "Case01", "64 bytes too many"


#: (format of the data, damage) pairs; each damage returns the case it damaged and what the refusal must say
DAMAGES = [
    ("uamt_h5", _copy_of_a_training_case),
    ("uamt_h5", _label_without_background),
    ("uamt_h5", _no_data_values),
    ("uamt_h5", _huge_declaration),
    ("msd_heart", _damaged_gzip),
    ("msd_heart", _nan_origin_of_a_test_image),
    ("promise12", _long_metaimage_data),
]


@pytest.mark.parametrize("fmt, damage", DAMAGES, ids=[f.__name__.strip("_") for _, f in DAMAGES])
def test_the_bundles_training_refuses_what_prepare_refuses_before_training(tmp_path, fmt, damage):
    from tests.bundle_utils import copy_bundle, make_data, overrides, workflow

    bundle = copy_bundle("mlbseg_la", tmp_path)
    data, split = make_data(tmp_path, fmt)
    case, fragment = damage(data)
    with pytest.raises(Exception) as info:
        workflow(bundle, ["train.json"], "train", run_id="training", **overrides(bundle, data, fmt, split)).run()
    chain, error = [], info.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__
    message = "\n".join(chain)
    assert case in message and fragment in message, message[-2000:]
    assert not list(bundle.rglob("*.pt")) and not list(bundle.rglob("*.nii.gz")), "nothing trained or written"


def test_the_bundle_reads_lists_saved_by_other_editors_next_to_folders_in_another_unicode_form(macos_copy, tmp_path):
    """The left-atrium bundle's UA-MT split: train.list with a UTF-8 BOM, test.list in UTF-16, NFD case folders."""
    from monai_mlbseg.recipe import parsed, run_training_step
    from tests.bundle_utils import copy_bundle, overrides, workflow

    names = [unicodedata.normalize("NFC", f"Fälle{i}") for i in range(4)]
    (macos_copy / "train.list").write_bytes(codecs.BOM_UTF8 + "\r\n".join(names[:3]).encode("utf-8"))
    (macos_copy / "test.list").write_bytes(codecs.BOM_UTF16_LE + names[3].encode("utf-16-le"))
    bundle = copy_bundle("mlbseg_la", tmp_path)
    split = {"train_list": str(macos_copy / "train.list"), "test_list": str(macos_copy / "test.list"), "num_labeled": 1}
    wf = workflow(bundle, ["train.json"], "train", run_id="training", **overrides(bundle, macos_copy, "uamt_h5", split))
    run_training_step(wf, "data check")  # raises on any refused input
    assert [it["case_id"] for it in parsed(wf, "train#dataset#data")] == names[:1]
    assert [it["case_id"] for it in parsed(wf, "train#unlabeled#source")] == names[1:3]
    assert [it["case_id"] for it in parsed(wf, "test_data")] == names[3:]
