"""The semi-supervised train task on a real MONAI Label datastore (``LocalDatastore``): labeled and unlabeled studies,
a new split after more labels, the supervised switch, bad studies, and the app offering new weights at once."""

import logging
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.bundle_utils import run_folders

if os.environ.get("MLBSEG_REQUIRE_MONAILABEL") != "1":
    pytest.importorskip(
        "monailabel.interfaces.app", reason="MONAI Label's server is not installed (.ci/run installs it)"
    )

REQUEST = {"model": "mlbseg_la", "device": "cpu", "stage1_iterations": 4, "stage2_steps": 3}


def datastore(studies):
    from monailabel.datastore.local import LocalDatastore

    return LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)


def test_train_uses_the_unlabeled_studies_and_a_new_label_starts_a_new_run_from_the_current_model(app, caplog):
    from monai_mlbseg.monailabel import SemiSupervisedTrainTask

    folder, studies, truths = app
    bundle = folder / "model" / "mlbseg_la"
    task = SemiSupervisedTrainTask(str(bundle), conf={})
    assert task.is_valid() and task.data_format == "msd_heart"
    options = task.config()
    assert options["stage2_method"][0] == "weak_to_strong" and "mlbseg" in options["stage2_method"]
    assert {"stage1_iterations", "stage2_steps", "use_unlabeled", "device"} <= set(options)
    assert "max_epochs" not in options and "val_split" not in options, "the bundle's budget and validation rule"

    with caplog.at_level(logging.INFO):
        first = task(REQUEST, datastore(studies))
    (run,) = run_folders(bundle)
    assert first["run_dir"] == str(run)
    assert [os.path.basename(p) for p in first["unlabeled"]] == ["s2.nii.gz", "s3.nii.gz", "s4.nii.gz"]
    assert sorted(p.name for p in (run / "initial_labels").glob("*.nii.gz")) == ["s2.nii.gz", "s3.nii.gz", "s4.nii.gz"]
    assert (run / "stage1.pt").is_file() and (bundle / "models" / "model.pt").is_file()
    assert "2 labeled studies (all of them: no validation split" in caplog.text
    model = torch.load(bundle / "models" / "model.pt", weights_only=True)

    shutil.copyfile(studies / "s2.nii.gz", studies / "s2_copy_unused.txt")  # not a study: ignored by the datastore
    (studies / "labels" / "final").mkdir(exist_ok=True)
    nib.save(truths["s2"], studies / "labels" / "final" / "s2.nii.gz")  # the user labels one more study
    second = task(REQUEST, datastore(studies))
    new = next(r for r in run_folders(bundle) if r != run)
    assert second["run_dir"] == str(new), "a new split is a new run, never a resume of the other split's checkpoints"
    assert [os.path.basename(p) for p in second["labeled"]] == ["s0.nii.gz", "s1.nii.gz", "s2.nii.gz"]
    assert first["started_from"] is None and second["started_from"] == str(bundle / "models" / "model.pt")
    after = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert any(not torch.equal(model[k], after[k]) for k in model), "the model was trained again"


def test_the_supervised_switch_trains_on_the_labeled_studies_only(app):
    from monai_mlbseg.monailabel import SemiSupervisedTrainTask

    folder, studies, _ = app
    bundle = folder / "model" / "mlbseg_la"
    result = SemiSupervisedTrainTask(str(bundle), conf={})({**REQUEST, "use_unlabeled": False}, datastore(studies))
    (run,) = run_folders(bundle)
    assert result["unlabeled"] == [] and result["settings"]["use_unlabeled"] is False
    assert not (run / "stage1.pt").exists() and not (run / "initial_labels").exists()
    assert (bundle / "models" / "model.pt").is_file()


def shifted(label_file):
    """The label moved 3 voxels along x in world space: the wrong geometry for its image."""
    label = nib.load(label_file)
    affine = label.affine.copy()
    affine[0, 3] += 3 * affine[0, 0]
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), affine), label_file)


@pytest.mark.parametrize(
    "damage", [lambda f: f.write_bytes(f.read_bytes()[:200]), shifted], ids=["truncated", "wrong_geometry"]
)
def test_a_broken_label_is_refused_by_name_and_the_datastore_is_unchanged(app, damage):
    from monai_mlbseg.monailabel import SemiSupervisedTrainTask
    from monai_mlbseg.utils import InputError

    folder, studies, _ = app
    broken = studies / "labels" / "final" / "s1.nii.gz"
    damage(broken)
    store = datastore(studies)  # MONAI Label's own records (datastore_v2.json) are written here
    before = {p: p.read_bytes() for p in studies.rglob("*") if p.is_file()}
    task = SemiSupervisedTrainTask(str(folder / "model" / "mlbseg_la"), conf={})
    with pytest.raises(Exception) as refused:
        task(REQUEST, store)
    error = refused.value
    while error is not None and not isinstance(error, InputError):
        error = error.__cause__ or error.__context__
    assert isinstance(error, InputError) and str(broken) in str(error), str(refused.value)[-2000:]
    assert {p: p.read_bytes() for p in studies.rglob("*") if p.is_file()} == before
    assert not (folder / "model" / "mlbseg_la" / "models" / "model.pt").exists()


def test_the_app_offers_a_model_whose_weights_appear_while_it_runs(app):
    from monai_mlbseg.monailabel import MLBSegApp
    from monai_mlbseg.networks import NestedUNet

    folder, studies, _ = app
    server = MLBSegApp(str(folder), str(studies), {"models": "mlbseg_la"})
    assert "mlbseg_la" in server.info()["trainers"] and "mlbseg_la" not in server.info()["models"]
    weights = folder / "model" / "mlbseg_la" / "models"
    weights.mkdir()
    torch.save(NestedUNet(2, features=(4, 8)).state_dict(), weights / "model.pt")  # as a /train writes it
    assert "mlbseg_la" in server.info()["models"], "offered without a restart"
    with pytest.raises(ValueError, match="no bundle mlbseg_nothing"):
        MLBSegApp(str(folder), str(studies), {"models": "mlbseg_nothing"})
